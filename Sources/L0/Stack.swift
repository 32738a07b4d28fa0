import ABI
import Transport
#if canImport(Glibc)
import Glibc
#endif

/// One three-tier stack: L0 is this process; it starts L1, and L2 when L1 asks for an L2 vCPU.
///
/// Shutdown order (the only place it is written):
///   1. store "stop" in the handoff word and wake every sleeper: each child tier, waiting for its
///      turn, sees it and exits 0;
///   2. reap L2 (SIGKILL after a grace period if it does not go);
///   3. reap L1 the same way;
///   4. destroy L1's VM in L0's host model and unload it (virtualization disabled on its CPUs);
///   5. drop the mappings and close both memfds. They are anonymous memfds, so nothing was ever
///      in /dev/shm or on disk, and a killed L0 leaves nothing either (children die with it
///      through PR_SET_PDEATHSIG).
public final class L0Stack {
    public let config: StackConfig
    let control: SharedRegion
    let hostMemory: SharedRegion
    let handoff: Handoff
    public let vcpu: L0VCPU
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
        self.config = config
        let layout = config.layout
        do {
            control = try SharedRegion(create: "pvm-control", size: layout.totalSize)
            hostMemory = try SharedRegion(create: "pvm-host-memory", size: config.hostMemoryBytes)
            try control.store(ControlLayout.magic, at: ControlLayout.magicOffset)
            try NestedVMXState.initializeBitmaps(control: control, layout: layout)
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
        handoff = Handoff(region: control, base: layout.handoff(0))
        vcpu = try L0VCPU(id: 0, path: config.path, control: control, layout: layout,
                          l1Memory: L1MemoryAccess(memslots: slots, host: HostMemory(region: hostMemory)))
        vcpu.pv.offered = config.pvOffered
        vcpu.vm = vm
    }

    func launch(_ tier: Tier) throws -> ChildProcess {
        var spec = TierLaunch(tier: tier, parent: getpid(), path: config.path, vcpu: 0, layout: config.layout,
                              l1Slot: config.l1Slot, cpu: config.placement.cpu(for: tier),
                              program: config.program, programArguments: config.programArguments)
        spec.pvFeatures = config.pvFeatures
        spec.l2MapMode = config.l2MapMode
        do {
            return try ChildProcess(tier: tier, path: config.tierExecutable, arguments: ["__tier", spec.encoded],
                                    fds: [control.fd, hostMemory.fd])
        } catch let e as TransportError {
            throw StackError.spawn(tier, e)
        }
    }

    /// The first child that has ended, if any.
    func deadTier() -> (Tier, ExitStatus)? {
        for c in [l1, l2].compactMap({ $0 }) { if let s = c.poll() { return (c.tier, s) } }
        return nil
    }

    /// The vCPU state machine. Every arrow goes through L0: it waits for its turn, reads the run
    /// page of the tier that exited, asks that tier's exit handler for an outcome, and passes the
    /// turn on.
    enum State { case runningL1, runningL2, stopping(StopReason) }

    public func run() throws -> StackResult {
        let started = monotonicNanos()
        var log: TransitionLog? = config.recordTransitions ? TransitionLog() : nil
        TierProcess.setName(.l0)
        config.placement.apply(as: .l0)
        let policy = config.placement.waitPolicy(for: .l0)
        defer { shutdown() }

        var state = State.runningL1
        if config.path == .single {
            // One level: L0 is the guest's only hypervisor, so it starts the guest itself.
            try vcpu.prepareSingleLevelGuest()
            l2 = try launch(.l2)
            vcpu.counters.l2Entries += 1
            log?.started(at: monotonicNanos())
            handoff.pass(to: .l2)
            state = .runningL2
        } else {
            l1 = try launch(.l1)
            vcpu.counters.l1Entries += 1
            log?.started(at: monotonicNanos())
            handoff.pass(to: .l1)
        }
        let deadline = started + config.timeoutNanos
        let alive = { [unowned self] in self.deadTier() == nil && monotonicNanos() < deadline }

        while true {
            switch state {
            case .runningL1:
                if let stop = waitForTurn(policy, alive) { state = .stopping(stop); continue }
                let exit = GuestExit(from: vcpu.l1Run)
                let received = log == nil ? 0 : monotonicNanos()
                log?.guestExited(.l1, reason: exit.reason, at: received)
                let outcome = vcpu.handleL1Exit(exit)
                defer { log?.l0Handed(from: .l1, reason: exit.reason, received: received, at: monotonicNanos()) }
                if vcpu.l2Requested, l2 == nil {
                    do { l2 = try launch(.l2) } catch { state = .stopping(.fatal("\(error)")); continue }
                }
                switch outcome {
                case .resumeL1:
                    vcpu.counters.l1Entries += 1
                    handoff.pass(to: .l1)
                case .enterL2:
                    vcpu.counters.l2Entries += 1
                    handoff.pass(to: .l2)
                    state = .runningL2
                case .stop(let r):
                    state = .stopping(r)
                }
            case .runningL2:
                if let stop = waitForTurn(policy, alive) { state = .stopping(stop); continue }
                let exit = GuestExit(from: vcpu.l2Run)
                let received = log == nil ? 0 : monotonicNanos()
                log?.guestExited(.l2, reason: exit.reason, at: received)
                defer { log?.l0Handed(from: .l2, reason: exit.reason, received: received, at: monotonicNanos()) }
                switch vcpu.handleL2Exit(exit) {
                case .resumeL2:
                    vcpu.counters.l2Entries += 1
                    handoff.pass(to: .l2)
                case .deliverToL1:
                    vcpu.counters.l1Entries += 1
                    handoff.pass(to: .l1)
                    state = .runningL1
                case .stop(let r):
                    state = .stopping(r)
                }
            case .stopping(let reason):
                shutdown()
                var pids: [Tier: Int32] = [:]
                for c in [l1, l2].compactMap({ $0 }) { pids[c.tier] = c.pid }
                return StackResult(stop: reason, counters: vcpu.counters, harness: vcpu.harness,
                                   l1Status: l1?.status, l2Status: l2?.status, tierPIDs: pids,
                                   pvRefusal: vcpu.pv.refusal, log: log, wallNanos: monotonicNanos() - started)
            }
        }
    }

    /// Handoffs between liveness checks while L0 is busy. A tier that dies while the others
    /// ping-pong without it (L1 during a PV CPUID loop) is noticed within this many exits; a
    /// sleeping L0 checks on every futex timeout anyway. One check is two waitpid(WNOHANG).
    static let livenessCheckInterval: UInt64 = 1024
    var handoffsSinceCheck: UInt64 = 0

    /// nil when it is L0's turn; otherwise why the stack must stop.
    @inline(__always)
    func waitForTurn(_ policy: WaitPolicy, _ alive: () -> Bool) -> StopReason? {
        handoffsSinceCheck &+= 1
        if handoffsSinceCheck >= Self.livenessCheckInterval {
            handoffsSinceCheck = 0
            if let (t, s) = deadTier() { return .tierDied(t, s) }
        }
        switch handoff.wait(for: .l0, policy: policy, isPeerAlive: alive) {
        case .myTurn: return nil
        case .stop: return .fatal("handoff word says stop, but only L0 may stop the stack")
        case .peerGone:
            if let (t, s) = deadTier() { return .tierDied(t, s) }
            return .fatal("run exceeded its time limit of \(config.timeoutNanos / 1_000_000_000) s")
        }
    }

    /// The shutdown order in the type's comment. Runs once; later calls do nothing.
    func shutdown() {
        guard !shutDown else { return }
        shutDown = true
        handoff.stop()
        for child in [l2, l1].compactMap({ $0 }) {
            if child.wait(timeoutNanos: 2_000_000_000) == nil { child.killAndReap() }
        }
        try? host.destroyVM(vm)
        try? host.unload()
    }
}
