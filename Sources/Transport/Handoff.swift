import ABI
import Atomics
import CPVMShim
#if canImport(Glibc)
import Glibc
#endif

/// How a tier waits for its turn. Spinning is fast (~0.2 us a hop) but holds a core; sleeping
/// in futex_wait costs ~14 us a hop on this machine kind. The stack never has more pure
/// spinners than cores: `CPUPlacement.waitPolicy(for:)` decides which tier spins and which yields.
public struct WaitPolicy: Sendable, Equatable {
    public enum Spin: Sendable, Equatable {
        /// Busy-wait with PAUSE: only for a tier that has a core to itself.
        case pause
        /// sched_yield between checks: for tiers sharing a core with the one that runs.
        case yield
    }
    public var spin: Spin
    /// How long to spin before sleeping; an idle stack ends up asleep (near 0% CPU).
    public var spinBudgetNanos: UInt64
    /// How long one futex sleep lasts before the waiter checks on its peers.
    public var sleepSliceNanos: Int64

    public init(spin: Spin, spinBudgetNanos: UInt64, sleepSliceNanos: Int64 = 50_000_000) {
        self.spin = spin
        self.spinBudgetNanos = spinBudgetNanos
        self.sleepSliceNanos = sleepSliceNanos
    }
}

extension Handoff {
    /// One futex sleep: the policy's slice, or less if `until` comes first (at least 1 us).
    static func slice(_ policy: WaitPolicy, until: UInt64) -> Int64 {
        guard until != .max else { return policy.sleepSliceNanos }
        let now = monotonicNanos()
        let left = until > now ? until - now : 0
        let cap = policy.sleepSliceNanos < 0 ? Int64.max : policy.sleepSliceNanos    // < 0: no timeout of its own
        return max(1_000, min(cap, Int64(clamping: left)))
    }
}

/// The outcome of waiting for a turn.
public enum WaitOutcome: Equatable, Sendable {
    case myTurn
    case stop
    /// `isPeerAlive` said no while this tier slept.
    case peerGone
    /// The clock reached the `until` the waiter gave (L0's next timer) before its turn came.
    case timedOut
}

/// A handoff lane of one vCPU (L0 and one child tier): whose turn it is. Only the tier named there runs; it passes
/// control by storing the next tier and, if that tier sleeps, waking it. The store/load pairs
/// are sequentially consistent (Dekker-style) so a wake-up is never lost.
public struct Handoff: @unchecked Sendable {
    let region: SharedRegion
    let turn: UnsafeAtomic<UInt32>
    let sleeping: [UnsafeAtomic<UInt32>]
    let turnAddress: UnsafeMutablePointer<UInt32>

    public init(region: SharedRegion, base: ControlOffset) {
        self.region = region
        self.turnAddress = region.word32(at: (base + HandoffLayout.turn).raw)
        // The words are u32s in the shared mapping, 4-byte aligned, accessed only atomically.
        self.turn = UnsafeAtomic(at: UnsafeMutableRawPointer(turnAddress)
            .assumingMemoryBound(to: UInt32.AtomicRepresentation.self))
        self.sleeping = Tier.allCases.map { t in
            UnsafeAtomic(at: UnsafeMutableRawPointer(region.word32(at: (base + HandoffLayout.sleeping(t)).raw))
                .assumingMemoryBound(to: UInt32.AtomicRepresentation.self))
        }
    }

    /// Gives the turn to `tier` and wakes it if it sleeps. Never over a "stop": a tier that held
    /// the turn while L0 stopped the stack must not erase the stop, or it (and its peers) would
    /// wait for a turn nobody gives. (A compare-exchange costs what the seq_cst store, an XCHG
    /// on x86, did.)
    @inline(__always)
    public func pass(to tier: Tier) {
        var current = turn.load(ordering: .relaxed)
        while current != HandoffLayout.stopValue {
            let (done, seen) = turn.weakCompareExchange(expected: current, desired: tier.rawValue, ordering: .sequentiallyConsistent)
            if done { break }
            current = seen
        }
        if current == HandoffLayout.stopValue { return }
        if sleeping[Int(tier.rawValue)].load(ordering: .sequentiallyConsistent) != 0 {
            _ = pvm_futex_wake(turnAddress, Int32.max)
        }
    }

    /// Tells every tier of this vCPU to stop, waking all sleepers.
    public func stop() {
        turn.store(HandoffLayout.stopValue, ordering: .sequentiallyConsistent)
        _ = pvm_futex_wake(turnAddress, Int32.max)
    }

    /// Waits until it is `me`'s turn (or stop). `isPeerAlive` is asked once per sleep slice
    /// however the sleep ends (a timeout, a wake-up, a turn word that changed under it), so a
    /// tier waiting on a dead, stopped or babbling peer notices instead of hanging. With `until`
    /// (a `monotonicNanos()` reading) the wait also ends, `.timedOut`, once the clock passes it:
    /// L0 waits so for the earliest timer of a halted vCPU.
    public func wait(for me: Tier, policy: WaitPolicy, until: UInt64 = .max, isPeerAlive: () -> Bool = { true }) -> WaitOutcome {
        let mine = me.rawValue
        var v = turn.load(ordering: .acquiring)
        if v == mine { return .myTurn }
        if v == HandoffLayout.stopValue { return .stop }

        // Spin phase: check the clock only every 64 rounds.
        let start = monotonicNanos()
        var rounds: UInt32 = 0
        while true {
            switch policy.spin {
            case .pause: pvm_cpu_relax()
            case .yield: sched_yield()
            }
            v = turn.load(ordering: .acquiring)
            if v == mine { return .myTurn }
            if v == HandoffLayout.stopValue { return .stop }
            rounds &+= 1
            if rounds & 63 == 0 {
                let now = monotonicNanos()
                if now >= until { return .timedOut }
                if now &- start > policy.spinBudgetNanos { break }
            }
        }

        // Sleep phase.
        let flag = sleeping[Int(mine)]
        var lastCheck = monotonicNanos()
        while true {
            flag.store(1, ordering: .sequentiallyConsistent)
            v = turn.load(ordering: .sequentiallyConsistent)
            if v != mine && v != HandoffLayout.stopValue {
                let r = pvm_futex_wait(turnAddress, v, Self.slice(policy, until: until))
                let now = monotonicNanos()
                if now >= until {
                    flag.store(0, ordering: .sequentiallyConsistent)
                    v = turn.load(ordering: .acquiring)
                    if v == mine { return .myTurn }
                    if v == HandoffLayout.stopValue { return .stop }
                    return .timedOut
                }
                if r == -ETIMEDOUT || now &- lastCheck >= UInt64(max(policy.sleepSliceNanos, 0)) {
                    lastCheck = now
                    if !isPeerAlive() {
                        flag.store(0, ordering: .sequentiallyConsistent)
                        return .peerGone
                    }
                }
            }
            flag.store(0, ordering: .sequentiallyConsistent)
            v = turn.load(ordering: .acquiring)
            if v == mine { return .myTurn }
            if v == HandoffLayout.stopValue { return .stop }
        }
    }
}
