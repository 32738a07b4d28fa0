import ABI
import Foundation
import L0
import Transport

/// `pvm bench --suite transport`: what one hop of each path costs against the raw two-process
/// ring (`RawRing`) measured in the same run. A path's hop count per operation is what its
/// window counted (each exit and each entry is one hop: L2<->L0 on single and pv, four hops
/// through L1 on nvmx, L2<->L1 through the switcher on pvm-rfc); its median time per operation
/// over that count is its per-hop cost, and the ratio to the ring's is what the tiers' own work
/// and the transport's extra costs add to a bare handoff.
public enum TransportSuite {
    public struct Row: Codable, Equatable, Sendable {
        public var path: String
        public var test: String
        public var medianNanos: UInt64
        public var hopsPerOp: Double
        public var nanosPerHop: Double
        public var overRawHop: Double
    }
    public struct Result: Codable, Equatable, Sendable {
        /// ns per hop of the raw ring, median of its runs, and every run's.
        public var rawNanosPerHop: Double
        public var rawRuns: [Double]
        /// ns per hop of the same ring with both ends on the guest core (`RawRing.measureSameCore`),
        /// median of its runs, and every run's; nil when the tiers are not pinned (one CPU).
        public var sameCoreSwitchNanos: Double?
        public var sameCoreRuns: [Double]
        public var rows: [Row]
    }

    /// Hops per operation in a window: every exit and every entry, through L0 or the switcher.
    public static func hops(_ r: BenchResult) -> Double {
        let w = r.window
        let switcherEntries = w[switcher: .entries]
        let n = w.totalL2Exits &+ w.l2Entries &+ w.totalL1Exits &+ w.l1Entries &+ w.totalSwitcherExits &+ switcherEntries
        return r.iterations == 0 ? 0 : Double(n) / Double(r.iterations)
    }

    /// The ring, then `test` on each path, then the ring again (its runs from both ends
    /// together, so a machine that slows down during the run shows in the ring's spread).
    /// Three runs of 100,000 round trips of the raw ring, its echo on the guest core: what the
    /// transport and scaling suites set their hops beside.
    static func rawRingRuns(tierExecutable: String, placement: CPUPlacement) throws -> [Double] {
        try RawRing.measure(executable: tierExecutable, arguments: ["__ring"] + (placement.guestCPU.map { ["--cpu", "\($0)"] } ?? []),
                            placement: placement, roundTrips: 100_000, runs: 3)
    }

    /// Three runs of 20,000 round trips of the ring on the guest core alone, each hop a switch
    /// between two processes there: the floor under a path whose tiers take turns on one core.
    static func sameCoreRuns(tierExecutable: String, placement: CPUPlacement) throws -> [Double] {
        guard let cpu = placement.guestCPU, placement.isPinned else { return [] }
        return try RawRing.measureSameCore(executable: tierExecutable, arguments: ["__ring", "--cpu", "\(cpu)"], cpu: cpu,
                                           roundTrips: 20_000, runs: 3)
    }

    public static func run(tierExecutable: String, paths: [NestingPath], test: String = "cpuid",
                           placement: CPUPlacement = .automatic(), progress: (String) -> Void = { _ in }) throws -> Result {
        func ring() throws -> [Double] { try rawRingRuns(tierExecutable: tierExecutable, placement: placement) }
        func sameCore() throws -> [Double] { try sameCoreRuns(tierExecutable: tierExecutable, placement: placement) }
        progress("transport suite: the raw ring")
        var rawRuns = try ring()
        var switchRuns = try sameCore()
        var results: [BenchResult] = []
        var runner = BenchRunner(tierExecutable: tierExecutable, iterations: 1_000_000, warmup: 1_000)
        runner.minNanos = 100_000_000            // as the exit tests: double until a run lasts 100 ms
        runner.placement = placement
        for p in paths {
            progress("transport suite: \(test) on \(p.rawValue)")
            results.append(try runner.run(test, on: BenchVariant(path: p)))
        }
        progress("transport suite: the raw ring again")
        rawRuns += try ring()
        switchRuns += try sameCore()
        let raw = Median.of(rawRuns)
        let rows = results.map { r -> Row in
            let h = hops(r)
            let perHop = h > 0 ? Double(r.latency.medianNanos) / h : 0
            return Row(path: r.variant.label, test: r.test, medianNanos: r.latency.medianNanos, hopsPerOp: h,
                       nanosPerHop: perHop, overRawHop: raw > 0 ? perHop / raw : 0)
        }
        return Result(rawNanosPerHop: raw, rawRuns: rawRuns, sameCoreSwitchNanos: switchRuns.isEmpty ? nil : Median.of(switchRuns),
                      sameCoreRuns: switchRuns, rows: rows)
    }

    /// The table's first line: the raw ring's hop, its runs and their spread.
    static func rawRingLine(_ perHop: Double, runs: [Double]) -> String {
        "raw two-process ring: \(Report.fmt(perHop, 0)) ns per hop (median of \(runs.count) runs of 100,000 round trips, "
            + "\(Report.fmt(runs.min() ?? 0, 0))-\(Report.fmt(runs.max() ?? 0, 0)))\n"
    }

    /// The floor the guest core adds: what one switch between two processes there costs.
    static func sameCoreLine(_ perHop: Double, runs: [Double]) -> String {
        "same-core switch: \(Report.fmt(perHop, 0)) ns per hop (the ring on the guest core alone, yielding; "
            + "median of \(runs.count) runs of 20,000 round trips, \(Report.fmt(runs.min() ?? 0, 0))-\(Report.fmt(runs.max() ?? 0, 0)))\n"
    }

    /// Below the table: what the same-core switch means for the nested paths, in this run's figure.
    static func sameCoreNote(_ perHop: Double) -> String {
        "An L2 exit that L1 handles (every CPUID on nvmx) switches the guest core from L2 to L1 and back: "
            + "at least 2 x \(Report.fmt(perHop, 0)) = \(Report.fmt(2 * perHop, 0)) ns a round trip, whatever L0 does.\n"
    }

    public static func table(_ r: Result) -> String {
        var out = rawRingLine(r.rawNanosPerHop, runs: r.rawRuns)
        if let s = r.sameCoreSwitchNanos { out += sameCoreLine(s, runs: r.sameCoreRuns) }
        out += Report.pad("path", 16) + Report.pad("test", 8) + Report.pad("median ns", 11, right: true) + Report.pad("hops/op", 9, right: true)
            + Report.pad("ns/hop", 9, right: true) + Report.pad("x raw hop", 11, right: true) + "\n"
        for row in r.rows {
            out += Report.pad(row.path, 16) + Report.pad(row.test, 8) + Report.pad("\(row.medianNanos)", 11, right: true)
                + Report.pad(Report.fmt(row.hopsPerOp), 9, right: true) + Report.pad(Report.fmt(row.nanosPerHop, 0), 9, right: true)
                + Report.pad(Report.fmt(row.overRawHop), 11, right: true) + "\n"
        }
        if let s = r.sameCoreSwitchNanos, r.rows.contains(where: { $0.path.hasPrefix("nvmx") }) { out += sameCoreNote(s) }
        return out
    }

    public static func json(_ r: Result) throws -> String { try SuiteFiles.snakeCaseJSON(r) }

    public static func csv(_ r: Result) -> String {
        var out = "path,test,median_ns,hops_per_op,ns_per_hop,over_raw_hop,raw_ns_per_hop,same_core_switch_ns\n"
        for row in r.rows {
            out += [row.path, row.test, "\(row.medianNanos)", Report.fmt(row.hopsPerOp, 4), Report.fmt(row.nanosPerHop, 1),
                    Report.fmt(row.overRawHop, 3), Report.fmt(r.rawNanosPerHop, 1),
                    r.sameCoreSwitchNanos.map { Report.fmt($0, 1) } ?? ""].joined(separator: ",") + "\n"
        }
        return out
    }
}
