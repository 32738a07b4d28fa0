import ABI
import Transport
#if canImport(Glibc)
import Glibc
#endif

/// One three-tier stack: L0 is this process; it starts L1, and L2 when L1 asks for an L2 vCPU.
///
/// Shutdown order (the only place it is written):
///   1. store "stop" in every vCPU's handoff lanes (and pvm-rfc's switcher lanes) and wake every sleeper:
///      each child tier, waiting for its turn, sees it and exits 0;
///   2. reap L2 (SIGKILL after a grace period if it does not go);
///   3. reap L1 the same way;
///   4. destroy L1's VM in L0's host model and unload it (virtualization disabled on its CPUs);
///   5. drop the mappings and close the memfds. They are anonymous memfds, so nothing was ever
///      in /dev/shm or on disk, and a killed L0 leaves nothing either (children die with it
///      through PR_SET_PDEATHSIG).
public final class L0Stack {
    public let config: StackConfig
    let control: ControlMemory
    let hostMemory: SharedRegion
    /// The handoff lanes between L0 and each child tier, one per vCPU.
    let l1Lanes: [Handoff], l2Lanes: [Handoff]
    /// pvm-rfc: the lanes L1 and L2 hand each vCPU over on, in L1's memory. L0 never passes
    /// them; it only stops them with the others.
    let switcherLanes: [Handoff]
    /// The VM's vCPUs, one state machine each in L0's loop; they share `L0VMState`.
    public let vcpus: [L0VCPU]
    /// vCPU 0 (the only one unless `StackConfig.vcpuCount` says more).
    public var vcpu: L0VCPU { vcpus[0] }
    var l1: ChildProcess?
    var l2: ChildProcess?
    /// The host L0 models, and L1's VM in it.
    public let host: L0Host
    public let vm: VMHandle
    var shutDown = false

    public init(config: StackConfig) throws {
        guard config.l1HostOffset.isPageAligned,
              config.l1HostOffset.raw + config.l1MemoryBytes <= config.hostMemoryBytes else {
            throw StackError.badConfig("L1 memory (\(config.l1MemoryBytes) bytes at host offset \(config.l1HostOffset.raw)) does not fit in \(config.hostMemoryBytes) bytes of host memory")
        }
        guard (1...StackConfig.vcpuLimit).contains(config.vcpuCount) else {
            throw StackError.badConfig("\(config.vcpuCount) vCPUs: a stack runs 1 to \(StackConfig.vcpuLimit)")
        }
        guard !config.path.usesSwitcher || config.vcpuCount <= SwitcherLayout.maxVCPUs else {
            throw StackError.badConfig("pvm-rfc runs at most \(SwitcherLayout.maxVCPUs) vCPUs (one switcher area each)")
        }
        self.config = config
        let layout = config.layout
        do {
            control = try ControlMemory.create(layout: layout)
            // L1's memslot in a memfd of its own: the only host memory a child is handed.
            hostMemory = try SharedRegion(create: "pvm-host-memory", size: config.hostMemoryBytes,
                                          overlay: ("pvm-l1-memory", config.l1HostOffset.raw, config.l1MemoryBytes))
            L0VCPU.initialize(control)
        } catch let e as TransportError {
            throw StackError.hostMemory(e)
        }
        do {
            host = try L0Host(cpuCount: config.cpuCount, enableVirtAtLoad: config.enableVirtAtLoad,
                              oneTimeSetup: config.oneTimeSetup)
            vm = try host.createVM(type: config.vmType)
        } catch {
            throw StackError.host(error)
        }
        var slots = L1Memslots(hostSize: config.hostMemoryBytes)
        do { try slots.add(config.l1Slot) } catch { throw StackError.badConfig("\(error)") }
        let mem = control
        l1Lanes = (0..<layout.vcpuCount).map { mem.handoff(.l1, vcpu: $0) }
        l2Lanes = (0..<layout.vcpuCount).map { mem.handoff(.l2, vcpu: $0) }
        do {
            let host = HostMemory(region: hostMemory), base = config.l1HostOffset
            switcherLanes = config.path.usesSwitcher
                ? try (0..<layout.vcpuCount).map { try SwitcherView(memory: host, l1Base: base, vcpu: $0).lane } : []
        } catch let e as TransportError {
            throw StackError.hostMemory(e)
        }
        vcpus = L0VCPU.makeVCPUs(count: layout.vcpuCount, path: config.path, control: mem,
                                 l1Memory: L1MemoryAccess(memslots: slots, host: HostMemory(region: hostMemory)))
        for v in vcpus { v.backend.configure(config) }
        vcpus[0].vm = vm
        // Everything L0 writes before a child maps it is written (the backends' bitmaps
        // included): from here the tables can only be written through L0's own mapping, and no
        // shared memfd can be shrunk under L0.
        do {
            try control.sealForChildren()
            try hostMemory.seal(name: "pvm-host-memory", futureWrite: false)
        } catch let e as TransportError {
            throw StackError.hostMemory(e)
        }
    }

    /// The lane between L0 and `tier` (L1 or L2) of vCPU `i`.
    @inline(__always)
    func lane(_ i: Int, _ tier: Tier) -> Handoff { tier == .l1 ? l1Lanes[i] : l2Lanes[i] }

    func launch(_ tier: Tier) throws -> ChildProcess {
        // A tier executable rebuilt since it was resolved (a bench running while someone builds)
        // is another build: said here, by L0, with both IDs. (The child checks the spec too.)
        let executable = config.standIns[tier] ?? config.tierExecutable
        if config.standIns[tier] == nil, let expected = config.tierBuild, let found = BuildID.of(file: executable), found != expected {
            throw StackError.otherBuild(executable: executable, expected: expected, found: found)
        }
        var spec = TierLaunch(tier: tier, parent: getpid(), path: config.path, vcpu: 0, layout: config.layout,
                              l1Slot: config.l1Slot, cpu: config.placement.cpu(for: tier, path: config.path),
                              program: config.program, programArguments: config.programArguments)
        spec.pvFeatures = config.pvFeatures
        spec.l2MapMode = config.l2MapMode
        spec.build = config.tierBuild ?? TierLaunch.noBuildID
        do {
            return try ChildProcess(tier: tier, path: executable, arguments: ["__tier", spec.encoded],
                                    fds: control.descriptors(for: tier) + [hostMemory.overlayFD])
        } catch let e as TransportError {
            throw StackError.spawn(tier, e)
        }
    }

    /// The first child that has ended, if any.
    func deadTier() -> (Tier, ExitStatus)? {
        for c in [l1, l2].compactMap({ $0 }) { if let s = c.poll() { return (c.tier, s) } }
        return nil
    }

    /// Handoffs since the loop last polled its children (VCPULoop.swift).
    var handoffsSinceCheck: UInt64 = 0
    /// When the stack's time limit (`StackConfig.timeoutNanos`) runs out, set by `run`.
    var timeLimitAt: UInt64 = .max
    /// How long the tier now running has held the turn (`StackConfig.tierTimeoutNanos`).
    lazy var watchdog = TurnWatchdog(limitNanos: config.tierTimeoutNanos)

    /// The shutdown order in the type's comment. Runs once; later calls do nothing.
    func shutdown() {
        guard !shutDown else { return }
        shutDown = true
        for l in l1Lanes + l2Lanes { l.stop() }
        for l in switcherLanes { l.stop() }
        for child in [l2, l1].compactMap({ $0 }) {
            if child.wait(timeoutNanos: 2_000_000_000) == nil { child.killAndReap() }
        }
        try? host.destroyVM(vm)
        try? host.unload()
    }
}
