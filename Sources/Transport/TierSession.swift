import ABI
#if canImport(Glibc)
import Glibc
#endif

/// What a child tier (L1 or L2) does first and holds while it runs: its process identity, the
/// two memfds L0 handed it, and its end of the vCPU's handoff. Shared by both child tiers.
public struct TierSession: @unchecked Sendable {
    public let tier: Tier
    public let launch: TierLaunch
    public let control: ControlMemory
    public let hostMemory: HostMemory
    public let handoff: Handoff
    public let policy: WaitPolicy

    /// Takes the tier's name, dies with L0, pins itself, maps the memfds. Exits the process if
    /// its parent is already gone; throws if the memfds cannot be mapped.
    public init(_ tier: Tier, _ launch: TierLaunch) throws {
        TierProcess.setName(tier)
        guard TierProcess.dieWithParent(expectedParent: launch.parent) else { exit(1) }
        StopSignals.ignore()
        let placement = CPUPlacement(l0CPU: nil, guestCPU: launch.cpu)
        placement.apply(as: tier)
        self.tier = tier
        self.launch = launch
        let controlRegion = try SharedRegion(adopt: TierLaunch.controlFD)
        guard controlRegion.size >= launch.layout.totalSize else {
            throw TransportError.outOfBounds(offset: 0, length: launch.layout.totalSize, regionSize: controlRegion.size)
        }
        // The control memory must be the one an L0 of this launch ABI made (L0's header).
        let magic: UInt64 = try controlRegion.load(at: ControlLayout.magicOffset.raw)
        let abi: UInt64 = try controlRegion.load(at: ControlLayout.launchABIOffset.raw)
        guard magic == ControlLayout.magic, abi == LaunchABI.version else {
            throw TierLaunch.OtherBuild(l0ABI: abi, l0Build: magic == ControlLayout.magic ? launch.build : "(no control-memory magic)",
                                        tierABI: LaunchABI.version, tierBuild: BuildID.current ?? TierLaunch.noBuildID)
        }
        self.control = ControlMemory(region: controlRegion, layout: launch.layout)
        self.hostMemory = HostMemory(region: try SharedRegion(adopt: TierLaunch.hostMemoryFD))
        self.handoff = control.handoff(vcpu: launch.vcpu)
        self.policy = placement.waitPolicy(for: tier)
    }

    /// This vCPU's run page between this tier and L0.
    public func runPage() -> RunPageView { control.runPage(tier, vcpu: launch.vcpu) }

    /// Waits until L0 gives this tier the turn. When L0 stops the stack, the tier exits 0 here;
    /// if L0 is gone, 1 (PR_SET_PDEATHSIG normally gets there first).
    public func waitForTurn() {
        switch handoff.wait(for: tier, policy: policy) {
        case .myTurn: return
        case .stop: exit(0)
        case .peerGone: exit(1)
        }
    }

    /// The tier's exit: hand the turn to L0 (the run page already says why) and wait to be entered.
    @inline(__always)
    public func exitToL0() {
        handoff.pass(to: .l0)
        waitForTurn()
    }
}
