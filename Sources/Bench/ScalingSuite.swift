import ABI
import Foundation
import L0
import Transport

/// `pvm bench --vcpus 1,2,4,8`: a test on every vCPU of stacks with more and more vCPUs, on a
/// machine with fewer cores than tiers. Per stack: each vCPU's own rate, the stack's total, and
/// what one hop cost, beside the raw two-process ring measured in the same run (before and after).
///
/// L0 is one thread that every vCPU's exits go through, so its hops are serial: the cost of one
/// hop is the measured span (the longest vCPU's loop) over every vCPU's hops in it. The vCPUs
/// meet before their loops (`GuestCPU.rendezvous`), so their loops overlap; a vCPU that ends
/// first leaves the others a faster L0, which is what the per-vCPU spread shows.
public enum ScalingSuite {
    public struct Row: Codable, Equatable, Sendable {
        public var test: String
        public var path: String
        public var vcpus: Int
        /// Each vCPU's median ns per operation, and its operations per second over its loop.
        public var perVCPUMedianNanos: [UInt64]
        public var perVCPUOpsPerSecond: [Double]
        /// Every vCPU's operations over the longest loop.
        public var totalOpsPerSecond: Double
        public var hopsPerOp: Double
        public var nanosPerHop: Double
        public var overRawHop: Double
    }
    public struct Result: Codable, Equatable, Sendable {
        public var rawNanosPerHop: Double
        public var rawRuns: [Double]
        public var rows: [Row]
    }

    /// One row from the per-vCPU results of one stack.
    public static func row(_ results: [BenchResult], vcpus: Int, rawNanosPerHop raw: Double) -> Row {
        let span = results.map(\.latency.totalNanos).max() ?? 0
        let ops = results.reduce(0) { $0 + $1.iterations }
        let hops = results.reduce(0.0) { $0 + TransportSuite.hops($1) * Double($1.iterations) }
        let perHop = hops > 0 ? Double(span) / hops : 0
        return Row(test: results.first?.test ?? "", path: results.first?.variant.label ?? "", vcpus: vcpus,
                   perVCPUMedianNanos: results.map(\.latency.medianNanos),
                   perVCPUOpsPerSecond: results.map { $0.latency.totalNanos > 0 ? Double($0.iterations) * 1e9 / Double($0.latency.totalNanos) : 0 },
                   totalOpsPerSecond: span > 0 ? Double(ops) * 1e9 / Double(span) : 0,
                   hopsPerOp: ops > 0 ? hops / Double(ops) : 0, nanosPerHop: perHop, overRawHop: raw > 0 ? perHop / raw : 0)
    }

    /// The ring, then each test on each path with each vCPU count, then the ring again.
    public static func run(runner: BenchRunner, tests: [String], paths: [NestingPath], vcpuCounts: [Int],
                           progress: (String) -> Void = { _ in }) throws -> Result {
        func ring() throws -> [Double] { try TransportSuite.rawRingRuns(tierExecutable: runner.tierExecutable, placement: runner.placement) }
        progress("vCPU scaling: the raw ring")
        var rawRuns = try ring()
        var measured: [([BenchResult], Int)] = []
        for t in tests {
            for p in paths {
                for n in vcpuCounts {
                    progress("vCPU scaling: \(t) on \(p.rawValue) with \(n) vCPU\(n == 1 ? "" : "s")")
                    measured.append((try runner.run(t, on: BenchVariant(path: p), vcpus: n), n))
                }
            }
        }
        progress("vCPU scaling: the raw ring again")
        rawRuns += try ring()
        let raw = Median.of(rawRuns)
        return Result(rawNanosPerHop: raw, rawRuns: rawRuns, rows: measured.map { row($0.0, vcpus: $0.1, rawNanosPerHop: raw) })
    }

    public static func table(_ r: Result) -> String {
        var out = TransportSuite.rawRingLine(r.rawNanosPerHop, runs: r.rawRuns)
        out += Report.pad("test", 8) + Report.pad("path", 15) + Report.pad("vCPUs", 6, right: true)
            + Report.pad("ns/op per vCPU", 17, right: true) + Report.pad("kops/s per vCPU", 17, right: true)
            + Report.pad("total kops/s", 14, right: true) + Report.pad("hops/op", 9, right: true)
            + Report.pad("ns/hop", 8, right: true) + Report.pad("x raw hop", 11, right: true) + "\n"
        func range<T: Comparable>(_ xs: [T], _ f: (T) -> String) -> String {
            guard let lo = xs.min(), let hi = xs.max() else { return "-" }
            return lo == hi ? f(lo) : "\(f(lo))-\(f(hi))"
        }
        for row in r.rows {
            out += Report.pad(row.test, 8) + Report.pad(row.path, 15) + Report.pad("\(row.vcpus)", 6, right: true)
                + Report.pad(range(row.perVCPUMedianNanos) { "\($0)" }, 17, right: true)
                + Report.pad(range(row.perVCPUOpsPerSecond) { Report.fmt($0 / 1000, 0) }, 17, right: true)
                + Report.pad(Report.fmt(row.totalOpsPerSecond / 1000, 0), 14, right: true)
                + Report.pad(Report.fmt(row.hopsPerOp), 9, right: true) + Report.pad(Report.fmt(row.nanosPerHop, 0), 8, right: true)
                + Report.pad(Report.fmt(row.overRawHop), 11, right: true) + "\n"
        }
        out += "ns/op: each vCPU's median (lowest-highest over the vCPUs); kops/s per vCPU: its operations over its own loop; "
            + "total: every vCPU's operations over the longest loop; ns/hop: that loop over every vCPU's hops (L0 takes them one at a time; "
            + "on pvm-rfc, L2's threads share one core).\n"
        return out
    }

    public static func json(_ r: Result) throws -> String { try SuiteFiles.snakeCaseJSON(r) }

    public static func csv(_ r: Result) -> String {
        var out = "test,path,vcpus,vcpu,median_ns,ops_per_second,total_ops_per_second,hops_per_op,ns_per_hop,over_raw_hop,raw_ns_per_hop\n"
        for row in r.rows {
            for (i, (median, rate)) in zip(row.perVCPUMedianNanos, row.perVCPUOpsPerSecond).enumerated() {
                out += [row.test, row.path, "\(row.vcpus)", "\(i)", "\(median)", Report.fmt(rate, 0), Report.fmt(row.totalOpsPerSecond, 0),
                        Report.fmt(row.hopsPerOp, 4), Report.fmt(row.nanosPerHop, 1), Report.fmt(row.overRawHop, 3),
                        Report.fmt(r.rawNanosPerHop, 1)].joined(separator: ",") + "\n"
            }
        }
        return out
    }
}
