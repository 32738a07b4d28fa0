import ABI
import L0

/// One row of a benchmark: one test on one path, measured in one stack run.
public struct BenchResult: Sendable {
    public var test: String
    public var variant: BenchVariant
    public var path: NestingPath { variant.path }
    public var iterations: UInt64
    public var latency: LatencyReport
    /// Transitions in the measurement window.
    public var window: TransitionCounters

    public init(test: String, variant: BenchVariant, iterations: UInt64, latency: LatencyReport, window: TransitionCounters) {
        self.test = test
        self.variant = variant
        self.iterations = iterations
        self.latency = latency
        self.window = window
    }

    func perOp(_ n: UInt64) -> Double { iterations == 0 ? 0 : Double(n) / Double(iterations) }
    public var l2ExitsPerOp: Double { perOp(window.totalL2Exits) }
    public var l2EntriesPerOp: Double { perOp(window.l2Entries) }
    public var l1EntriesPerOp: Double { perOp(window.l1Entries) }
    public var l1ExitsPerOp: Double { perOp(window.totalL1Exits) }
    public var deliveriesPerOp: Double { perOp(window.totalDeliveries) }
    public var hypercallsPerOp: Double { perOp(window.hypercalls.total) }
    public var l1ExitsByReasonPerOp: [(ExitReason, Double)] {
        TransitionCounters.byReason(window.l1Exits).sorted { $0.key < $1.key }.map { ($0.key, perOp($0.value)) }
    }
    public var l2ExitsByReasonPerOp: [(ExitReason, Double)] {
        TransitionCounters.byReason(window.l2Exits).sorted { $0.key < $1.key }.map { ($0.key, perOp($0.value)) }
    }
    /// pvm-rfc: L2 -> L1 exits through the switcher, and what the switcher and L1's shadow MMU did.
    public var switcherExitsPerOp: Double { perOp(window.totalSwitcherExits) }
    public var switcherExitsByReasonPerOp: [(ExitReason, Double)] {
        TransitionCounters.byReason(window.switcherExits).sorted { $0.key < $1.key }.map { ($0.key, perOp($0.value)) }
    }
    /// The switcher's counters other than its entries (which follow its exits), non-zero only.
    public var switcherEventsPerOp: [(SwitcherCounter, Double)] {
        SwitcherCounter.allCases.filter { $0 != .entries && window[switcher: $0] > 0 }.map { ($0, perOp(window[switcher: $0])) }
    }
    /// L2's own events (syscalls, exceptions, TLB misses), every path.
    public var l2EventsPerOp: [(L2EventCounter, Double)] {
        L2EventCounter.allCases.map { ($0, perOp(window[l2: $0])) }
    }
}
