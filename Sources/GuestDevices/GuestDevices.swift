import ABI
import Transport

/// L2's registers as an L1 personality holds them: the PV exit page, or KVM's saved copy.
public protocol GuestRegisterFile {
    subscript(_ r: Register) -> UInt64 { get set }
}

extension RunPageView: GuestRegisterFile {
    public subscript(_ r: Register) -> UInt64 {
        get { self[register: r] }
        set { self[register: r] = newValue }
    }
}

extension RegisterFile: GuestRegisterFile {}

/// KVM's vcpu->arch.regs: L2's registers saved at a VM exit and loaded before the next entry.
public struct SavedGuestRegisters: GuestRegisterFile {
    public var values = [UInt64](repeating: 0, count: Register.count)
    public init() {}
    public subscript(_ r: Register) -> UInt64 {
        get { values[r.rawValue] }
        set { values[r.rawValue] = newValue }
    }
}

/// The devices L1 emulates for its L2 (its "QEMU"): a 16550-style serial console whose output
/// the user sees, a latch at port 0x1234, L2's MSRs, and unassigned memory that reads as all
/// ones; plus the instructions both personalities complete the same way. Only how L1 gets the
/// exit and skips the instruction differs between them.
public struct L1Devices {
    public static let serialBase: UInt16 = 0x3F8
    public static let serialPorts: ClosedRange<UInt16> = 0x3F8...0x3FF
    var line: [UInt8] = []
    /// L2's MSRs as L1 emulates them (unset ones read as 0).
    var msrs: [UInt32: UInt64] = [:]
    /// L2's control and debug registers as its hypervisor keeps them.
    public var controlRegisters = GuestControlRegisters()

    public init() {}

    /// A device in L1's device model (its "QEMU"): a 32-bit latch, vmexit.c's inl_from_qemu port.
    public static let qemuPorts: ClosedRange<UInt16> = 0x1234...0x1237
    var qemuLatch: UInt64 = 0

    /// A device in L1's device model at an MMIO address of L2's (vmexit.c's "pci-mem" kind): a
    /// 32-bit latch, reached by an access that no memory backs.
    public static let mmioDevice = AddressRange(start: L2GPA(0xFEB0_0000), length: pageSize)!
    var mmioLatch: UInt64 = 0

    /// The ACPI PM timer of the VMM's chipset (PIIX4's PMBASE 0xB000 + 8, vmexit.c's
    /// inl_from_pmtimer): a 24-bit counter at 3.579545 MHz, read from the host clock.
    public static let pmTimerPort: UInt16 = 0xB008

    /// The PM timer's 24-bit count at a clock reading: split so no product overflows (the
    /// naive `nanos * 3_579_545` passes 2^64 after 86 minutes of uptime).
    public static func pmTimerTicks(atNanos t: UInt64) -> UInt64 {
        let hz: UInt64 = 3_579_545, perSecond: UInt64 = 1_000_000_000
        return ((t / perSecond) &* hz &+ (t % perSecond) * hz / perSecond) & 0xFF_FFFF
    }

    public func owns(port: UInt16) -> Bool {
        Self.serialPorts.contains(port) || Self.qemuPorts.contains(port) || port == Self.pmTimerPort
    }

    /// A device in the hypervisor's kernel, not its VMM (vmexit.c's inl_from_kernel /
    /// outl_to_kernel port, the PIC's ELCR on a PC): a latch. A KVM-like L1 completes these in
    /// its kernel with no trip to its userspace.
    public static let kernelPorts: ClosedRange<UInt16> = 0x4D0...0x4D1
    var kernelLatch: UInt64 = 0

    /// Port I/O L1 owns: returns the value for an IN.
    public mutating func portIO(port: UInt16, isIn: Bool, value: UInt64) -> UInt64 {
        if Self.kernelPorts.contains(port) {
            if isIn { return kernelLatch }
            kernelLatch = value
            return 0
        }
        guard owns(port: port) else { return ~0 }
        if port == Self.pmTimerPort { return isIn ? Self.pmTimerTicks(atNanos: monotonicNanos()) : 0 }
        if Self.qemuPorts.contains(port) {
            if isIn { return qemuLatch }
            qemuLatch = value
            return 0
        }
        switch (port - Self.serialBase, isIn) {
        case (0, false):                     // THR: transmit one byte
            let b = UInt8(truncatingIfNeeded: value)
            if b == 0x0A {
                writeOut("[L2 serial] " + String(decoding: line, as: UTF8.self) + "\n")
                line.removeAll()
            } else {
                line.append(b)
            }
            return 0
        case (5, true):                      // LSR: transmitter empty and holding register empty
            return 0x60
        default:
            return 0
        }
    }

    public func rdmsr(_ msr: UInt32) -> UInt64 { msrs[msr] ?? 0 }
    public mutating func wrmsr(_ msr: UInt32, _ value: UInt64) { msrs[msr] = value }

    /// L2 GPA pages L2 gave back (ballooned): L1 will not map them again.
    public private(set) var ballooned: Set<UInt64> = []
    public mutating func balloon(_ gpa: L2GPA) { ballooned.insert(gpa.pageNumber) }
    public func isBallooned(_ gpa: L2GPA) -> Bool { ballooned.contains(gpa.pageNumber) }

    /// Emulates an exit both personalities handle alike, leaving the result in `regs`; false if
    /// `reason` is not one of them. The caller skips the instruction.
    public mutating func emulate(_ reason: ExitReason, qualification q: UInt64, accessSize: UInt64, gpa: L2GPA = L2GPA(0),
                                 _ regs: inout some GuestRegisterFile) -> Bool {
        switch reason {
        case .ioInstruction:
            let v = portIO(port: IOQualification.port(q), isIn: IOQualification.isIn(q), value: regs[.rax])
            if IOQualification.isIn(q) { regs[.rax] = v }
        case .msrRead:
            (regs[.rdx], regs[.rax]) = EDXEAX.split(rdmsr(UInt32(truncatingIfNeeded: regs[.rcx])))
        case .msrWrite:
            wrmsr(UInt32(truncatingIfNeeded: regs[.rcx]), EDXEAX.combine(edx: regs[.rdx], eax: regs[.rax]))
        case .cpuid:
            let (a, b, c, d) = GuestCPUIDTable.table.lookup(function: UInt32(truncatingIfNeeded: regs[.rax]),
                                                         index: UInt32(truncatingIfNeeded: regs[.rcx]))
            regs[.rax] = UInt64(a); regs[.rbx] = UInt64(b); regs[.rcx] = UInt64(c); regs[.rdx] = UInt64(d)
        case .hlt, .wbinvd:
            break
        case .crAccess:
            controlRegisters.emulateCR(qualification: q, &regs)
        case .drAccess:
            controlRegisters.emulateDR(qualification: q, &regs)
        case .eptViolation:
            // An access to memory L1 never gave L2 (the caller checked): its MMIO device, or
            // unassigned.
            let write = q & EPTViolationQualification.dataWrite != 0
            if Self.mmioDevice.contains(gpa) {
                if write { mmioLatch = regs[.rax] } else { regs[.rax] = mmioLatch }
            } else {
                let v = unassigned(isWrite: write, size: accessSize)
                if !write { regs[.rax] = v }
            }
        default:
            return false
        }
        return true
    }

    /// The guest's VMCALL: RAX number, RBX argument, result in RAX. `isRAM` says which pages the
    /// guest has; `unmap` takes a ballooned page away the hypervisor's way (a PV hypercall, an
    /// EPT12 edit + INVEPT, or L0's own EPT).
    public mutating func l2Hypercall(_ regs: inout some GuestRegisterFile, isRAM: (L2GPA) -> Bool,
                                     unmap: (L2GPA) throws -> Void) rethrows {
        guard let call = L2Hypercall(rawValue: regs[.rax]) else {
            regs[.rax] = HypercallError.noSys.returnValue
            return
        }
        switch call {
        case .balloonPage:
            let gpa = L2GPA(regs[.rbx]).pageBase
            guard isRAM(gpa) else {
                regs[.rax] = HypercallError.invalid.returnValue
                return
            }
            try unmap(gpa)
            balloon(gpa)
            regs[.rax] = 0
        case .flushTLB:
            // L0's hypercall, reaching a hypervisor that does not run L2's TLBs for it (L1 on
            // pv without `directTLBFlush`, on nvmx): not implemented there.
            regs[.rax] = HypercallError.noSys.returnValue
        }
    }

    /// An L2 access to a GPA no memory backs: reads float high, writes are dropped.
    public func unassigned(isWrite: Bool, size: UInt64) -> UInt64 {
        isWrite ? 0 : AccessSize.mask(size)
    }
}

/// L2's control and debug registers as the hypervisor that runs it keeps them: what MOV to/from
/// CR0/CR3/CR4/CR8 and MOV to/from DR exits read and write. CR8 is the TPR (4 bits).
public struct GuestControlRegisters: Sendable, Equatable {
    public var cr0 = ControlRegisterBits.initialCR0
    public var cr3: UInt64 = 0
    public var cr4 = ControlRegisterBits.initialCR4
    public var cr8: UInt64 = 0
    public var dr = [UInt64](repeating: 0, count: 8)

    public init() { dr[7] = 0x400 }

    public mutating func emulateCR(qualification q: UInt64, _ regs: inout some GuestRegisterFile) {
        guard let reg = CRAccessQualification.register(q) else { return }
        switch (CRAccessQualification.cr(q), CRAccessQualification.type(q)) {
        case (0, CRAccessQualification.movToCR): cr0 = regs[reg]
        case (3, CRAccessQualification.movToCR): cr3 = regs[reg]
        case (4, CRAccessQualification.movToCR): cr4 = regs[reg]
        case (8, CRAccessQualification.movToCR): cr8 = regs[reg] & 0xF
        case (0, CRAccessQualification.movFromCR): regs[reg] = cr0
        case (3, CRAccessQualification.movFromCR): regs[reg] = cr3
        case (4, CRAccessQualification.movFromCR): regs[reg] = cr4
        case (8, CRAccessQualification.movFromCR): regs[reg] = cr8
        default: break                 // CLTS/LMSW: not in this guest's instruction set
        }
    }

    public mutating func emulateDR(qualification q: UInt64, _ regs: inout some GuestRegisterFile) {
        guard let reg = DRAccessQualification.register(q) else { return }
        let n = Int(DRAccessQualification.dr(q))
        if DRAccessQualification.isToDR(q) { dr[n] = regs[reg] } else { regs[reg] = dr[n] }
    }
}
