import ABI
import Foundation
import L0

/// Turns results into the printed table and the JSON export.
public enum Report {
    static func pad(_ s: String, _ w: Int, right: Bool = false) -> String {
        s.count >= w ? s : (right ? String(repeating: " ", count: w - s.count) + s : s + String(repeating: " ", count: w - s.count))
    }
    static func fmt(_ d: Double, _ digits: Int = 2) -> String {
        // Counts a guest claims can make a figure huge: printed, never converted past Int.
        if digits == 0 { return d.isFinite && abs(d) < 9e18 ? String(Int(d.rounded())) : String(format: "%.3g", d) }
        let m = pow10(digits)
        let v = (d * m).rounded() / m
        var s = "\(v)"
        if let dot = s.firstIndex(of: ".") {
            let decimals = s.distance(from: dot, to: s.endIndex) - 1
            if decimals < digits { s += String(repeating: "0", count: digits - decimals) }
        } else { s += "." + String(repeating: "0", count: digits) }
        return s
    }
    static func pow10(_ n: Int) -> Double { (0..<n).reduce(1.0) { r, _ in r * 10 } }

    /// The table: per test and path, latency and transitions per operation for each tier.
    public static func table(_ results: [BenchResult], profile: CostProfile? = nil) -> String {
        let header = ["test", "path", "iters", "median ns", "p99 ns", "model cyc", "(estimates low-high)", "L2 exits", "L2 entries", "L1 entries", "L1 exits", "hcalls", "L2->L1", "L1 exits by reason; pvm-rfc: switcher exits, shadow MMU (per op)"]
        let testWidth = max(8, results.map(\.test.count).max() ?? 0)
        let pathWidth = max(14, results.map(\.variant.label.count).max() ?? 0)
        let widths = [testWidth, pathWidth, 8, 10, 10, 10, 20, 9, 10, 10, 9, 7, 7, 0]
        var out = zip(header, widths).map { pad($0, $1, right: $1 > 0 && $0 != "test" && $0 != "path") }.joined(separator: " ") + "\n"
        for r in results {
            var reasons = r.l1ExitsByReasonPerOp.map { "\($0.0.name)=\(fmt($0.1))" }.joined(separator: " ")
            if r.path.usesSwitcher {
                let sw = r.switcherExitsByReasonPerOp.map { "\($0.0.name)=\(fmt($0.1))" }
                    + r.switcherEventsPerOp.map { "\($0.0.key)=\(fmt($0.1))" }
                reasons = ([reasons].filter { !$0.isEmpty } + sw).joined(separator: " ")
            }
            let model = profile.map { fmt(CostModel.cyclesPerOp(r, $0), 0) } ?? "-"
            let range = profile.map { p -> String in
                let r = CostModel.cyclesRangePerOp(r, p)
                return r.lowerBound == r.upperBound ? "-" : "\(fmt(r.lowerBound, 0))-\(fmt(r.upperBound, 0))"
            } ?? "-"
            let cells = [r.test, r.variant.label, "\(r.iterations)", "\(r.latency.medianNanos)", "\(r.latency.p99Nanos)", model, range,
                         fmt(r.l2ExitsPerOp), fmt(r.l2EntriesPerOp), fmt(r.l1EntriesPerOp), fmt(r.l1ExitsPerOp),
                         fmt(r.hypercallsPerOp), fmt(r.switcherExitsPerOp), reasons.isEmpty ? "-" : reasons]
            out += zip(cells, widths).enumerated().map { i, cw in pad(cw.0, cw.1, right: i >= 2 && i < 13) }.joined(separator: " ") + "\n"
        }
        return out
    }

    /// Ratios between paths of the same test, from the same run: each against the one-level
    /// baseline (what nesting costs) and against pv (what the PV ABI saves); with a profile, the
    /// model's ratio beside the measured one (this emulation's times are not hardware's).
    public static func ratios(_ results: [BenchResult], profile: CostProfile? = nil) -> String {
        var out = ""
        var tests: [String] = []
        for r in results where !tests.contains(r.test) { tests.append(r.test) }
        for test in tests {
            let rows = results.filter { $0.test == test }
            for base in [BenchVariant(path: .single), BenchVariant(path: .pv)] {
                guard let b = rows.first(where: { $0.variant == base }), b.latency.medianNanos > 0 else { continue }
                for r in rows where r.variant != b.variant && !(base.path == .pv && r.path == .single) {
                    var line = "\(test): \(r.variant.label) / \(base.label) = \(fmt(Double(r.latency.medianNanos) / Double(b.latency.medianNanos))) x (median)"
                    if let profile {
                        let mb = CostModel.cyclesPerOp(b, profile), mr = CostModel.cyclesPerOp(r, profile)
                        line += mb > 0 ? ", \(fmt(mr / mb)) x (model)" : ", model \(fmt(mr, 0)) vs 0 cycles"
                    }
                    out += line + "\n"
                }
            }
        }
        return out
    }

    /// kvm-unit-tests' vmexit.flat shape: `NAME VALUE` per test, one block per path. VALUE is the
    /// median in ns (this emulation's time is wall time, not TSC cycles; the model's cycles are
    /// in the table and the JSON).
    public static func vmexitFormat(_ results: [BenchResult]) -> String {
        var out = ""
        var labels: [String] = []
        for r in results where !labels.contains(r.variant.label) { labels.append(r.variant.label) }
        for label in labels {
            out += "# \(label) (median ns per iteration)\n"
            for r in results where r.variant.label == label { out += "\(r.test) \(r.latency.medianNanos)\n" }
        }
        return out
    }

    /// CSV with a header row, one row per result.
    public static func csv(_ results: [BenchResult], profile: CostProfile?) -> String {
        var out = "test,path,variant,iterations,median_ns,p99_ns,model_cycles,model_cycles_low,model_cycles_high,l2_exits,l2_entries,l1_entries,l1_exits,hypercalls,switcher_exits\n"
        for r in results {
            let model = profile.map { fmt(CostModel.cyclesPerOp(r, $0), 1) } ?? ""
            let range = profile.map { CostModel.cyclesRangePerOp(r, $0) }
            out += [r.test, r.path.rawValue, r.variant.label, "\(r.iterations)", "\(r.latency.medianNanos)", "\(r.latency.p99Nanos)",
                    model, range.map { fmt($0.lowerBound, 1) } ?? "", range.map { fmt($0.upperBound, 1) } ?? "", fmt(r.l2ExitsPerOp, 4), fmt(r.l2EntriesPerOp, 4), fmt(r.l1EntriesPerOp, 4), fmt(r.l1ExitsPerOp, 4),
                    fmt(r.hypercallsPerOp, 4), fmt(r.switcherExitsPerOp, 4)].joined(separator: ",") + "\n"
        }
        return out
    }

    /// One exported row; field names are the JSON keys.
    struct Row: Encodable {
        struct Latency: Encodable { var median, p99, min, max: UInt64; var mean: Double }
        struct PerOp: Encodable { var l2_exits, l1_entries, l1_exits, l2_entries, deliveries_to_l1, hypercalls, switcher_exits: Double }
        var test: String
        var path: String
        var variant: String
        var pv_features: String?
        var l2_map: String
        var iterations: UInt64
        var ns_per_op: Latency
        var per_op: PerOp
        var model_cycles_per_op: Double?
        /// The model's total with every estimated price at its low and at its high end.
        var model_cycles_range: ModelRange?
        struct ModelRange: Encodable { var low, high: Double }
        var l2_exits_by_reason: [String: Double]
        var l1_exits_by_reason: [String: Double]
        /// pvm-rfc: L2 -> L1 exits through the switcher by reason, and the switcher's and shadow
        /// MMU's events (L1's counts); empty elsewhere.
        var switcher_exits_by_reason: [String: Double]
        var switcher_events: [String: Double]
        /// L2's own events on every path (syscalls, exceptions, TLB misses).
        var l2_events: [String: Double]
    }
    struct Document: Encodable { var results: [Row] }

    /// JSON in the documented shape: {"results":[{test, path, iterations, ns_per_op{median,p99,...},
    /// per_op{l2_exits,l1_entries,l1_exits,l2_entries,...}, l1_exits_by_reason{...}}]}.
    /// per_op values are averages per guest operation over the measurement window.
    public static func json(_ results: [BenchResult], profile: CostProfile? = nil) throws -> String {
        let rows = results.map { r in
            Row(test: r.test, path: r.path.rawValue, variant: r.variant.label,
                pv_features: r.path == .pv ? r.variant.pvFeatures.description : nil,
                l2_map: r.variant.l2MapMode.rawValue, iterations: r.iterations,
                ns_per_op: .init(median: r.latency.medianNanos, p99: r.latency.p99Nanos, min: r.latency.minNanos,
                                 max: r.latency.maxNanos, mean: Double(r.latency.totalNanos) / Double(max(r.iterations, 1))),
                per_op: .init(l2_exits: r.l2ExitsPerOp, l1_entries: r.l1EntriesPerOp, l1_exits: r.l1ExitsPerOp,
                              l2_entries: r.l2EntriesPerOp, deliveries_to_l1: r.deliveriesPerOp, hypercalls: r.hypercallsPerOp,
                              switcher_exits: r.switcherExitsPerOp),
                model_cycles_per_op: profile.map { CostModel.cyclesPerOp(r, $0) },
                model_cycles_range: profile.map { let x = CostModel.cyclesRangePerOp(r, $0); return .init(low: x.lowerBound, high: x.upperBound) },
                l2_exits_by_reason: Dictionary(uniqueKeysWithValues: r.l2ExitsByReasonPerOp.map { ($0.0.name, $0.1) }),
                l1_exits_by_reason: Dictionary(uniqueKeysWithValues: r.l1ExitsByReasonPerOp.map { ($0.0.name, $0.1) }),
                switcher_exits_by_reason: Dictionary(uniqueKeysWithValues: r.switcherExitsByReasonPerOp.map { ($0.0.name, $0.1) }),
                switcher_events: Dictionary(uniqueKeysWithValues: r.switcherEventsPerOp.map { ($0.0.key, $0.1) }),
                l2_events: Dictionary(uniqueKeysWithValues: r.l2EventsPerOp.map { ($0.0.key, $0.1) }))
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return String(decoding: try encoder.encode(Document(results: rows)), as: UTF8.self) + "\n"
    }
}
