import ABI
import CPVMShim
#if canImport(Glibc)
import Glibc
#endif

/// One statistic of a VM or vCPU as KVM_GET_STATS_FD describes it (<linux/kvm.h>, struct
/// kvm_stats_desc): its name, type, unit and base as the kernel's flags say, and its value(s).
public struct KVMStat: Sendable, Equatable {
    public enum Kind: String, Sendable { case cumulative, instant, peak, linearHistogram = "linear-hist", logHistogram = "log-hist", unknown }
    public enum Unit: String, Sendable { case none, bytes, seconds, cycles, boolean, unknown }

    public var name: String
    public var kind: Kind
    public var unit: Unit
    /// The value is value x base^exponent (base 10 or 2) in `unit`.
    public var base: Int
    public var exponent: Int16
    public var values: [UInt64]

    /// The one value of a single-value statistic.
    public var value: UInt64? { values.count == 1 ? values[0] : nil }

    static func kind(_ flags: UInt32) -> Kind {
        switch flags & UInt32(KVM_STATS_TYPE_MASK) {
        case UInt32(KVM_STATS_TYPE_CUMULATIVE): .cumulative
        case UInt32(KVM_STATS_TYPE_INSTANT): .instant
        case UInt32(KVM_STATS_TYPE_PEAK): .peak
        case UInt32(KVM_STATS_TYPE_LINEAR_HIST): .linearHistogram
        case UInt32(KVM_STATS_TYPE_LOG_HIST): .logHistogram
        default: .unknown
        }
    }

    static func unit(_ flags: UInt32) -> Unit {
        switch flags & UInt32(KVM_STATS_UNIT_MASK) {
        case UInt32(KVM_STATS_UNIT_NONE): .none
        case UInt32(KVM_STATS_UNIT_BYTES): .bytes
        case UInt32(KVM_STATS_UNIT_SECONDS): .seconds
        case UInt32(KVM_STATS_UNIT_CYCLES): .cycles
        case UInt32(KVM_STATS_UNIT_BOOLEAN): .boolean
        default: .unknown
        }
    }
}

/// Reads a KVM binary-statistics file descriptor (KVM_GET_STATS_FD): the header, every
/// descriptor and every value, bounds-checked (the kernel is trusted, the sizes are still checked).
enum KVMStatsReader {
    static func read(statsFD sfd: Int32) throws -> [KVMStat] {
        func bytes(_ count: Int, at offset: Int) throws -> [UInt8] {
            var b = [UInt8](repeating: 0, count: count)
            // pread into our own buffer of exactly `count` bytes.
            let n = b.withUnsafeMutableBytes { pread(sfd, $0.baseAddress, count, off_t(offset)) }
            guard n == count else { throw KVMError.ioctlFailed(name: "read(KVM stats fd)", errno: n < 0 ? errno : EIO) }
            return b
        }
        func u32(_ b: [UInt8], _ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[o + $1]) << (8 * $1) } }
        func u16(_ b: [UInt8], _ o: Int) -> UInt16 { UInt16(b[o]) | UInt16(b[o + 1]) << 8 }
        let h = try bytes(MemoryLayout<kvm_stats_header>.size, at: 0)
        let nameSize = Int(u32(h, 4)), count = Int(u32(h, 8)), descOffset = Int(u32(h, 16)), dataOffset = Int(u32(h, 20))
        guard nameSize > 0, nameSize <= 256, count <= 4096 else { throw KVMError.ioctlFailed(name: "KVM stats header", errno: EINVAL) }
        let descSize = MemoryLayout<kvm_stats_desc>.size + nameSize
        let descs = try bytes(descSize * count, at: descOffset)
        var out: [KVMStat] = []
        for i in 0..<count {
            // struct kvm_stats_desc: u32 flags; s16 exponent; u16 size; u32 offset; u32 bucket_size; char name[].
            let d = i * descSize
            let flags = u32(descs, d), exponent = Int16(bitPattern: u16(descs, d + 4))
            let size = Int(u16(descs, d + 6)), offset = Int(u32(descs, d + 8))
            guard size >= 1, size <= 1024 else { continue }
            let nameBytes = descs[(d + MemoryLayout<kvm_stats_desc>.size)..<(d + descSize)].prefix { $0 != 0 }
            let raw = try bytes(8 * size, at: dataOffset + offset)
            let values = (0..<size).map { k in (0..<8).reduce(UInt64(0)) { $0 | UInt64(raw[8 * k + $1]) << (8 * $1) } }
            let base = flags & UInt32(KVM_STATS_BASE_MASK) == UInt32(KVM_STATS_BASE_POW2) ? 2 : 10
            out.append(KVMStat(name: String(decoding: nameBytes, as: UTF8.self), kind: KVMStat.kind(flags), unit: KVMStat.unit(flags),
                               base: base, exponent: exponent, values: values))
        }
        return out
    }

    /// KVM_GET_STATS_FD on a VM or vCPU fd, read and closed.
    static func read(owner fd: Int32) throws -> [KVMStat] {
        let sfd = ioctl(fd, KVMIoctl.getStatsFD)
        guard sfd >= 0 else { throw KVMError.ioctlFailed(name: "KVM_GET_STATS_FD", errno: errno) }
        defer { close(sfd) }
        return try read(statsFD: sfd)
    }
}

extension KVMVirtualMachine {
    /// This VM's binary statistics (KVM_GET_STATS_FD on the VM fd, 5.14+): every descriptor with
    /// its value(s), in the kernel's order.
    public func stats() throws -> [KVMStat] { try KVMStatsReader.read(owner: fd) }
}

/// A memslot beyond slot 0, backed by anonymous memory this object keeps mapped while the slot
/// is deleted and created again (KVM_SET_USER_MEMORY_REGION; size 0 deletes), as a VMM that
/// re-registers the same memory does (the ChromeOS pattern of the memslot-zap thread).
public final class KVMExtraSlot {
    public let slot: UInt32
    public let guestPhysicalAddress: UInt64
    public let bytes: Int
    let vm: KVMVirtualMachine
    // The slot's memory; valid from init to deinit, whether or not KVM has the slot.
    private let memory: UnsafeMutableRawPointer
    public private(set) var present = false

    init(vm: KVMVirtualMachine, slot: UInt32, guestPhysicalAddress: UInt64, bytes: Int) throws {
        // Private anonymous memory, sparse until the guest touches it.
        let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != MAP_FAILED else { throw KVMError.mapFailed(what: "memslot \(slot)", bytes: bytes, errno: errno) }
        self.vm = vm; self.slot = slot; self.guestPhysicalAddress = guestPhysicalAddress; self.bytes = bytes; self.memory = p
        // On a failure deinit runs (every property is set) and unmaps the memory: not here too.
        try create()
    }

    deinit {
        if present { try? set(size: 0) }
        munmap(memory, bytes)
    }

    private func set(size: UInt64) throws {
        var region = kvm_userspace_memory_region(slot: slot, flags: 0, guest_phys_addr: guestPhysicalAddress,
                                                 memory_size: size, userspace_addr: UInt64(UInt(bitPattern: memory)))
        // The ioctl reads the struct during the call only.
        guard ioctl(vm.fd, KVMIoctl.setUserMemoryRegion, &region) == 0 else {
            throw KVMError.ioctlFailed(name: "KVM_SET_USER_MEMORY_REGION", errno: errno)
        }
    }

    /// KVM_SET_USER_MEMORY_REGION with the slot's size: the slot is back, its mappings are not.
    public func create() throws {
        try set(size: UInt64(bytes))
        present = true
    }

    /// KVM_SET_USER_MEMORY_REGION with size 0: KVM deletes the slot and zaps its mappings (or all).
    public func delete() throws {
        try set(size: 0)
        present = false
    }
}

extension KVMVirtualMachine {
    /// Adds memslot `slot` at `guestPhysicalAddress`, `bytes` long (page-aligned both).
    public func addSlot(_ slot: UInt32, at guestPhysicalAddress: UInt64, bytes: Int) throws -> KVMExtraSlot {
        try KVMExtraSlot(vm: self, slot: slot, guestPhysicalAddress: guestPhysicalAddress, bytes: bytes)
    }
}
