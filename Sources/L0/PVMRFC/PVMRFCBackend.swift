import ABI
import Transport

/// The PVM RFC's design (`pvm-rfc`) as L0 sees it: L1 is an ordinary one-level guest. L2 runs
/// inside L1 behind L1's switcher; its exits go to L1 through the switcher lane in L1's memory
/// and never reach L0, so L0 has no L2 exit to handle, no EPT02 to build for L2 and no VMCS to
/// emulate. L0 starts L2's process with L1 (the process is L2's CPU; L1 decides when it runs),
/// handles L1's own exits (the harness calls L1 passes on), and stops the switcher lane with the
/// rest at shutdown. What the switcher and L1's shadow MMU did, L1 counts in the switcher area;
/// L0 reads it at the harness's window edges.
public final class PVMRFCBackend: NestingBackend {
    var switcher: SwitcherView?

    public init() {}

    /// L2's process exists from the start: it waits on the switcher lane until L1 enters it.
    public var hasL2VCPU: Bool { true }

    /// The vCPU whose area `switcher` is.
    var areaVCPU = 0

    public func start(_ vcpu: L0VCPU, l2 regs: inout RegisterFile) throws -> NextStep {
        areaVCPU = vcpu.id
        switcher = try Self.switcher(vcpu)
        return .resume(.l1)
    }

    /// This vCPU's switcher area in L1's memory as L0 maps it (inside L1's memslot, or nil).
    static func switcher(_ vcpu: L0VCPU) throws -> SwitcherView {
        let range = SwitcherLayout.area(of: vcpu.id)
        let area = try vcpu.l1Memory.memslots.translate(range.start, length: range.length)
        return try SwitcherView(memory: vcpu.l1Memory.host, l1Base: HostOffset(area.raw - range.start.raw), vcpu: vcpu.id)
    }

    /// L2 never exits to L0 on this path: one that says it did is not following the design.
    public func handleL2Exit(_ exit: L2Exit, _ regs: inout RegisterFile, _ vcpu: L0VCPU) -> NextStep {
        .stop(.fatal(.unhandledL2Exit(exit.info.reason)))
    }

    /// L1's own exits: the harness calls it passes on for L2. (L1 runs nothing else that exits.)
    public func handleL1Exit(_ exit: L1Exit, _ regs: inout RegisterFile, _ vcpu: L0VCPU) -> NextStep {
        guard exit.info.reason == .ioInstruction, IOQualification.port(exit.info.qualification) == Ucall.port,
              let switcher else {
            return .stop(.fatal(.unhandledL1Exit(exit.info.reason)))
        }
        let next = vcpu.handleForwardedUcall(blockGPA: L1GPA(regs[.rdi]), switcher: switcher)
        if case .stop = next { return next }
        regs.skipInstruction(length: exit.info.instructionLength)
        return next
    }

    /// L1's entries into L2 through the switcher, as L1 counted them.
    public var progressOutsideL0: UInt64 { switcher?[SwitcherLayout.counter(.entries)] ?? 0 }

    /// L1 holds L0's turn while L1 and L2 run; the switcher lane says which of them has it.
    public func holder(of tier: Tier) -> Tier { tier == .l1 ? switcher?.turnHolder ?? tier : tier }

    /// L1's memory went: the switcher area may have gone with it (L1's own business; L0 only
    /// stops reading it).
    public func memoryRemoved(_ range: AddressRange<L1GPA>, slot: UInt32, fastZap: Bool, _ vcpu: L0VCPU) {
        if range.intersection(SwitcherLayout.area(of: areaVCPU)) != nil { switcher = nil }
    }
}
