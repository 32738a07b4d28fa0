import ABI
import CPVMShim
#if canImport(Glibc)
import Glibc
#endif

/// What the real host says about itself: the module that serves /dev/kvm, the kvm module's
/// `enable_virt_at_load`, and the VM types KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES) advertises.
public struct KVMHostFacts: Sendable, Equatable, Codable {
    public var device: String
    public var modules: [KVMModule]
    /// The kvm module parameter as the kernel shows it ("Y", "N"), nil where the kernel has none.
    public var enableVirtAtLoad: String?
    /// nil when the kernel does not know KVM_CAP_VM_TYPES (before 6.8: default VMs only).
    public var vmTypes: UInt32?

    public var vmTypeMask: VMTypeMask? { vmTypes.map(VMTypeMask.init(rawValue:)) }

    /// Reads them from `device` and /sys/module; throws KVMError when the device cannot be opened.
    public static func read(device: String = "/dev/kvm", sysModule: String = "/sys/module") throws -> KVMHostFacts {
        let kvm = try KVMDevice(path: device)
        let answer = kvm.checkExtension(Int32(KVMCapability.vmTypes))
        let parameter = Self.firstLine(of: "\(sysModule)/kvm/parameters/enable_virt_at_load")
        return KVMHostFacts(device: device, modules: KVMModule.loaded(sysModule: sysModule), enableVirtAtLoad: parameter,
                            vmTypes: answer > 0 ? UInt32(answer) : nil)
    }
}

extension KVMHostFacts {
    /// The first line of a small sysfs file, nil when it cannot be read.
    static func firstLine(of path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 256)
        // read(2) into our own buffer of 256 bytes.
        let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, 256) }
        guard n > 0 else { return nil }
        return String(decoding: buffer[0..<n].prefix { $0 != 0x0A }, as: UTF8.self)
    }
}

/// One VM lifecycle through /dev/kvm, timed in this process: the first KVM_CREATE_VM this
/// process makes, a second while the first exists, KVM_CREATE_VCPU in the second, and closing the
/// last VM (its vCPU and the other VM closed first, so the close tears the VM down). Run it in a
/// fresh process for "first VM" to mean what it says (`pvm __kvm-lifecycle`).
public struct KVMLifecycleTimes: Sendable, Equatable, Codable {
    public var firstCreateVMNanos: UInt64
    public var nextCreateVMNanos: UInt64
    public var createVCPUNanos: UInt64
    public var destroyLastVMNanos: UInt64

    public init(firstCreateVMNanos: UInt64, nextCreateVMNanos: UInt64, createVCPUNanos: UInt64, destroyLastVMNanos: UInt64) {
        self.firstCreateVMNanos = firstCreateVMNanos
        self.nextCreateVMNanos = nextCreateVMNanos
        self.createVCPUNanos = createVCPUNanos
        self.destroyLastVMNanos = destroyLastVMNanos
    }

    public static func measure(device: String = "/dev/kvm") throws -> KVMLifecycleTimes {
        let kvm = try KVMDevice(path: device)
        func createVM() throws -> (fd: Int32, nanos: UInt64) {
            let t = monotonicNanos()
            let fd = ioctl(kvm.fd, KVMIoctl.createVM, Int32(0))
            let dt = monotonicNanos() - t
            guard fd >= 0 else { throw KVMError.ioctlFailed(name: "KVM_CREATE_VM", errno: errno) }
            return (fd, dt)
        }
        let first = try createVM()
        let next: (fd: Int32, nanos: UInt64)
        do { next = try createVM() } catch { close(first.fd); throw error }
        let t = monotonicNanos()
        let vcpu = ioctl(next.fd, KVMIoctl.createVCPU, Int32(0))
        let vcpuNanos = monotonicNanos() - t
        guard vcpu >= 0 else {
            let e = errno
            close(next.fd)
            close(first.fd)
            throw KVMError.ioctlFailed(name: "KVM_CREATE_VCPU", errno: e)
        }
        close(vcpu)
        close(next.fd)
        // The last VM: no vCPU holds a reference, so closing it destroys it now (kvm_destroy_vm).
        let d = monotonicNanos()
        close(first.fd)
        let destroyNanos = monotonicNanos() - d
        return KVMLifecycleTimes(firstCreateVMNanos: first.nanos, nextCreateVMNanos: next.nanos,
                                 createVCPUNanos: vcpuNanos, destroyLastVMNanos: destroyNanos)
    }
}
