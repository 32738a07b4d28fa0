import ABI
import GuestDevices
import Transport

/// The one-level baseline (`single`): the guest program runs directly on L0, as a KVM guest runs
/// on KVM plus its VMM. L0 maps the guest's RAM up front, answers CPUID from the same table,
/// passes the same MSRs through, runs its in-kernel port device, and serves everything else with
/// the same device model L1 uses for L2, so the guest sees the same answers on every path.
public final class SingleLevelBackend: NestingBackend {
    /// The guest's RAM: guest-physical [0, 128 MiB), backed where L1 puts L2's RAM on the nested
    /// paths (L1 GPA 0x1000_0000), so a test can read the guest's bytes at one address on any path.
    public static let ramBacking = L1GPA(0x1000_0000)
    public static let ram = AddressRange(start: L2GPA(0), length: 128 << 20)!
    public static let entryRIP: UInt64 = 0x10_0000
    public static let stackTop: UInt64 = 0x80_0000

    /// The device model L0's userspace runs for a one-level guest.
    public var devices = L1Devices()

    public init() {}

    public var hasL2VCPU: Bool { true }
    public var runsL1: Bool { false }

    /// Maps the guest's RAM, opens the pass-through MSRs, sets the first registers; the guest
    /// runs first.
    public func start(_ vcpu: L0VCPU, l2 regs: inout RegisterFile) throws -> NextStep {
        // L0's own 1:1 backing of the guest's RAM: one memslot range, translated once, for the
        // VM (EPT02 is one table for every vCPU: vCPU 0 maps it).
        if vcpu.id == 0 { try mapRAM(vcpu) }
        vcpu.enableLocalAPICs(count: vcpu.control.layout.vcpuCount)
        for msr in PassthroughMSRs.all { vcpu.setL2Intercept(msr, false) }
        regs[.rip] = Self.entryRIP
        regs[.rsp] = Self.stackTop
        regs[.rflags] = 0x2
        return .enterL2
    }

    func mapRAM(_ vcpu: L0VCPU) throws {
        let host = try vcpu.l1Memory.memslots.translate(Self.ramBacking, length: Self.ram.length)
        let slot = vcpu.l1Memory.memslots.slot(containing: Self.ramBacking)!.slot
        vcpu.ept02.install(Self.ram, host: host, permissions: EPT.rwxMask, memslot: slot)
    }

    /// Every exit of a one-level guest stays in L0.
    public func handleL2Exit(_ exit: L2Exit, _ regs: inout RegisterFile, _ vcpu: L0VCPU) -> NextStep {
        // KVM's in-kernel local APIC, PV IPIs and TLB flushes, HLT until an interrupt, kicks.
        if let next = vcpu.handleInterruptExit(exit, &regs, apic: true, flushHypercall: true) { return next }
        switch exit.kind {
        case .io(let io) where io.port == Ucall.port || vcpu.l0Devices.owns(io.port):
            return vcpu.handleL0PortIO(io, exit, &regs)
        case .msrRead(let msr) where PassthroughMSRs.contains(msr), .msrWrite(let msr, _) where PassthroughMSRs.contains(msr):
            return vcpu.handleL0MSR(exit, &regs)
        case .vmcall:
            devices.l2Hypercall(&regs, isRAM: { Self.ram.contains($0) }) { gpa in vcpu.ept02.remove(page: gpa) }
        case .eptViolation(let gpa, _, _) where Self.ram.contains(gpa) && !devices.isBallooned(gpa):
            return .stop(.fatal(.singleLevelFault(gpa)))
        case .eptViolation:
            // Not RAM: the xAPIC page is L0's in-kernel APIC; anything else, its VMM's MMIO.
            if let next = vcpu.handleAPICPageAccess(exit, &regs) { return next }
            fallthrough
        default:
            guard devices.emulate(exit.info.reason, qualification: exit.info.qualification, accessSize: exit.info.instructionInfo,
                                  gpa: exit.info.guestPhysicalAddress, &regs) else {
                return .stop(.fatal(.unhandledL2Exit(exit.info.reason)))
            }
            // Ports and MMIO go to L0's own VMM (KVM_EXIT_IO / KVM_EXIT_MMIO and back); the
            // instructions KVM emulates in its kernel (CPUID, HLT, MSRs) do not.
            switch exit.kind {
            case .io, .eptViolation: vcpu.counters.vmmUserspaceExits += 1
            default: break
            }
        }
        regs.skipInstruction(length: exit.info.instructionLength)
        return .resume(.l2)
    }

    /// There is no L1 on one level.
    public func handleL1Exit(_ exit: L1Exit, _ regs: inout RegisterFile, _ vcpu: L0VCPU) -> NextStep {
        .stop(.fatal(.unhandledL1Exit(exit.info.reason)))
    }

    /// The guest's RAM is L0's own: nothing derived beyond EPT02, which the core zapped.
    public func memoryRemoved(_ range: AddressRange<L1GPA>, slot: UInt32, fastZap: Bool, _ vcpu: L0VCPU) {}
}
