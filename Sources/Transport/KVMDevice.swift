import ABI
import Atomics
import CPVMShim
import Dispatch
#if canImport(Glibc)
import Glibc
#endif

// The real /dev/kvm, one level deep: just enough of the KVM API to run a tiny guest and time its
// exits (`pvm calibrate`). Everything else in the project simulates KVM; this file talks to it.
// It is here, not in Bench, because it holds raw pointers (the guest memory mapping, the kvm_run
// page, ioctl argument buffers); the types it hands out are plain Swift values.

// MARK: - ioctl numbers

/// The KVM ioctl numbers. <linux/kvm.h> defines them with the function-like macros `_IO`, `_IOR`,
/// `_IOW` and `_IOWR`, which Swift does not import ("macro unavailable"), and the shim may not
/// redefine them. So they are rebuilt with the asm-generic encoding (<asm-generic/ioctl.h>, which
/// x86 uses): `dir << 30 | size << 16 | type << 8 | nr`, where dir is 0 (none), 1 (write: user to
/// kernel) or 2 (read: kernel to user), type is KVMIO (0xAE, imported), and size is the argument
/// struct's size, taken from the imported struct so a header change moves the number as in C.
/// `CalibrateTests` checks every value against what the C compiler computes from the header.
public enum KVMIoctl {
    private static let write: UInt = 1
    private static let read: UInt = 2

    static func ioc(_ dir: UInt, _ nr: UInt, size: Int) -> UInt {
        dir << 30 | UInt(size) << 16 | UInt(KVMIO) << 8 | nr
    }
    static func io(_ nr: UInt) -> UInt { ioc(0, nr, size: 0) }
    static func ior<T>(_ nr: UInt, _: T.Type) -> UInt { ioc(read, nr, size: MemoryLayout<T>.size) }
    static func iow<T>(_ nr: UInt, _: T.Type) -> UInt { ioc(write, nr, size: MemoryLayout<T>.size) }
    static func iowr<T>(_ nr: UInt, _: T.Type) -> UInt { ioc(read | write, nr, size: MemoryLayout<T>.size) }

    // /dev/kvm
    public static let getAPIVersion = io(0x00)
    public static let createVM = io(0x01)
    public static let checkExtension = io(0x03)
    public static let getVCPUMmapSize = io(0x04)
    public static let getSupportedCPUID = iowr(0x05, kvm_cpuid2.self)
    // VM
    public static let createVCPU = io(0x41)
    public static let setUserMemoryRegion = iow(0x46, kvm_userspace_memory_region.self)
    public static let enableCap = iow(0xA3, kvm_enable_cap.self)
    public static let setMSRFilter = iow(0xC6, kvm_msr_filter.self)
    // vCPU
    public static let run = io(0x80)
    public static let getRegs = ior(0x81, kvm_regs.self)
    public static let setRegs = iow(0x82, kvm_regs.self)
    public static let getSregs = ior(0x83, kvm_sregs.self)
    public static let setSregs = iow(0x84, kvm_sregs.self)
    public static let setCPUID2 = iow(0x90, kvm_cpuid2.self)
    /// KVM_GET_STATS_FD (<linux/kvm.h>: _IO(KVMIO, 0xce)), on a VM or vCPU fd.
    public static let getStatsFD = io(0xCE)
}

// MARK: - errors

/// The kernel module that serves /dev/kvm, read from /sys/module: on the machines this project
/// runs on it is kvm_pvm (PVM), so a "one-level" exit timed through it is PVM's nested exit.
public enum KVMModule: String, Sendable, CaseIterable, Codable {
    case kvmIntel = "kvm_intel", kvmAMD = "kvm_amd", kvmPVM = "kvm_pvm"

    /// Every vendor module loaded, in this order.
    public static func loaded(sysModule: String = "/sys/module") -> [KVMModule] {
        allCases.filter { access("\(sysModule)/\($0.rawValue)", F_OK) == 0 }
    }

    public var meaning: String {
        switch self {
        case .kvmIntel: "Intel VMX, one level deep"
        case .kvmAMD: "AMD SVM, one level deep"
        case .kvmPVM: "PVM: a paravirtualized guest one level below a VM without VMX/SVM, so its exits are nested exits, not one-level KVM exits"
        }
    }
}

/// What went wrong talking to KVM, worded for a person: the path or the ioctl, and errno's text.
public enum KVMError: Error, CustomStringConvertible, Equatable {
    /// open(2) of the device failed: no such file, no permission.
    case cannotOpen(path: String, errno: Int32)
    /// KVM_GET_API_VERSION answered something other than 12 (the only stable API there is).
    case unsupportedAPIVersion(path: String, version: Int32)
    /// An ioctl returned -1; `name` is the <linux/kvm.h> name (KVM_CREATE_VM, ...).
    case ioctlFailed(name: String, errno: Int32)
    /// KVM_CHECK_EXTENSION says this KVM lacks a capability the caller needs.
    case missingCapability(name: String)
    case mapFailed(what: String, bytes: Int, errno: Int32)
    /// A guest-physical access outside the one memory slot.
    case outsideGuestMemory(gpa: UInt64, length: Int, memoryBytes: Int)

    public var description: String {
        switch self {
        case let .cannotOpen(p, e): "\(p): \(String(cString: strerror(e)))"
        case let .unsupportedAPIVersion(p, v): "\(p): KVM API version \(v), expected \(KVM_API_VERSION)"
        case let .ioctlFailed(n, e): "\(n) failed: \(String(cString: strerror(e)))"
        case let .missingCapability(n): "this KVM does not support \(n)"
        case let .mapFailed(w, b, e): "mmap of \(w) (\(b) bytes) failed: \(String(cString: strerror(e)))"
        case let .outsideGuestMemory(g, l, m): "guest access [0x\(String(g, radix: 16)), +\(l)) outside guest memory of \(m) bytes"
        }
    }
}

// MARK: - plain values

/// One CPUID leaf as KVM_GET_SUPPORTED_CPUID / KVM_SET_CPUID2 carry it (kvm_cpuid_entry2).
public struct KVMCPUIDEntry: Equatable, Sendable {
    public var function, index, flags, eax, ebx, ecx, edx: UInt32
    public init(function: UInt32, index: UInt32, flags: UInt32, eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32) {
        self.function = function; self.index = index; self.flags = flags
        self.eax = eax; self.ebx = ebx; self.ecx = ecx; self.edx = edx
    }
}

/// The general-purpose registers, RIP and RFLAGS (kvm_regs, same order).
public struct KVMRegisters: Equatable, Sendable {
    public var rax: UInt64 = 0, rbx: UInt64 = 0, rcx: UInt64 = 0, rdx: UInt64 = 0
    public var rsi: UInt64 = 0, rdi: UInt64 = 0, rsp: UInt64 = 0, rbp: UInt64 = 0
    public var r8: UInt64 = 0, r9: UInt64 = 0, r10: UInt64 = 0, r11: UInt64 = 0
    public var r12: UInt64 = 0, r13: UInt64 = 0, r14: UInt64 = 0, r15: UInt64 = 0
    public var rip: UInt64 = 0, rflags: UInt64 = 0x2
    public init() {}
}

/// One segment register's hidden part (kvm_segment): what the CPU uses, whatever the GDT says.
public struct KVMSegment: Equatable, Sendable {
    public var base: UInt64, limit: UInt32, selector: UInt16, type: UInt8
    public var present: Bool, dpl: UInt8, db: Bool, s: Bool, l: Bool, g: Bool
    public init(base: UInt64, limit: UInt32, selector: UInt16, type: UInt8,
                present: Bool, dpl: UInt8, db: Bool, s: Bool, l: Bool, g: Bool) {
        self.base = base; self.limit = limit; self.selector = selector; self.type = type
        self.present = present; self.dpl = dpl; self.db = db; self.s = s; self.l = l; self.g = g
    }
}

/// The system state a guest needs to start in a mode other than real mode: control registers,
/// EFER, the GDT and the segments. Fields not listed here (TR, LDT, IDT, APIC base) keep KVM's
/// reset values.
public struct KVMSystemState: Equatable, Sendable {
    public var cr0: UInt64, cr3: UInt64, cr4: UInt64, efer: UInt64
    public var gdtBase: UInt64, gdtLimit: UInt16
    public var code: KVMSegment
    /// Loaded into DS, ES, FS, GS and SS.
    public var data: KVMSegment
    public init(cr0: UInt64, cr3: UInt64, cr4: UInt64, efer: UInt64, gdtBase: UInt64, gdtLimit: UInt16,
                code: KVMSegment, data: KVMSegment) {
        self.cr0 = cr0; self.cr3 = cr3; self.cr4 = cr4; self.efer = efer
        self.gdtBase = gdtBase; self.gdtLimit = gdtLimit; self.code = code; self.data = data
    }
}

/// Why KVM_RUN returned, with the fields that exit reason fills in kvm_run.
public enum KVMExit: Equatable, Sendable {
    /// Port I/O (KVM_EXIT_IO); `data` is the first `size` bytes (an OUT's value), little-endian.
    case io(port: UInt16, isOut: Bool, size: UInt8, count: UInt32, data: UInt32)
    /// HLT with no in-kernel local APIC: KVM has already stepped RIP past the instruction.
    case hlt
    /// RDMSR that the MSR filter sent to userspace; answer with `answerRDMSR` before the next run.
    case rdmsr(index: UInt32, reason: UInt32)
    case wrmsr(index: UInt32, data: UInt64, reason: UInt32)
    /// Triple fault: the guest's state was not what its code assumed.
    case shutdown
    case failEntry(hardwareReason: UInt64)
    case internalError(suberror: UInt32)
    case other(reason: UInt32)
    /// The time limit of `withTimeLimit` passed while the guest ran without exiting to userspace.
    case timedOut
}

// MARK: - /dev/kvm

/// An open /dev/kvm (the "system" file descriptor): capability queries and VM creation.
public final class KVMDevice {
    public let path: String
    let fd: Int32

    /// Opens the device and checks the API version, so a caller learns at once whether KVM is there.
    public init(path: String = "/dev/kvm") throws {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw KVMError.cannotOpen(path: path, errno: errno) }
        let version = ioctl(fd, KVMIoctl.getAPIVersion)
        guard version == KVM_API_VERSION else {
            close(fd)
            throw version < 0 ? KVMError.ioctlFailed(name: "KVM_GET_API_VERSION", errno: errno)
                              : KVMError.unsupportedAPIVersion(path: path, version: version)
        }
        self.path = path
        self.fd = fd
    }

    deinit { close(fd) }

    /// KVM_CHECK_EXTENSION: 0 when the capability is absent, otherwise a capability-specific value.
    public func checkExtension(_ cap: Int32) -> Int32 {
        max(0, ioctl(fd, KVMIoctl.checkExtension, cap))
    }

    /// The leaves this KVM can expose (KVM_GET_SUPPORTED_CPUID), to give the guest a sane CPUID:
    /// KVM refuses EFER.LME in KVM_SET_SREGS unless the guest's CPUID has long mode.
    public func supportedCPUID() throws -> [KVMCPUIDEntry] {
        var capacity = 256
        while true {
            let buffer = CPUIDBuffer(capacity: capacity)
            // KVM writes at most `nent` entries into the buffer, which holds that many.
            if ioctl(fd, KVMIoctl.getSupportedCPUID, buffer.raw) == 0 { return buffer.entries() }
            let e = errno
            // E2BIG: more leaves than room; KVM says nothing about how many, so double and retry.
            guard e == E2BIG, capacity < 1 << 14 else { throw KVMError.ioctlFailed(name: "KVM_GET_SUPPORTED_CPUID", errno: e) }
            capacity *= 2
        }
    }

    /// KVM_CREATE_VM, then `memoryBytes` of anonymous memory as slot 0 at guest-physical 0.
    public func createVM(memoryBytes: Int) throws -> KVMVirtualMachine {
        let vmfd = ioctl(fd, KVMIoctl.createVM, Int32(0))
        guard vmfd >= 0 else { throw KVMError.ioctlFailed(name: "KVM_CREATE_VM", errno: errno) }
        let runSize = ioctl(fd, KVMIoctl.getVCPUMmapSize)
        guard runSize > 0 else {
            let e = errno
            close(vmfd)
            throw KVMError.ioctlFailed(name: "KVM_GET_VCPU_MMAP_SIZE", errno: e)
        }
        return try KVMVirtualMachine(fd: vmfd, memoryBytes: memoryBytes, runMapSize: Int(runSize), device: self)
    }
}

// MARK: - VM

/// A KVM VM with one memory slot: guest-physical [0, memoryBytes), backed by private anonymous
/// memory this process maps.
public final class KVMVirtualMachine {
    let fd: Int32
    public let memoryBytes: Int
    let runMapSize: Int
    // Keeps /dev/kvm open as long as the VM is: capability checks go through it.
    let device: KVMDevice
    // The guest's RAM; valid from init to deinit (KVM maps the same pages for the guest).
    private let memory: UnsafeMutableRawPointer

    fileprivate init(fd: Int32, memoryBytes: Int, runMapSize: Int, device: KVMDevice) throws {
        // Private and anonymous: only this process and its guest see it; NORESERVE keeps it sparse.
        let p = mmap(nil, memoryBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != MAP_FAILED else {
            let e = errno
            close(fd)
            throw KVMError.mapFailed(what: "guest memory", bytes: memoryBytes, errno: e)
        }
        var region = kvm_userspace_memory_region(slot: 0, flags: 0, guest_phys_addr: 0,
                                                 memory_size: UInt64(memoryBytes),
                                                 userspace_addr: UInt64(UInt(bitPattern: p)))
        // The ioctl reads the struct during the call only.
        guard ioctl(fd, KVMIoctl.setUserMemoryRegion, &region) == 0 else {
            let e = errno
            munmap(p, memoryBytes)
            close(fd)
            throw KVMError.ioctlFailed(name: "KVM_SET_USER_MEMORY_REGION", errno: e)
        }
        self.fd = fd; self.memoryBytes = memoryBytes; self.runMapSize = runMapSize
        self.device = device; self.memory = p
    }

    deinit {
        close(fd)
        munmap(memory, memoryBytes)
    }

    private func check(_ gpa: UInt64, _ length: Int) throws {
        guard gpa <= UInt64(memoryBytes), UInt64(length) <= UInt64(memoryBytes) - gpa else {
            throw KVMError.outsideGuestMemory(gpa: gpa, length: length, memoryBytes: memoryBytes)
        }
    }

    public func write(_ bytes: [UInt8], at gpa: UInt64) throws {
        try check(gpa, bytes.count)
        bytes.withUnsafeBytes { src in
            guard let s = src.baseAddress else { return }
            // In bounds (checked above); the guest is stopped, so nobody else writes these bytes.
            (memory + Int(gpa)).copyMemory(from: s, byteCount: src.count)
        }
    }

    public func load64(at gpa: UInt64) throws -> UInt64 {
        try check(gpa, 8)
        // In bounds (checked above); unaligned-safe read of what the guest stored.
        return (memory + Int(gpa)).loadUnaligned(as: UInt64.self)
    }

    public func store64(_ value: UInt64, at gpa: UInt64) throws {
        try check(gpa, 8)
        // In bounds (checked above).
        (memory + Int(gpa)).storeBytes(of: value, as: UInt64.self)
    }

    /// KVM_CAP_X86_USER_SPACE_MSR with KVM_MSR_EXIT_REASON_FILTER: an RDMSR/WRMSR the MSR filter
    /// denies exits to userspace (KVM_EXIT_X86_RDMSR/WRMSR) instead of injecting #GP.
    public func enableUserSpaceMSRExitsOnFilter() throws {
        guard device.checkExtension(KVM_CAP_X86_USER_SPACE_MSR) != 0 else {
            throw KVMError.missingCapability(name: "KVM_CAP_X86_USER_SPACE_MSR")
        }
        var cap = kvm_enable_cap()
        cap.cap = UInt32(KVM_CAP_X86_USER_SPACE_MSR)
        cap.args.0 = UInt64(KVM_MSR_EXIT_REASON_FILTER)
        // The ioctl reads the struct during the call only.
        guard ioctl(fd, KVMIoctl.enableCap, &cap) == 0 else {
            throw KVMError.ioctlFailed(name: "KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)", errno: errno)
        }
    }

    /// KVM_X86_SET_MSR_FILTER: allow every MSR access except reads of `index`.
    public func denyReads(ofMSR index: UInt32) throws {
        guard device.checkExtension(KVM_CAP_X86_MSR_FILTER) != 0 else {
            throw KVMError.missingCapability(name: "KVM_CAP_X86_MSR_FILTER")
        }
        // One range of one MSR; its bitmap bit is 0, which means "deny".
        var bitmap: UInt8 = 0
        let rc = withUnsafeMutablePointer(to: &bitmap) { bits -> Int32 in
            var filter = kvm_msr_filter()
            filter.flags = UInt32(KVM_MSR_FILTER_DEFAULT_ALLOW)
            filter.ranges.0 = kvm_msr_filter_range(flags: UInt32(KVM_MSR_FILTER_READ), nmsrs: 1, base: index, bitmap: bits)
            // KVM copies the filter and its bitmap during the call; `bits` outlives it.
            return ioctl(fd, KVMIoctl.setMSRFilter, &filter)
        }
        guard rc == 0 else { throw KVMError.ioctlFailed(name: "KVM_X86_SET_MSR_FILTER", errno: errno) }
    }

    /// KVM_CREATE_VCPU and the mapping of its kvm_run page.
    public func createVCPU(id: Int32 = 0) throws -> KVMVCPU {
        let vcpufd = ioctl(fd, KVMIoctl.createVCPU, id)
        guard vcpufd >= 0 else { throw KVMError.ioctlFailed(name: "KVM_CREATE_VCPU", errno: errno) }
        return try KVMVCPU(fd: vcpufd, runMapSize: runMapSize, vm: self)
    }
}

// MARK: - vCPU

/// One vCPU: its registers, its CPUID, and KVM_RUN with the exit decoded from kvm_run.
public final class KVMVCPU {
    let fd: Int32
    // Keeps the VM (and the guest memory its code runs in) alive as long as the vCPU.
    let vm: KVMVirtualMachine
    let runMapSize: Int
    // The kvm_run page KVM shares with this process; valid from init to deinit.
    private let page: UnsafeMutableRawPointer
    // Set while `withTimeLimit` runs.
    private var watchdog: Watchdog?

    // kvm_run's exit union has no name, so Swift cannot take its offset (`offset(of: \.io)` is
    // nil: `io` is a computed view). In the uAPI layout the union directly follows `apic_base`,
    // at the union's alignment. Members' offsets inside their own structs come from MemoryLayout.
    private typealias ExitUnion = kvm_run.__Unnamed_union___Anonymous_field9
    private typealias IOExit = ExitUnion.__Unnamed_struct_io
    private typealias MSRExit = ExitUnion.__Unnamed_struct_msr
    private typealias FailEntry = ExitUnion.__Unnamed_struct_fail_entry
    private typealias InternalExit = ExitUnion.__Unnamed_struct_internal
    private static let exitReasonOffset = MemoryLayout<kvm_run>.offset(of: \kvm_run.exit_reason)!
    static let exitUnionOffset: Int = {
        let afterApicBase = MemoryLayout<kvm_run>.offset(of: \kvm_run.apic_base)! + 8
        let a = MemoryLayout<ExitUnion>.alignment
        return (afterApicBase + a - 1) / a * a
    }()
    private static let ioDirection = exitUnionOffset + MemoryLayout<IOExit>.offset(of: \IOExit.direction)!
    private static let ioSize = exitUnionOffset + MemoryLayout<IOExit>.offset(of: \IOExit.size)!
    private static let ioPort = exitUnionOffset + MemoryLayout<IOExit>.offset(of: \IOExit.port)!
    private static let ioCount = exitUnionOffset + MemoryLayout<IOExit>.offset(of: \IOExit.count)!
    private static let ioDataOffset = exitUnionOffset + MemoryLayout<IOExit>.offset(of: \IOExit.data_offset)!
    static let msrError = exitUnionOffset + MemoryLayout<MSRExit>.offset(of: \MSRExit.error)!
    private static let msrReason = exitUnionOffset + MemoryLayout<MSRExit>.offset(of: \MSRExit.reason)!
    static let msrIndex = exitUnionOffset + MemoryLayout<MSRExit>.offset(of: \MSRExit.index)!
    static let msrData = exitUnionOffset + MemoryLayout<MSRExit>.offset(of: \MSRExit.data)!
    private static let failEntryReason = exitUnionOffset + MemoryLayout<FailEntry>.offset(of: \FailEntry.hardware_entry_failure_reason)!
    private static let internalSuberror = exitUnionOffset + MemoryLayout<InternalExit>.offset(of: \InternalExit.suberror)!

    fileprivate init(fd: Int32, runMapSize: Int, vm: KVMVirtualMachine) throws {
        // MAP_SHARED: the page is KVM's; it writes exit information there on every return.
        let p = mmap(nil, runMapSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let p, p != MAP_FAILED else {
            let e = errno
            close(fd)
            throw KVMError.mapFailed(what: "kvm_run", bytes: runMapSize, errno: e)
        }
        self.fd = fd; self.vm = vm; self.runMapSize = runMapSize; self.page = p
    }

    deinit {
        munmap(page, runMapSize)
        close(fd)
    }

    /// This vCPU's binary statistics (KVM_GET_STATS_FD, 5.14+): counter name -> value, the
    /// cumulative single-value ones (`exits`, `io_exits`, `halt_exits`...). Throws if the kernel has none.
    public func statistics() throws -> [String: UInt64] {
        var out: [String: UInt64] = [:]
        for s in try KVMStatsReader.read(owner: fd) where s.kind == .cumulative {
            if let v = s.value { out[s.name] = v }
        }
        return out
    }

    // Reads a field of kvm_run at a fixed offset inside the mapped page (offsets computed above).
    @inline(__always) private func field<T: FixedWidthInteger>(_ offset: Int, _: T.Type) -> T {
        // In the page (offsets are inside struct kvm_run, smaller than the mapping); the kernel
        // writes it only while KVM_RUN is in progress, and this thread is the one running it.
        (page + offset).loadUnaligned(as: T.self)
    }

    public func setCPUID(_ entries: [KVMCPUIDEntry]) throws {
        let buffer = CPUIDBuffer(entries: entries)
        // KVM reads `nent` entries, all inside the buffer, during the call only.
        guard ioctl(fd, KVMIoctl.setCPUID2, buffer.raw) == 0 else {
            throw KVMError.ioctlFailed(name: "KVM_SET_CPUID2", errno: errno)
        }
    }

    /// KVM_GET_SREGS, the fields of `state` written over it, KVM_SET_SREGS.
    public func setSystemState(_ state: KVMSystemState) throws {
        var s = kvm_sregs()
        // Both calls copy one whole kvm_sregs out of or into `s`, during the call only.
        guard ioctl(fd, KVMIoctl.getSregs, &s) == 0 else { throw KVMError.ioctlFailed(name: "KVM_GET_SREGS", errno: errno) }
        s.cr0 = state.cr0; s.cr3 = state.cr3; s.cr4 = state.cr4; s.efer = state.efer
        s.gdt.base = state.gdtBase; s.gdt.limit = state.gdtLimit
        s.cs = Self.segment(state.code)
        let d = Self.segment(state.data)
        s.ds = d; s.es = d; s.fs = d; s.gs = d; s.ss = d
        guard ioctl(fd, KVMIoctl.setSregs, &s) == 0 else { throw KVMError.ioctlFailed(name: "KVM_SET_SREGS", errno: errno) }
    }

    private static func segment(_ s: KVMSegment) -> kvm_segment {
        var k = kvm_segment()
        k.base = s.base; k.limit = s.limit; k.selector = s.selector; k.type = s.type
        k.present = s.present ? 1 : 0; k.dpl = s.dpl; k.db = s.db ? 1 : 0
        k.s = s.s ? 1 : 0; k.l = s.l ? 1 : 0; k.g = s.g ? 1 : 0
        return k
    }

    public func registers() throws -> KVMRegisters {
        var k = kvm_regs()
        // KVM fills one kvm_regs during the call only.
        guard ioctl(fd, KVMIoctl.getRegs, &k) == 0 else { throw KVMError.ioctlFailed(name: "KVM_GET_REGS", errno: errno) }
        var r = KVMRegisters()
        r.rax = k.rax; r.rbx = k.rbx; r.rcx = k.rcx; r.rdx = k.rdx
        r.rsi = k.rsi; r.rdi = k.rdi; r.rsp = k.rsp; r.rbp = k.rbp
        r.r8 = k.r8; r.r9 = k.r9; r.r10 = k.r10; r.r11 = k.r11
        r.r12 = k.r12; r.r13 = k.r13; r.r14 = k.r14; r.r15 = k.r15
        r.rip = k.rip; r.rflags = k.rflags
        return r
    }

    public func setRegisters(_ r: KVMRegisters) throws {
        var k = kvm_regs(rax: r.rax, rbx: r.rbx, rcx: r.rcx, rdx: r.rdx, rsi: r.rsi, rdi: r.rdi,
                         rsp: r.rsp, rbp: r.rbp, r8: r.r8, r9: r.r9, r10: r.r10, r11: r.r11,
                         r12: r.r12, r13: r.r13, r14: r.r14, r15: r.r15, rip: r.rip, rflags: r.rflags)
        // KVM reads one kvm_regs during the call only.
        guard ioctl(fd, KVMIoctl.setRegs, &k) == 0 else { throw KVMError.ioctlFailed(name: "KVM_SET_REGS", errno: errno) }
    }

    /// KVM_RUN until the guest exits to userspace (a signal's EINTR is retried), and the exit.
    public func run() throws -> KVMExit {
        while ioctl(fd, KVMIoctl.run) != 0 {
            let e = errno
            guard e == EINTR || e == EAGAIN else { throw KVMError.ioctlFailed(name: "KVM_RUN", errno: e) }
            if let w = watchdog, w.fired { return .timedOut }
        }
        let reason = field(Self.exitReasonOffset, UInt32.self)
        switch Int32(bitPattern: reason) {
        case KVM_EXIT_IO:
            let size = field(Self.ioSize, UInt8.self)
            let dataOffset = Int(field(Self.ioDataOffset, UInt64.self))
            var data: UInt32 = 0
            // KVM puts the data inside the mapped page (data_offset < the mmap size); read at most 4 bytes.
            if dataOffset + 4 <= runMapSize { data = field(dataOffset, UInt32.self) }
            data &= UInt32(truncatingIfNeeded: AccessSize.mask(UInt64(size)))
            return .io(port: field(Self.ioPort, UInt16.self),
                       isOut: Int32(field(Self.ioDirection, UInt8.self)) == KVM_EXIT_IO_OUT,
                       size: size, count: field(Self.ioCount, UInt32.self), data: data)
        case KVM_EXIT_HLT:
            return .hlt
        case KVM_EXIT_X86_RDMSR:
            return .rdmsr(index: field(Self.msrIndex, UInt32.self), reason: field(Self.msrReason, UInt32.self))
        case KVM_EXIT_X86_WRMSR:
            return .wrmsr(index: field(Self.msrIndex, UInt32.self), data: field(Self.msrData, UInt64.self),
                          reason: field(Self.msrReason, UInt32.self))
        case KVM_EXIT_SHUTDOWN:
            return .shutdown
        case KVM_EXIT_FAIL_ENTRY:
            return .failEntry(hardwareReason: field(Self.failEntryReason, UInt64.self))
        case KVM_EXIT_INTERNAL_ERROR:
            return .internalError(suberror: field(Self.internalSuberror, UInt32.self))
        default:
            return .other(reason: reason)
        }
    }

    /// Runs `body` (which calls `run()`) with a time limit: once `nanos` have passed, `run()`
    /// returns `.timedOut` instead of waiting for a guest that never exits, e.g. an instruction
    /// some layer below handles forever. One limit per measurement loop, not per KVM_RUN, so the
    /// timed exits pay nothing for it.
    public func withTimeLimit<R>(nanos: UInt64, _ body: () throws -> R) rethrows -> R {
        let w = Watchdog(page: page)
        watchdog = w
        defer { w.disarm(); watchdog = nil }
        w.arm(after: nanos)
        return try body()
    }

    /// Completes a KVM_EXIT_X86_RDMSR: the guest's RDMSR returns `value` in EDX:EAX on the next
    /// run (or takes #GP if `fault`).
    public func answerRDMSR(_ value: UInt64, fault: Bool = false) {
        // kvm_run fields at fixed offsets in the mapped page; KVM reads them on the next KVM_RUN.
        (page + Self.msrData).storeBytes(of: value, as: UInt64.self)
        (page + Self.msrError).storeBytes(of: fault ? 1 : 0, as: UInt8.self)
    }
}

// MARK: - time limit

/// Stops a KVM_RUN that does not return by a deadline, the way the KVM API documents: set
/// kvm_run.immediate_exit (so a KVM_RUN not yet entered returns EINTR at once) and send the vCPU
/// thread a signal (so one in progress returns EINTR). The signal is SIGUSR2, with an empty
/// handler installed without SA_RESTART; nothing else in pvm uses SIGUSR2. It is unblocked on the
/// vCPU thread while armed: libdispatch blocks every signal on its worker threads, and Swift
/// concurrency (the test runner, say) may well run the caller on one.
private final class Watchdog: @unchecked Sendable {
    // armed -> firing -> fired, or armed -> disarmed: whoever wins the CAS from `armed` decides.
    private static let armed = 0, firing = 1, firedState = 2, disarmed = 3
    private let state = ManagedAtomic<Int>(armed)
    // The vCPU's kvm_run page: written here only after winning the CAS, and `disarm` waits for
    // that write to finish while the vCPU (and its mapping) is alive.
    private let page: UnsafeMutableRawPointer
    private let thread: pthread_t
    // Touched only by the vCPU thread (init, arm, disarm).
    private var kick: DispatchWorkItem?
    private var savedMask = sigset_t()
    private static let immediateExit = MemoryLayout<kvm_run>.offset(of: \kvm_run.immediate_exit)!
    // A serial queue of its own: libdispatch runs serial queues on its overcommitting pool, which
    // starts a thread when none is free; the global concurrent queue is only CPU-count wide, and
    // the caller may be occupying one of its threads in KVM_RUN.
    private static let queue = DispatchQueue(label: "pvm.kvm.time-limit")
    private static let handlerInstalled: Bool = {
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in }   // there only to interrupt KVM_RUN
        sigemptyset(&action.sa_mask)
        action.sa_flags = 0                                  // no SA_RESTART: KVM_RUN returns EINTR
        return sigaction(SIGUSR2, &action, nil) == 0
    }()

    /// On the vCPU thread.
    init(page: UnsafeMutableRawPointer) {
        self.page = page
        self.thread = pthread_self()
        _ = Self.handlerInstalled
    }

    var fired: Bool { state.load(ordering: .acquiring) == Self.firedState }

    func arm(after nanos: UInt64) {
        var usr2 = sigset_t()
        sigemptyset(&usr2)
        sigaddset(&usr2, SIGUSR2)
        pthread_sigmask(SIG_UNBLOCK, &usr2, &savedMask)
        let k = DispatchWorkItem { [self] in
            guard state.compareExchange(expected: Self.armed, desired: Self.firing, ordering: .acquiringAndReleasing).exchanged else { return }
            // kvm_run.immediate_exit: KVM reads it on entry to KVM_RUN.
            (page + Self.immediateExit).storeBytes(of: 1, as: UInt8.self)
            pthread_kill(thread, SIGUSR2)
            state.store(Self.firedState, ordering: .releasing)
        }
        kick = k
        Self.queue.asyncAfter(deadline: .now() + .nanoseconds(Int(min(nanos, UInt64(Int.max)))), execute: k)
    }

    func disarm() {
        kick?.cancel()
        if !state.compareExchange(expected: Self.armed, desired: Self.disarmed, ordering: .acquiringAndReleasing).exchanged {
            // It fired (or is firing): wait until the signal is sent (each sched_yield returns
            // through the kernel, which delivers it to the empty handler), then clear immediate_exit.
            while state.load(ordering: .acquiring) != Self.firedState { sched_yield() }
            sched_yield()
            (page + Self.immediateExit).storeBytes(of: 0, as: UInt8.self)
        }
        pthread_sigmask(SIG_SETMASK, &savedMask, nil)
    }
}

// MARK: - kvm_cpuid2 buffers

/// A struct kvm_cpuid2 with room for `capacity` entries after its header (a flexible array member,
/// which Swift imports as an empty field: the entries are laid out by hand at the header's size).
private final class CPUIDBuffer {
    let raw: UnsafeMutableRawPointer
    let capacity: Int
    private static let header = MemoryLayout<kvm_cpuid2>.size
    private static let stride = MemoryLayout<kvm_cpuid_entry2>.stride

    init(capacity: Int) {
        self.capacity = capacity
        let bytes = Self.header + capacity * Self.stride
        // Owned by this object; zeroed so padding and unused entries are 0, as KVM expects.
        raw = .allocate(byteCount: bytes, alignment: MemoryLayout<kvm_cpuid_entry2>.alignment)
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        raw.storeBytes(of: UInt32(capacity), as: UInt32.self)   // nent
    }

    convenience init(entries: [KVMCPUIDEntry]) {
        self.init(capacity: entries.count)
        for (i, e) in entries.enumerated() {
            let k = kvm_cpuid_entry2(function: e.function, index: e.index, flags: e.flags,
                                     eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx, padding: (0, 0, 0))
            // Entry i of `capacity` (allocated above).
            (raw + Self.header + i * Self.stride).storeBytes(of: k, as: kvm_cpuid_entry2.self)
        }
    }

    deinit { raw.deallocate() }

    /// The entries KVM filled in; it rewrites nent with how many.
    func entries() -> [KVMCPUIDEntry] {
        let n = min(Int(raw.load(as: UInt32.self)), capacity)
        return (0..<n).map { i in
            // Entry i < nent <= capacity: inside the allocation.
            let k = (raw + Self.header + i * Self.stride).load(as: kvm_cpuid_entry2.self)
            return KVMCPUIDEntry(function: k.function, index: k.index, flags: k.flags,
                                 eax: k.eax, ebx: k.ebx, ecx: k.ecx, edx: k.edx)
        }
    }
}
