import ABI
import Transport

/// One exit, as a value: what a tier's run page says it did. Exit handlers take these, so tests
/// can feed them made-up exits.
public struct GuestExit: Equatable, Sendable {
    public var reason: ExitReason
    public var qualification: UInt64 = 0
    public var guestPhysicalAddress: UInt64 = 0
    public var guestLinearAddress: UInt64 = 0
    public var instructionLength: UInt64 = 0
    public var instructionInfo: UInt64 = 0
    /// Memory operand of a VMX instruction (VMXON/VMPTRLD/VMCLEAR/INVEPT), already fetched.
    public var vmxOperand: UInt64 = 0
    public var interruptionInfo: UInt64 = 0
    public var interruptionErrorCode: UInt64 = 0

    public init(reason: ExitReason, qualification: UInt64 = 0, guestPhysicalAddress: UInt64 = 0,
                guestLinearAddress: UInt64 = 0, instructionLength: UInt64 = 0,
                instructionInfo: UInt64 = 0, vmxOperand: UInt64 = 0, interruptionInfo: UInt64 = 0,
                interruptionErrorCode: UInt64 = 0) {
        self.interruptionInfo = interruptionInfo
        self.interruptionErrorCode = interruptionErrorCode
        self.reason = reason
        self.qualification = qualification
        self.guestPhysicalAddress = guestPhysicalAddress
        self.guestLinearAddress = guestLinearAddress
        self.instructionLength = instructionLength
        self.instructionInfo = instructionInfo
        self.vmxOperand = vmxOperand
    }

    public init(from page: RunPageView) {
        self.reason = page.exitReason
        self.qualification = page[RunPage.exitQualification]
        self.guestPhysicalAddress = page[RunPage.guestPhysicalAddress]
        self.guestLinearAddress = page[RunPage.guestLinearAddress]
        self.instructionLength = page[RunPage.instructionLength]
        self.instructionInfo = page[RunPage.instructionInfo]
        self.vmxOperand = page[RunPage.vmxOperand]
        self.interruptionInfo = page[RunPage.exitInterruptionInfo]
        self.interruptionErrorCode = page[RunPage.exitInterruptionErrorCode]
    }

    public func write(to page: RunPageView) {
        page.exitReason = reason
        page[RunPage.exitQualification] = qualification
        page[RunPage.guestPhysicalAddress] = guestPhysicalAddress
        page[RunPage.guestLinearAddress] = guestLinearAddress
        page[RunPage.instructionLength] = instructionLength
        page[RunPage.instructionInfo] = instructionInfo
        page[RunPage.vmxOperand] = vmxOperand
        page[RunPage.exitInterruptionInfo] = interruptionInfo
        page[RunPage.exitInterruptionErrorCode] = interruptionErrorCode
    }
}

/// Why a stack stopped.
public enum StopReason: Equatable, Sendable, CustomStringConvertible {
    /// The guest program called `done`.
    case guestDone
    /// GUEST_ASSERT failed in L2.
    case guestAssert(String)
    /// A tier process ended (or was killed) while the stack ran.
    case tierDied(Tier, ExitStatus)
    /// L2 did something no tier can continue from (triple fault, an exit L1 cannot handle...).
    case fatal(String)
    /// L1 gave up (its own error), with its message.
    case l1Error(String)

    public var description: String {
        switch self {
        case .guestDone: "guest done"
        case .guestAssert(let m): "GUEST_ASSERT failed: \(m)"
        case let .tierDied(t, s): "\(t) (\(TierProcess.name(of: t))) ended unexpectedly: \(s)"
        case .fatal(let m): "fatal: \(m)"
        case .l1Error(let m): "L1 error: \(m)"
        }
    }
}
