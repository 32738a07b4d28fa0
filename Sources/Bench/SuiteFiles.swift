import ABI
import Foundation
import L0

// The memslot and host suites as files, so a user can script their figures as they can the exit
// tests': `pvm bench --suite memslot|host --json FILE --csv FILE`. Keys are snake_case, times in
// the unit their name says.

extension MemslotSuite.Row: Encodable {
    enum CodingKeys: String, CodingKey {
        case scenario, policy, deleteMicros = "delete_us_median", entriesZapped = "entries_zapped", refaults
        case rebuildMillis = "rebuild_ms_median"
    }
    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(scenario, forKey: .scenario)
        try c.encode(policy.rawValue, forKey: .policy)
        try c.encode(deleteMicros, forKey: .deleteMicros)
        try c.encode(entriesZapped, forKey: .entriesZapped)
        try c.encode(refaults, forKey: .refaults)
        try c.encode(rebuildMillis, forKey: .rebuildMillis)
    }
}

public enum SuiteFiles {
    struct Document<Row: Encodable>: Encodable {
        var suite: String
        var rows: [Row]
    }

    static func json<Row: Encodable>(_ suite: String, _ rows: [Row]) throws -> String {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        return String(decoding: try e.encode(Document(suite: suite, rows: rows)), as: UTF8.self) + "\n"
    }

    public static func json(_ rows: [MemslotSuite.Row]) throws -> String { try json("memslot", rows) }
    /// The host suite: the real host's figures and the emulated host's, each with its `source`.
    public static func json(_ figures: [HostFigure]) throws -> String { try json("host", figures) }

    public static func csv(_ rows: [MemslotSuite.Row]) -> String {
        "scenario,policy,delete_us_median,entries_zapped,refaults,rebuild_ms_median\n" + rows.map {
            "\($0.scenario),\($0.policy.rawValue),\(Report.fmt($0.deleteMicros, 2)),\($0.entriesZapped),\($0.refaults),\(Report.fmt($0.rebuildMillis, 3))"
        }.joined(separator: "\n") + "\n"
    }

    public static func csv(_ figures: [HostFigure]) -> String {
        func cell(_ s: String) -> String { s.contains(",") ? "\"\(s)\"" : s }
        return "source,what,setting,samples,min_ns,median_ns,max_ns\n" + figures.map {
            "\($0.source.rawValue),\(cell($0.what)),\(cell($0.setting)),\($0.samples),\($0.minNanos.map(String.init) ?? ""),"
                + "\($0.medianNanos),\($0.maxNanos.map(String.init) ?? "")"
        }.joined(separator: "\n") + "\n"
    }
}
