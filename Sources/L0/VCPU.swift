import ABI
import GuestDevices
import Transport

/// What L0 does after handling an L2 exit.
public enum L2ExitOutcome: Equatable, Sendable {
    /// L0 handled it (or retries after a silent fix-up): L2 runs again, L1 never knows.
    case resumeL2
    /// L1 must see it: reflected as a VM exit (nvmx) or written to the PV exit page (pv).
    case deliverToL1
    case stop(StopReason)
}

/// What L0 does after handling an L1 exit.
public enum L1ExitOutcome: Equatable, Sendable {
    /// Instruction emulated (or hypercall done): L1 continues.
    case resumeL1
    /// VMLAUNCH/VMRESUME or PV enter-L2 succeeded: L2 runs next.
    case enterL2
    case stop(StopReason)
}

/// One vCPU as L0 holds it: the two run pages, the memory L0 can reach, the per-path state and
/// the counters. `handleL2Exit` / `handleL1Exit` are the per-tier exit handlers: each takes an
/// exit value and returns an outcome, and neither knows about processes or handoffs.
public final class L0VCPU {
    public let id: Int
    public let path: NestingPath
    public var counters = TransitionCounters()
    public let l2Run: RunPageView
    public let l1Run: RunPageView
    public var l1Memory: L1MemoryAccess
    public let ept02: EPT02
    public var pv: PVState
    public var nested: NestedVMXState
    public var harness = Harness()
    /// MSRs L0 serves for L2 itself: on nvmx those L1's MSR bitmap passes through (hardware
    /// would access the real MSR; L0 keeps its value per vCPU). Unset MSRs read as 0.
    public var l0MSRs: [UInt32: UInt64] = [:]
    /// L1's own MSRs (the VP assist page among them), kept by L0.
    public var l1MSRs: [UInt32: UInt64] = [:]
    /// The device model L0's userspace runs for a one-level guest (`single`).
    public var guestDevices = L1Devices()
    /// L1's VM: its type and capability booleans (the PV path needs one without protected state).
    public var vm = VMHandle(id: 0, type: .default)
    /// How deleting or moving one of L1's memslots drops derived mappings (KVM's default: fast).
    public var memslotZapPolicy: MemslotZapPolicy = .fast
    /// Devices L0 runs on ports (its in-kernel devices): fixed on nvmx, registered by L1 on pv.
    public var l0Devices: L0Devices
    /// Set when L1 asks for its L2 vCPU (PV create-vCPU or the first VMLAUNCH); the vCPU loop
    /// starts the L2 process then.
    public internal(set) var l2Requested = false

    public init(id: Int, path: NestingPath, control: SharedRegion, layout: ControlLayout,
                l1Memory: L1MemoryAccess) throws {
        self.id = id
        self.path = path
        self.l2Run = try RunPageView(region: control, base: layout.l2RunPage(id))
        self.l1Run = try RunPageView(region: control, base: layout.l1RunPage(id))
        self.l1Memory = l1Memory
        self.ept02 = EPT02(control: control, layout: layout)
        self.pv = PVState()
        self.l0Devices = path == .pv ? L0Devices() : .platformDefault
        self.nested = NestedVMXState(shadowing: path.vmcsShadowing, control: control, layout: layout, vcpu: id)
    }

    // MARK: L2 exits

    /// Every L2 exit lands here first, as on hardware.
    public func handleL2Exit(_ exit: GuestExit) -> L2ExitOutcome {
        counters.countL2Exit(exit.reason)
        switch path {
        case .single: return handleSingleLevelExit(exit)
        case .pv: return handlePVL2Exit(exit)
        case .nvmx, .nvmxNoShadow, .nvmxEVMCS: return handleNestedL2Exit(exit)
        }
    }

    // MARK: L1 exits

    public func handleL1Exit(_ exit: GuestExit) -> L1ExitOutcome {
        counters.countL1Exit(exit.reason)
        switch exit.reason {
        case .vmcall:
            return handleHypercall(exit)
        case .msrRead, .msrWrite:
            return handleL1MSR(exit)
        case .eptViolation where path.usesVMX:
            return handleL1WriteTrap(exit)
        case .vmxon, .vmxoff, .vmclear, .vmptrld, .vmptrst, .vmread, .vmwrite, .vmlaunch, .vmresume, .invept:
            guard path.usesVMX else {
                // No VMX for a PV L1 (CR4.VMXE stays clear): the instruction raises #UD.
                injectIntoL1(vector: 6)
                return .resumeL1
            }
            return handleVMXInstruction(exit)
        default:
            return .stop(.fatal("L1 exit \(exit.reason) is not emulated by this L0"))
        }
    }

    /// The L2 side of an exit L0 handled itself: skip the instruction and resume.
    @inline(__always)
    func skipL2Instruction(_ exit: GuestExit) {
        l2Run[register: .rip] &+= exit.instructionLength
    }

    @inline(__always)
    func skipL1Instruction(_ exit: GuestExit) {
        l1Run[register: .rip] &+= exit.instructionLength
    }

    /// Queues an exception for L1 at its next entry (VM_ENTRY_INTR_INFO format).
    func injectIntoL1(vector: UInt8, errorCode: UInt64? = nil) { Self.inject(into: l1Run, vector: vector, errorCode: errorCode) }
    /// Queues an exception for L2; RIP stays on the faulting instruction.
    func injectIntoL2(vector: UInt8, errorCode: UInt64? = nil) { Self.inject(into: l2Run, vector: vector, errorCode: errorCode) }

    static func inject(into page: RunPageView, vector: UInt8, errorCode: UInt64?) {
        let hardwareException: UInt64 = 3 << 8
        let deliverErrorCode: UInt64 = errorCode != nil ? 1 << 11 : 0
        page[RunPage.eventInjection] = 1 << 31 | hardwareException | deliverErrorCode | UInt64(vector)
        page[RunPage.eventErrorCode] = errorCode ?? 0
    }

    /// RDMSR/WRMSR that reach L0 and stay there: ECX index, EDX:EAX value. A pass-through-able
    /// MSR lives where L2's direct accesses find it.
    func handleL0MSR(_ exit: GuestExit) -> L2ExitOutcome {
        let msr = UInt32(truncatingIfNeeded: l2Run[register: .rcx])
        if exit.reason == .msrWrite {
            let v = (l2Run[register: .rdx] << 32) | (l2Run[register: .rax] & 0xFFFF_FFFF)
            if PassthroughMSRs.slot(of: msr) != nil { setL2PassthroughMSR(msr, v) } else { l0MSRs[msr] = v }
        } else {
            let v = l2PassthroughMSR(msr) ?? l0MSRs[msr] ?? 0
            l2Run[register: .rax] = v & 0xFFFF_FFFF
            l2Run[register: .rdx] = v >> 32
        }
        skipL2Instruction(exit)
        return .resumeL2
    }

    // MARK: ports L0 itself serves (the ucall port and unclaimed ports)

    /// Port I/O that reaches L0: on pv for ports L0 owns, on nvmx when L1 does not intercept.
    func handleL0PortIO(_ exit: GuestExit) -> L2ExitOutcome {
        let port = IOQualification.port(exit.qualification)
        if port == Ucall.port {
            let outcome = handleUcall(blockGPA: L2GPA(l2Run[register: .rdi]))
            if case .stop = outcome { return outcome }
            skipL2Instruction(exit)
            return .resumeL2
        }
        // An L0 device, or a port no device claims: reads float high, writes are dropped (as on a PC).
        let size = IOQualification.size(exit.qualification)
        let mask: UInt64 = size >= 8 ? ~0 : (1 << (UInt64(size) * 8)) - 1
        if IOQualification.isIn(exit.qualification) {
            let v = l0Devices.read(port: port) ?? ~0
            l2Run[register: .rax] = (l2Run[register: .rax] & ~mask) | (v & mask)
        } else {
            l0Devices.write(port: port, value: l2Run[register: .rax] & mask)
        }
        skipL2Instruction(exit)
        return .resumeL2
    }
}
