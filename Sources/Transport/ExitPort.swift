import ABI
#if canImport(Glibc)
import Glibc
#endif

/// The guest side of the exit protocol, one copy for L1's CPU and L2's CPU: write the exit into
/// the run page, hand the turn to the tier that handles it (L0; or L1 through the switcher on
/// pvm-rfc), wait to be entered again, and take the event injected for this entry (if any).
/// What RIP and the registers mean afterwards is the CPU's business.
public struct ExitPort: @unchecked Sendable {
    public let run: RunPageView
    let lane: Handoff
    let me: Tier
    /// Who handles this tier's exits.
    public let handler: Tier
    let policy: WaitPolicy

    /// Exits to L0 through the tier's own lane and run page.
    public init(session: TierSession) {
        self.init(run: session.runPage(), lane: session.handoff, me: session.tier, handler: .l0, policy: session.policy)
    }

    /// L2's exits to L1 through the switcher (pvm-rfc).
    public init(session: TierSession, switcher: SwitcherView) {
        self.init(run: switcher.run, lane: switcher.lane, me: session.tier, handler: session.tier == .l2 ? .l1 : .l2,
                  policy: session.policy)
    }

    init(run: RunPageView, lane: Handoff, me: Tier, handler: Tier, policy: WaitPolicy) {
        self.run = run
        self.lane = lane
        self.me = me
        self.handler = handler
        self.policy = policy
    }

    /// An exception or other event injected at the entry (VM_ENTRY_INTR_INFO format).
    public struct Event: Equatable, Sendable {
        public var info: UInt64
        public var errorCode: UInt64 = 0
        public var vector: UInt8 { UInt8(truncatingIfNeeded: info) }
        /// Type 3: a hardware exception.
        public var isHardwareException: Bool { (info >> 8) & 7 == 3 }
        /// Type 0: an external interrupt (from a local APIC).
        public var isExternalInterrupt: Bool { (info >> 8) & 7 == 0 }
    }

    /// One exit and back. Returns the injected event, cleared from the page.
    @inline(__always)
    public func exit<A: AddressSpaceValue>(_ reason: ExitReason, length: UInt64, qualification: UInt64 = 0,
                                           gpa: A, info: UInt64 = 0, operand: UInt64 = 0) -> Event? {
        run.exitReason = reason
        run[RunPage.exitQualification] = qualification
        run[RunPage.guestPhysicalAddress] = gpa.raw
        run[RunPage.instructionLength] = length
        run[RunPage.instructionInfo] = info
        run[RunPage.vmxOperand] = operand
        lane.pass(to: handler)
        waitForTurn()
        let event = run[RunPage.eventInjection]
        guard event & (1 << 31) != 0 else { return nil }
        run[RunPage.eventInjection] = 0
        return Event(info: event, errorCode: run[RunPage.eventErrorCode])
    }

    public func waitForFirstEntry() { waitForTurn() }

    /// Waits for this tier's turn. When L0 stops the stack the tier exits 0 here; if its peer
    /// is gone, 1 (PR_SET_PDEATHSIG normally gets there first).
    @inline(__always)
    func waitForTurn() {
        switch lane.wait(for: me, policy: policy) {
        case .myTurn: return
        case .stop: Glibc.exit(0)
        case .peerGone: Glibc.exit(1)
        case .timedOut: preconditionFailure("a child tier waits with no deadline")
        }
    }
}
