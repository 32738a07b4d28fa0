import ABI
import Foundation
import L0
import Transport

/// `pvm stat`: per tier and exit reason, how often L0 handled the exit and how long it took from
/// the exit until L0 handed the vCPU on, in the shape of `perf kvm stat report`.
public enum ExitStats {
    public struct Row: Equatable, Sendable {
        public var tier: Tier
        public var reason: ExitReason
        public var samples: Int
        public var totalNanos: UInt64
        public var minNanos: UInt64
        public var maxNanos: UInt64
        public var avgNanos: Double { samples == 0 ? 0 : Double(totalNanos) / Double(samples) }
    }

    /// Rows from L0's spans, most time first.
    public static func rows(_ log: TransitionLog) -> [Row] {
        var by: [String: Row] = [:]
        for s in log.spans where s.tier == .l0 {
            let key = "\(s.exitFrom.rawValue)/\(s.reason.rawValue)"
            var r = by[key] ?? Row(tier: s.exitFrom, reason: s.reason, samples: 0, totalNanos: 0, minNanos: .max, maxNanos: 0)
            r.samples += 1
            r.totalNanos += s.nanos
            r.minNanos = min(r.minNanos, s.nanos)
            r.maxNanos = max(r.maxNanos, s.nanos)
            by[key] = r
        }
        return by.values.sorted { ($0.totalNanos, $0.samples) > ($1.totalNanos, $1.samples) }
    }

    public static func report(_ rows: [Row]) -> String {
        let samples = max(1, rows.reduce(0) { $0 + $1.samples })
        let time = max(1, rows.reduce(UInt64(0)) { $0 + $1.totalNanos })
        var out = "Analyze events for the L0 of one stack, all vCPUs (time: exit until L0 hands the vCPU on):\n\n"
        out += "  tier           VM-EXIT    Samples  Samples%     Time%    Min Time    Max Time         Avg time\n\n"
        for r in rows {
            out += "  " + Report.pad(r.tier.description, 4) + Report.pad(r.reason.name, 18, right: true)
                + Report.pad("\(r.samples)", 11, right: true)
                + Report.pad(Report.fmt(100 * Double(r.samples) / Double(samples), 2) + "%", 10, right: true)
                + Report.pad(Report.fmt(100 * Double(r.totalNanos) / Double(time), 2) + "%", 10, right: true)
                + Report.pad(Report.fmt(Double(r.minNanos) / 1000, 2) + "us", 12, right: true)
                + Report.pad(Report.fmt(Double(r.maxNanos) / 1000, 2) + "us", 12, right: true)
                + Report.pad(Report.fmt(r.avgNanos / 1000, 2) + "us", 17, right: true) + "\n"
        }
        out += "\nTotal Samples:\(samples), Total events handled time:\(Report.fmt(Double(time) / 1000, 2))us.\n"
        return out
    }
}

/// `pvm trace`: a Chrome / Perfetto trace (the JSON "traceEvents" format) with one track per tier
/// of the vCPU: every run span, and every L0 span named after the exit it handled. It opens in
/// ui.perfetto.dev and chrome://tracing.
public enum ChromeTrace {
    struct Event: Encodable {
        var name: String
        var cat: String
        var ph: String
        var ts: Double
        var dur: Double?
        var pid: Int
        var tid: Int
        var args: [String: String]?
    }
    struct Document: Encodable {
        var traceEvents: [Event]
        var displayTimeUnit = "ns"
    }

    public static func json(_ log: TransitionLog, vcpu: Int = 0, title: String) throws -> Data {
        let origin = log.spans.first?.startNanos ?? 0
        var events: [Event] = [Event(name: "process_name", cat: "__metadata", ph: "M", ts: 0, pid: vcpu, tid: 0,
                                     args: ["name": "\(title) vCPU \(vcpu)"])]
        for t in Tier.allCases {
            events.append(Event(name: "thread_name", cat: "__metadata", ph: "M", ts: 0, pid: vcpu, tid: Int(t.rawValue),
                                args: ["name": "\(t) (\(TierProcess.name(of: t)))"]))
        }
        for s in log.spans where s.endNanos >= s.startNanos && s.startNanos >= origin {
            let name = s.tier == .l0 ? "handle \(s.reason.name) from \(s.exitFrom)" : "run, exits \(s.reason.name)"
            events.append(Event(name: name, cat: s.tier.description, ph: "X", ts: Double(s.startNanos - origin) / 1000,
                                dur: Double(s.nanos) / 1000, pid: vcpu, tid: Int(s.tier.rawValue), args: ["exit": s.reason.name]))
        }
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return try e.encode(Document(traceEvents: events))
    }
}
