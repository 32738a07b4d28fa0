import ABI
import Transport

/// One nesting path as L0 runs it: the state that path owns and its exit handlers. The core
/// (`L0VCPU`) owns what every path shares and calls the backend with decoded exits; a backend
/// never reaches into another backend's state.
///
/// Shaped for what comes next: a backend whose L2 exits go straight to L1 without L0 is a
/// backend whose `handleL2Exit` returns `.resume(.l1)`; several vCPUs are several cores, each
/// with its own backend.
public protocol NestingBackend: AnyObject {
    /// The tier that runs first, after any setup the path needs (one level: map the guest's RAM).
    func start(_ vcpu: L0VCPU, l2: inout RegisterFile) throws -> NextStep

    /// An L2 exit (already counted). `regs` is L2's register file; the loop stores it back.
    func handleL2Exit(_ exit: L2Exit, _ regs: inout RegisterFile, _ vcpu: L0VCPU) -> NextStep

    /// An L1 exit (already counted). `regs` is L1's register file; the loop stores it back.
    func handleL1Exit(_ exit: L1Exit, _ regs: inout RegisterFile, _ vcpu: L0VCPU) -> NextStep

    /// L1 memory `range` (memslot `slot`) is gone: drop whatever this path derived from it.
    /// `fastZap`: every EPT02 entry was just invalidated by generation, not only the slot's.
    func memoryRemoved(_ range: AddressRange<L1GPA>, slot: UInt32, fastZap: Bool, _ vcpu: L0VCPU)

    /// Whether L1 has an L2 vCPU to run (PV create-vCPU, a first VMLAUNCH; always on one level).
    var hasL2VCPU: Bool { get }

    /// Whether the path has an L1 process at all (not on one level).
    var runsL1: Bool { get }

    /// The port devices L0 runs from the start (its in-kernel devices): part of L1's platform,
    /// or none until L1 registers its own (pv).
    var initialL0Devices: L0Devices { get }

    /// Takes what the stack's configuration says about this path (pv: the features L0 offers).
    func configure(_ config: StackConfig)

    /// The last PV request L0 refused, and why (for `pvm launch` to print); nil on other paths.
    var refusal: PVRefusal? { get }

    /// Transitions the vCPU made that L0 never saw (pvm-rfc: L1's entries into L2 through its
    /// switcher), which the watchdog counts as progress. The guest's own claim: it can only
    /// postpone the watchdog, as real exits to L0 could; the stack's time limit still holds.
    var progressOutsideL0: UInt64 { get }

    /// Which tier really holds the vCPU L0 gave to `tier` (pvm-rfc: L1 or L2, by its switcher),
    /// for the watchdog to name.
    func holder(of tier: Tier) -> Tier

    /// Whether an interrupt for L1 (whose APIC L0 runs on nested VMX) ends L2's run: L1 asked
    /// for external-interrupt exiting. If not, it waits until L1 runs again, and L0 does not
    /// kick L2 for it (a kick would only bring L2 back to L0 at every instruction boundary).
    var l1InterruptsEndL2: Bool { get }
}

extension NestingBackend {
    public var runsL1: Bool { true }
    public var initialL0Devices: L0Devices { .platformDefault }
    public func configure(_ config: StackConfig) {}
    public var refusal: PVRefusal? { nil }
    public var progressOutsideL0: UInt64 { 0 }
    public func holder(of tier: Tier) -> Tier { tier }
    public var l1InterruptsEndL2: Bool { true }
}

/// The state a path keeps for the whole VM, which every vCPU's backend shares.
public enum BackendVMState {
    case none
    case pv(PVVMState)
    case nestedVMX(NestedVMXVMState)
}

extension NestingPath {
    /// One VM's path state (made once per stack).
    func makeBackendVMState() -> BackendVMState {
        switch self {
        case .single, .pvmRFC: .none
        case .pv: .pv(PVVMState())
        case .nvmx, .nvmxNoShadow, .nvmxEVMCS: .nestedVMX(NestedVMXVMState())
        }
    }

    /// The backend that runs this path on vCPU `vcpu` of the VM whose path state is `vm`.
    func makeBackend(control: ControlMemory, vcpu: Int, vm: BackendVMState) -> any NestingBackend {
        switch (self, vm) {
        case (.single, _): SingleLevelBackend()
        case (.pv, .pv(let state)): PVBackend(vmState: state)
        case (.pvmRFC, _): PVMRFCBackend()
        case (.nvmx, .nestedVMX(let state)), (.nvmxNoShadow, .nestedVMX(let state)), (.nvmxEVMCS, .nestedVMX(let state)):
            NestedVMXBackend(variant: NestedVMXBackend.Variant(self)!, control: control, vcpu: vcpu, vmState: state)
        default: preconditionFailure("\(self) has no \(vm) state")
        }
    }
}
