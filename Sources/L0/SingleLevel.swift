import ABI
import GuestDevices
import Transport

/// The one-level baseline (`single`): the guest program runs directly on L0, as a KVM guest runs
/// on KVM plus its VMM. L0 maps the guest's RAM up front, answers CPUID from the same table,
/// passes the same MSRs through, runs its in-kernel port device, and serves everything else with
/// the same device model L1 uses for L2, so the guest sees the same answers on every path.
public enum SingleLevel {
    /// The guest's RAM: guest-physical [0, 128 MiB), backed where L1 puts L2's RAM on the nested
    /// paths (L1 GPA 0x1000_0000), so a test can read the guest's bytes at one address on any path.
    public static let ramBacking = L1GPA(0x1000_0000)
    public static let ramSize: UInt64 = 128 << 20
    public static let entryRIP: UInt64 = 0x10_0000
    public static let stackTop: UInt64 = 0x80_0000
}

extension L0VCPU {
    /// Maps the guest's RAM, opens the pass-through MSRs, and sets the first registers.
    public func prepareSingleLevelGuest() throws {
        var off: UInt64 = 0
        while off < SingleLevel.ramSize {
            let l1 = L1GPA(SingleLevel.ramBacking.raw + off)
            let host = try l1Memory.memslots.translate(l1, length: pageSize)
            let slot = l1Memory.memslots.slot(containing: l1)!.slot
            ept02.install(L2GPA(off), host: host, permissions: EPT.rwxMask, memslot: slot)
            off += pageSize
        }
        for msr in PassthroughMSRs.all {
            setL2Intercept(msr, write: false, false)
            setL2Intercept(msr, write: true, false)
        }
        l2Run[register: .rip] = SingleLevel.entryRIP
        l2Run[register: .rsp] = SingleLevel.stackTop
        l2Run[register: .rflags] = 0x2
        l2Requested = true
    }

    /// Every exit of a one-level guest stays in L0.
    func handleSingleLevelExit(_ exit: GuestExit) -> L2ExitOutcome {
        var regs = l2Run
        switch exit.reason {
        case .ioInstruction where IOQualification.port(exit.qualification) == Ucall.port
                                 || l0Devices.owns(IOQualification.port(exit.qualification)):
            return handleL0PortIO(exit)
        case .msrRead where PassthroughMSRs.slot(of: UInt32(truncatingIfNeeded: l2Run[register: .rcx])) != nil,
             .msrWrite where PassthroughMSRs.slot(of: UInt32(truncatingIfNeeded: l2Run[register: .rcx])) != nil:
            return handleL0MSR(exit)
        case .vmcall:
            guestDevices.l2Hypercall(&regs, isRAM: { $0.raw < SingleLevel.ramSize }) { gpa in
                ept02.remove(gpa, length: pageSize)
            }
        case .eptViolation where exit.guestPhysicalAddress < SingleLevel.ramSize && !guestDevices.isBallooned(L2GPA(exit.guestPhysicalAddress)):
            return .stop(.fatal("one-level guest faulted at \(L2GPA(exit.guestPhysicalAddress)), inside RAM L0 mapped"))
        default:
            guard guestDevices.emulate(exit.reason, qualification: exit.qualification, accessSize: Int(exit.instructionInfo),
                                       gpa: exit.guestPhysicalAddress, &regs) else {
                return .stop(.fatal("one-level guest exit \(exit.reason) has no handler"))
            }
        }
        skipL2Instruction(exit)
        return .resumeL2
    }
}
