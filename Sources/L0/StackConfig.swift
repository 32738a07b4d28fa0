import ABI
import Transport

/// How to build one three-tier stack.
public struct StackConfig: Sendable {
    public var path: NestingPath
    /// Size of L0's host memory memfd (sparse).
    public var hostMemoryBytes: UInt64 = 1 << 30
    /// L1's single memslot: its size and where in host memory it starts. The slot deliberately
    /// does not start at host offset 0, so an L1 GPA used as a host offset would land elsewhere.
    public var l1MemoryBytes: UInt64 = 512 << 20
    public var l1HostOffset = HostOffset(256 << 20)
    /// L2 GPAs below this are mappable (EPT02 covers them).
    public var l2AddressLimit: UInt64 = 4 << 30
    /// The guest program L2 runs, and its arguments.
    public var program: String
    public var programArguments: [UInt64] = []
    /// The `pvm` executable that runs the child tiers (`pvm __tier ...`).
    public var tierExecutable: String
    /// A stand-in executable for a tier instead of `tierExecutable` (tests of L0's defences:
    /// a hostile process that speaks the tier protocol). L0 hands it exactly what it hands a
    /// real tier, and does not check its build.
    public var standIns: [Tier: String] = [:]
    public var placement: CPUPlacement = .automatic()
    /// Give up (and stop the stack) if a run takes longer than this.
    public var timeoutNanos: UInt64 = 600_000_000_000
    /// The watchdog: a tier that holds its turn longer than this (stopped, looping, hung) ends
    /// the stack with a message naming it. Generous against a tier process starting up.
    public var tierTimeoutNanos: UInt64 = StackConfig.defaultTierTimeoutNanos
    public static let defaultTierTimeoutNanos: UInt64 = 5_000_000_000
    /// pv only: the features L1 enables (L0 offers `pvOffered`), and how L1 maps L2's memory.
    public var pvFeatures: PVFeatures = .all
    public var pvOffered: PVFeatures = .all
    public var l2MapMode: L2MapMode = .eager
    /// The host L0 models and the VM L1 runs in (seeds/000-004).
    public var vmType: VMType = .default
    public var enableVirtAtLoad = true
    public var oneTimeSetup: OneTimeSetupPolicy = .off
    public var cpuCount = L0Host.machineCPUCount
    /// The VM's vCPUs: L1 and L2 each get this many (one thread per vCPU in each child), and
    /// L0 runs one state machine per vCPU.
    public var vcpuCount = 1
    public static let vcpuLimit = 16
    /// Record every run span (for `pvm stat` / `pvm trace`).
    public var recordTransitions = false

    public init(path: NestingPath, program: String, programArguments: [UInt64] = [], tierExecutable: String,
                tierBuild: String? = nil) {
        self.path = path
        self.program = program
        self.programArguments = programArguments
        self.tierExecutable = tierExecutable
        self.tierBuild = tierBuild ?? BuildID.of(file: tierExecutable)
    }

    /// The GNU build ID the tier executable had when it was resolved (nil: it has none, or could
    /// not be read). L0 checks the file still has it before it starts each child, and hands it to
    /// the child, which refuses to run if it is not that build: a binary rebuilt under a running
    /// bench is caught, not mixed in.
    public var tierBuild: String?

    public var l1Slot: MemorySlot {
        MemorySlot(slot: 0, guestPhysAddr: L1GPA(0), memorySize: l1MemoryBytes, hostOffset: l1HostOffset)
    }
    public var layout: ControlLayout { ControlLayout(vcpuCount: vcpuCount, l2AddressLimit: l2AddressLimit) }
}

/// What a finished run leaves behind.
public struct StackResult: Sendable {
    public var stop: StopReason
    /// vCPU 0's counts and harness log (the only vCPU unless the stack had more).
    public var counters: TransitionCounters
    public var harness: Harness
    /// Every vCPU's counts and harness log, in vCPU order (vCPU 0's first).
    public var perVCPU: [VCPUOutcome] = []
    public var l1Status: ExitStatus?
    public var l2Status: ExitStatus?
    /// The child tiers' process ids (reaped by the time the result exists).
    public var tierPIDs: [Tier: Int32] = [:]
    /// Why L0 refused L1's request, if it did (a PV version mismatch, PV nesting in a
    /// protected-state L1, nested VMX in a TDX L1...).
    public var pvRefusal: PVRefusal?
    /// Every run span, when `recordTransitions` was on.
    public var log: TransitionLog?
    public var wallNanos: UInt64

    /// True when the guest program ran to `done` and every child tier exited cleanly (on the
    /// one-level path there is no L1; on the nested ones `done` cannot happen without it).
    public var succeeded: Bool {
        stop == .guestDone && (l1Status?.isSuccess ?? true) && (l2Status?.isSuccess ?? false)
    }
}

/// What one vCPU of a finished run counted, and what its guest told the harness.
public struct VCPUOutcome: Sendable {
    public var counters: TransitionCounters
    public var harness: Harness
}

/// Errors that stop a stack before it runs, each saying what to fix.
public enum StackError: Error, CustomStringConvertible {
    case hostMemory(TransportError)
    case badConfig(String)
    case spawn(Tier, TransportError)
    case host(HostError)
    /// The tier executable is no longer the build it was when resolved (its GNU build ID changed).
    case otherBuild(executable: String, expected: String, found: String)

    public var description: String {
        switch self {
        case .hostMemory(let e): "cannot create L0's shared memory: \(e) (is memfd available and is there enough address space?)"
        case .badConfig(let m): "invalid stack configuration: \(m)"
        case let .spawn(t, e): "cannot start \(t) (\(TierProcess.name(of: t))): \(e)"
        case .host(let e): "L0's host refused: \(e)"
        case let .otherBuild(x, e, f): "\(x) changed under L0: build ID \(f), resolved as \(e) (rebuilt while running?); rerun it"
        }
    }
}
