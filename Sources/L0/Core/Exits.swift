import ABI
import Glibc
import Transport

/// The exit-information fields hardware reports with an exit (VM_EXIT_REASON,
/// EXIT_QUALIFICATION, GUEST_PHYSICAL_ADDRESS, ...), in the address space of the tier that
/// exited: an `L2ExitInfo` carries an `L2GPA`, an `L1ExitInfo` an `L1GPA`. Handlers decide on
/// the decoded `L2Exit` / `L1Exit`; these raw fields are what L0 reflects into vmcs12 or a PV
/// exit page.
public struct ExitInfo<Address: AddressSpaceValue>: Equatable, Sendable {
    public var reason: ExitReason
    public var qualification: UInt64 = 0
    public var guestPhysicalAddress: Address
    public var guestLinearAddress: UInt64 = 0
    public var instructionLength: UInt64 = 0
    /// VMX_INSTRUCTION_INFO; for a faulting load/store, its access size in bytes.
    public var instructionInfo: UInt64 = 0
    /// Memory operand of a VMX instruction (VMXON/VMPTRLD/VMCLEAR/INVEPT), already fetched.
    public var vmxOperand: UInt64 = 0
    public var interruptionInfo: UInt64 = 0
    public var interruptionErrorCode: UInt64 = 0

    public init(reason: ExitReason, qualification: UInt64 = 0, guestPhysicalAddress: Address = Address(0),
                guestLinearAddress: UInt64 = 0, instructionLength: UInt64 = 0, instructionInfo: UInt64 = 0,
                vmxOperand: UInt64 = 0, interruptionInfo: UInt64 = 0, interruptionErrorCode: UInt64 = 0) {
        self.reason = reason
        self.qualification = qualification
        self.guestPhysicalAddress = guestPhysicalAddress
        self.guestLinearAddress = guestLinearAddress
        self.instructionLength = instructionLength
        self.instructionInfo = instructionInfo
        self.vmxOperand = vmxOperand
        self.interruptionInfo = interruptionInfo
        self.interruptionErrorCode = interruptionErrorCode
    }
}

public typealias L2ExitInfo = ExitInfo<L2GPA>
public typealias L1ExitInfo = ExitInfo<L1GPA>

/// A port access as decoded from an I/O exit.
public struct PortIO: Equatable, Sendable {
    public var port: UInt16
    /// 1, 2 or 4 bytes.
    public var size: UInt64
    public var isIn: Bool
    /// For OUT: the value written (RAX, masked to the size). 0 for IN.
    public var value: UInt64
    public var mask: UInt64 { AccessSize.mask(size) }
}

/// An L2 exit, decoded once from the run page: what the instruction was and its operands.
/// `info` keeps the raw exit-information fields, for reflection to L1.
public struct L2Exit: Equatable, Sendable {
    public enum Kind: Equatable, Sendable {
        case cpuid(leaf: UInt32, subleaf: UInt32)
        case msrRead(UInt32)
        case msrWrite(UInt32, value: UInt64)
        case io(PortIO)
        /// An access EPT02 did not allow: the page, the access (EPT R/W/X bits) and its size.
        case eptViolation(L2GPA, access: UInt64, size: UInt64)
        case vmcall(nr: UInt64)
        case hlt
        /// Anything else (exceptions, CR moves, RDTSC, ...): handled by reason and `info`.
        case other
    }
    public var kind: Kind
    public var info: L2ExitInfo

    public init(kind: Kind, info: L2ExitInfo) {
        self.kind = kind
        self.info = info
    }
}

/// VMREAD/VMWRITE's register operands, decoded from VMX_INSTRUCTION_INFO: the field encoding
/// (the whole 64-bit register) and the register that holds or receives the value.
public struct VMCSFieldOperands: Equatable, Sendable {
    public var field: UInt64
    public var valueRegister: Register
}

/// A hypercall's four argument registers (RBX, RCX, RDX, RSI).
public struct HypercallArguments: Equatable, Sendable {
    public var a0: UInt64, a1: UInt64, a2: UInt64, a3: UInt64
    public init(_ a0: UInt64 = 0, _ a1: UInt64 = 0, _ a2: UInt64 = 0, _ a3: UInt64 = 0) {
        (self.a0, self.a1, self.a2, self.a3) = (a0, a1, a2, a3)
    }
}

/// One of L1's VMX instructions, with its operands.
public enum VMXInstruction: Equatable, Sendable {
    case vmxon(L1GPA), vmxoff, vmclear(L1GPA), vmptrld(L1GPA), vmptrst
    /// nil: VMX_INSTRUCTION_INFO names no usable registers.
    case vmread(VMCSFieldOperands?), vmwrite(VMCSFieldOperands?, value: UInt64)
    case invept(type: UInt64, eptp: UInt64)
    case vmlaunch, vmresume
}

/// An L1 exit, decoded once from L1's run page. Its addresses are `L1GPA`s.
public struct L1Exit: Equatable, Sendable {
    public enum Kind: Equatable, Sendable {
        /// VMCALL: KVM's convention, number in RAX, arguments in RBX, RCX, RDX, RSI.
        case hypercall(nr: UInt64, args: HypercallArguments)
        case msrRead(UInt32)
        case msrWrite(UInt32, value: UInt64)
        case vmx(VMXInstruction)
        /// A store to an L1 page L0 write-protects (reason 48, L1's own EPT violation).
        case protectedStore(L1GPA, size: UInt64, value: UInt64)
        case other
    }
    public var kind: Kind
    public var info: L1ExitInfo

    public init(kind: Kind, info: L1ExitInfo) {
        self.kind = kind
        self.info = info
    }
}

/// What the vCPU does after L0 handled an exit: the one value a handler returns. The loop has
/// one branch per case and none per path.
public enum NextStep: Equatable, Sendable {
    /// `tier` runs next: L2 after L0 handled its exit itself; L1 after its own exit, or to
    /// see an L2 exit L0 delivered (a reflected VM exit, or a PV exit page).
    case resume(Tier)
    /// L1 asked to run L2 (VMLAUNCH/VMRESUME, PV enter-L2) and L0 entered it. The first one
    /// starts the L2 process.
    case enterL2
    /// The vCPU halted in L0 (HLT with interrupts on and none pending): `tier` runs again
    /// when an interrupt wakes it.
    case block(Tier)
    case stop(StopReason)
}

/// Why a stack stopped.
public enum StopReason: Equatable, Sendable, CustomStringConvertible {
    /// The guest program called `done`.
    case guestDone
    /// GUEST_ASSERT failed in L2.
    case guestAssert(String)
    /// A tier process ended (or was killed) while the stack ran.
    case tierDied(Tier, ExitStatus)
    /// Something no tier can continue from.
    case fatal(FatalError)
    /// L1 gave up (its own error), with its message.
    case l1Error(String)
    /// L0 received SIGINT or SIGTERM (`StopSignals`) and stopped the stack in order.
    case interrupted(signal: Int32)

    public var description: String {
        switch self {
        case .guestDone: "guest done"
        case .guestAssert(let m): "GUEST_ASSERT failed: \(m)"
        case let .tierDied(t, s): "\(t) (\(TierProcess.name(of: t))) ended unexpectedly: \(s)"
        case .fatal(let e): "fatal: \(e)"
        case .l1Error(let m): "L1 error: \(m)"
        case .interrupted(let s): "interrupted by \(s == SIGINT ? "SIGINT" : s == SIGTERM ? "SIGTERM" : "signal \(s)")"
        }
    }
}

/// The conditions that stop a stack because no tier can go on, each a value a test can match.
public enum FatalError: Equatable, Sendable, CustomStringConvertible {
    /// Every vCPU that has not finished is halted with no interrupt on its way: nothing can
    /// ever run again (a guest that halts waiting for an IPI nobody sends).
    case allVCPUsHalted(Int)
    /// A tier's run page held an exit reason no CPU reports (not one <asm/vmx.h> names, or
    /// with flag bits): L0 neither handles nor reflects it.
    case impossibleExit(Tier, ExitReason)
    /// An L1 exit this L0 does not emulate.
    case unhandledL1Exit(ExitReason)
    /// An L2 exit L0 kept (or a one-level exit) with no handler.
    case unhandledL2Exit(ExitReason)
    /// A one-level guest faulted inside the RAM L0 mapped for it.
    case singleLevelFault(L2GPA)
    /// The ucall block is not mapped for L2, unreadable, or names an unknown command.
    case ucallUnmapped(L2GPA)
    /// pvm-rfc: L1 passed on a ucall whose block is not inside its memory.
    case forwardedUcallUnmapped(L1GPA)
    case unknownUcall(UInt64)
    /// An L2 exit on pv before L1 registered its PV exit page.
    case noPVExitPage(ExitReason)
    /// An L2 exit on nvmx with no current vmcs12.
    case noCurrentVMCS12
    /// An EPT12 mapping beyond the L2 address range EPT02 covers.
    case beyondL2AddressLimit(L2GPA)
    /// L1 stored outside its own memory.
    case l1StoreOutsideMemory(L1GPA)
    /// The L2 process could not be started.
    case cannotStartL2(String)
    /// A tier's handoff lane said "stop", which only L0 may store.
    case stopFromGuest
    case timeLimit(seconds: UInt64)
    /// A tier held its turn past the watchdog (`StackConfig.tierTimeoutNanos`).
    /// `doing`: the exit L0 handled before it gave the tier the turn.
    case tierTimeout(Tier, seconds: Double, doing: String)

    public var description: String {
        switch self {
        case let .impossibleExit(t, r): "\(t) exited with a reason no CPU reports (0x\(String(r.rawValue, radix: 16)), \(r))"
        case .unhandledL1Exit(let r): "L1 exit \(r) is not emulated by this L0"
        case .unhandledL2Exit(let r): "L2 exit \(r) kept by L0 has no handler"
        case .singleLevelFault(let g): "one-level guest faulted at \(g), inside RAM L0 mapped"
        case .ucallUnmapped(let g): "ucall block at \(g) is not mapped for L2"
        case .forwardedUcallUnmapped(let g): "L1 passed on a ucall block at \(g), outside its memory"
        case .unknownUcall(let c): "unknown ucall command \(c) from L2"
        case .noPVExitPage(let r): "L2 exit \(r) with no PV exit page registered"
        case .noCurrentVMCS12: "L2 exit with no current vmcs12"
        case .beyondL2AddressLimit(let g): "\(g) is beyond the L2 address limit of this L0"
        case .l1StoreOutsideMemory(let g): "L1 stored to \(g), outside its memory"
        case .cannotStartL2(let e): "cannot start L2: \(e)"
        case .allVCPUsHalted(let n): "every running vCPU halted (\(n)) with no interrupt on its way: the guest can never run again"
        case .stopFromGuest: "a handoff lane says stop, but only L0 may stop the stack"
        case .timeLimit(let s): "run exceeded its time limit of \(s) s"
        case let .tierTimeout(t, s, doing): "\(t) (\(TierProcess.name(of: t))) did not give the vCPU back within \(s) s \(doing) (stopped, hung or looping)"
        }
    }
}
