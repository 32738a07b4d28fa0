import ABI
#if canImport(Glibc)
import Glibc
#endif

/// What a child tier (L1 or L2) does first and holds while it runs: its process identity, the
/// memory L0 handed it (its exchange region read-write, its tables region read-only, L1's
/// memslot of host memory), and its end of the vCPU's handoff lane. Shared by both child tiers.
/// Once mapped, the tier enters its sandbox (`TierSandbox`).
public struct TierSession: @unchecked Sendable {
    public let tier: Tier
    public private(set) var launch: TierLaunch
    public let exchange: SharedRegion
    public let tables: SharedRegion
    public let hostMemory: HostMemory
    public private(set) var handoff: Handoff
    public let policy: WaitPolicy
    /// The vCPU this session's lane and run page are (`launch.vcpu` at first; `vcpu(_:)`).
    public var vcpu: Int { launch.vcpu }

    /// Takes the tier's name, dies with L0, pins itself, maps the memfds and enters the
    /// sandbox. Exits the process if its parent is already gone; throws if the memfds are not
    /// what L0 hands a tier of this build (sizes, seals, header) or cannot be mapped.
    /// `beforeSandbox` runs once everything is mapped and before the sandbox closes: where a
    /// tier with several vCPUs starts its other vCPUs' threads (`TierThreads`), which the
    /// sandbox then covers too (it is entered for every thread of the process).
    public init(_ tier: Tier, _ launch: TierLaunch, beforeSandbox: (TierSession) -> Void = { _ in }) throws {
        TierProcess.setName(tier)
        guard TierProcess.dieWithParent(expectedParent: launch.parent) else { exit(1) }
        StopSignals.ignore()
        let placement = CPUPlacement(l0CPU: nil, guestCPU: launch.cpu)
        placement.apply(as: tier)
        self.tier = tier
        self.launch = launch
        let layout = launch.layout
        let exchangeRegion = ControlRegion.exchange(of: tier), tablesRegion = ControlRegion.tables(of: tier)
        let exchange = try SharedRegion(adopt: TierLaunch.exchangeFD, name: "pvm-\(exchangeRegion.rawValue)", writable: true)
        // L0's tables: read-only here, and sealed so this mapping can never become writable.
        let tables = try SharedRegion(adopt: TierLaunch.tablesFD, name: "pvm-\(tablesRegion.rawValue)", writable: false,
                                      requireFutureWriteSeal: true)
        for (r, region) in [(exchangeRegion, exchange), (tablesRegion, tables)] where region.size < layout.size(of: r) {
            throw TransportError.outOfBounds(offset: 0, length: layout.size(of: r), regionSize: region.size)
        }
        // The tables must be the ones an L0 of this launch ABI made (L0's header).
        let magic: UInt64 = try tables.load(at: ControlLayout.magicOffset.raw)
        let abi: UInt64 = try tables.load(at: ControlLayout.launchABIOffset.raw)
        guard magic == ControlLayout.magic, abi == LaunchABI.version else {
            throw TierLaunch.OtherBuild(l0ABI: abi, l0Build: magic == ControlLayout.magic ? launch.build : "(no control-memory magic)",
                                        tierABI: LaunchABI.version, tierBuild: BuildID.current ?? TierLaunch.noBuildID)
        }
        // Host memory: only L1's memslot (a memfd of its own), where L1's memory and, carved out
        // of it, L2's live.
        let slot = launch.l1Slot
        let host = try SharedRegion(adopt: TierLaunch.hostMemoryFD, name: "pvm-l1-memory", writable: true)
        guard host.size >= slot.memorySize else {
            throw TransportError.outOfBounds(offset: 0, length: slot.memorySize, regionSize: host.size)
        }
        self.exchange = exchange
        self.tables = tables
        self.hostMemory = HostMemory(region: host, base: slot.hostOffset)
        self.handoff = Handoff(region: exchange, base: layout.handoff(launch.vcpu))
        self.policy = placement.waitPolicy(for: tier, vcpus: layout.vcpuCount)
        beforeSandbox(self)
        try TierSandbox.enter(closing: [exchange, tables, host])
    }

    /// The same session on vCPU `i`: its lane and run page (for that vCPU's thread).
    public func vcpu(_ i: Int) -> TierSession {
        precondition(i >= 0 && i < launch.layout.vcpuCount, "vCPU \(i) of \(launch.layout.vcpuCount)")
        var s = self
        s.launch.vcpu = i
        s.handoff = Handoff(region: exchange, base: launch.layout.handoff(i))
        return s
    }

    /// L1's view of L0's control memory on its vCPU.
    public func l1Control() -> L1ControlView {
        precondition(tier == .l1, "\(tier) has no L1 view")
        return L1ControlView(exchange: exchange, tables: tables, layout: launch.layout, vcpu: launch.vcpu)
    }

    /// L2's view of L0's control memory on its vCPU.
    public func l2Control() -> L2ControlView {
        precondition(tier == .l2, "\(tier) has no L2 view")
        return L2ControlView(exchange: exchange, tables: tables, layout: launch.layout, vcpu: launch.vcpu)
    }

    /// This vCPU's run page between this tier and L0.
    public func runPage() -> RunPageView { RunPageView(fixed: exchange, base: launch.layout.runPage(launch.vcpu)) }

    /// Waits until L0 gives this tier the turn. When L0 stops the stack, the tier exits 0 here;
    /// if L0 is gone, 1 (PR_SET_PDEATHSIG normally gets there first).
    public func waitForTurn() {
        switch handoff.wait(for: tier, policy: policy) {
        case .myTurn: return
        case .stop: exit(0)
        case .peerGone: exit(1)
        case .timedOut: preconditionFailure("a child tier waits with no deadline")
        }
    }

    /// The tier's exit: hand the turn to L0 (the run page already says why) and wait to be entered.
    @inline(__always)
    public func exitToL0() {
        handoff.pass(to: .l0)
        waitForTurn()
    }
}
