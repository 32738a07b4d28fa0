import ABI

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
}

extension NestingBackend {
    public var runsL1: Bool { true }
}

extension NestingPath {
    /// The port devices L0 runs from the start: on pv L1 registers its own (`registerL0Ports`);
    /// elsewhere they are part of the platform.
    var initialL0Devices: L0Devices { self == .pv ? L0Devices() : .platformDefault }

    /// The backend that runs this path.
    func makeBackend(_ vcpu: L0VCPU) -> any NestingBackend {
        switch self {
        case .single: SingleLevelBackend()
        case .pv: PVBackend()
        case .nvmx, .nvmxNoShadow, .nvmxEVMCS: NestedVMXBackend(variant: NestedVMXBackend.Variant(self)!, control: vcpu.control, vcpu: vcpu.id)
        }
    }
}
