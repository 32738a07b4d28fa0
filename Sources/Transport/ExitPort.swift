import ABI

/// The guest side of the exit protocol, one copy for L1's CPU and L2's CPU: write the exit into
/// the run page, hand the turn to L0, wait to be entered again, and take the event L0 queued
/// for this entry (if any). What RIP and the registers mean afterwards is the CPU's business.
public struct ExitPort: @unchecked Sendable {
    public let run: RunPageView
    let session: TierSession

    public init(session: TierSession) {
        self.session = session
        self.run = session.runPage()
    }

    /// An exception or other event L0 injected at the entry (VM_ENTRY_INTR_INFO format).
    public struct Event: Equatable, Sendable {
        public var info: UInt64
        public var vector: UInt8 { UInt8(truncatingIfNeeded: info) }
        /// Type 3: a hardware exception.
        public var isHardwareException: Bool { (info >> 8) & 7 == 3 }
    }

    /// One exit to L0 and back. Returns the injected event, cleared from the page.
    @inline(__always)
    public func exit<A: AddressSpaceValue>(_ reason: ExitReason, length: UInt64, qualification: UInt64 = 0,
                                           gpa: A, info: UInt64 = 0, operand: UInt64 = 0) -> Event? {
        run.exitReason = reason
        run[RunPage.exitQualification] = qualification
        run[RunPage.guestPhysicalAddress] = gpa.raw
        run[RunPage.instructionLength] = length
        run[RunPage.instructionInfo] = info
        run[RunPage.vmxOperand] = operand
        session.exitToL0()
        let event = run[RunPage.eventInjection]
        guard event & (1 << 31) != 0 else { return nil }
        run[RunPage.eventInjection] = 0
        return Event(info: event)
    }

    public func waitForFirstEntry() { session.waitForTurn() }
}
