import ABI
import Foundation
import L0
import Transport

// The memslot and host suites as files, so a user can script their figures as they can the exit
// tests': `pvm bench --suite memslot|host --json FILE --csv FILE`. Keys are snake_case, times in
// the unit their name says.

extension MemslotSuite.Row: Encodable {
    enum CodingKeys: String, CodingKey {
        case source, scenario, policy, deleteMicros = "delete_us_median", entriesZapped = "entries_zapped", refaults
        case rebuildMillis = "rebuild_ms_median"
    }
    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode("emulated", forKey: .source)
        try c.encode(scenario, forKey: .scenario)
        try c.encode(policy.rawValue, forKey: .policy)
        try c.encode(deleteMicros, forKey: .deleteMicros)
        try c.encode(entriesZapped, forKey: .entriesZapped)
        try c.encode(refaults, forKey: .refaults)
        try c.encode(rebuildMillis, forKey: .rebuildMillis)
    }
}

/// One real-kernel memslot scenario as a row (`source: kvm`).
struct RealMemslotRow: Encodable {
    let result: RealMemslotProbe.Result
    enum CodingKeys: String, CodingKey {
        case source, scenario, targetMiB = "target_mib", otherMiB = "other_mib", rounds
        case firstTouch = "first_touch_ns_per_page", delete = "delete_us_median", refault = "refault_ns_per_page_median"
        case otherMapped = "other_mapped_ns_per_page", otherAfter = "other_after_ns_per_page_median", stats = "stats_across_delete"
    }
    func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        let r = result, med: ([Double]) -> Double = Median.of
        try c.encode("kvm", forKey: .source)
        try c.encode(r.scenario.name, forKey: .scenario)
        try c.encode(r.scenario.targetBytes >> 20, forKey: .targetMiB)
        try c.encode(r.scenario.otherBytes >> 20, forKey: .otherMiB)
        try c.encode(r.rounds.count, forKey: .rounds)
        try c.encode(r.firstTouchNanosPerPage, forKey: .firstTouch)
        try c.encode(med(r.rounds.map { Double($0.deleteNanos) / 1e3 }), forKey: .delete)
        try c.encode(med(r.rounds.map(\.targetRefaultNanosPerPage)), forKey: .refault)
        if r.scenario.otherBytes > 0 {
            try c.encode(r.otherMappedNanosPerPage, forKey: .otherMapped)
            try c.encode(med(r.rounds.map(\.otherRetouchNanosPerPage)), forKey: .otherAfter)
        }
        try c.encode(r.rounds.first?.statsAcrossDelete ?? [:], forKey: .stats)
    }
}

public enum SuiteFiles {
    struct Document<Row: Encodable>: Encodable {
        var suite: String
        /// The real host's facts (host suite, where /dev/kvm could be opened).
        var host: KVMHostFacts?
        var rows: [Row]
    }

    /// A suite's own result type as pretty, sorted, snake_case JSON (the transport and scaling suites).
    static func snakeCaseJSON<T: Encodable>(_ value: T) throws -> String {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        e.keyEncodingStrategy = .convertToSnakeCase
        return String(decoding: try e.encode(value), as: UTF8.self) + "\n"
    }

    static func json<Row: Encodable>(_ suite: String, _ rows: [Row], host: KVMHostFacts? = nil) throws -> String {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        return String(decoding: try e.encode(Document(suite: suite, host: host, rows: rows)), as: UTF8.self) + "\n"
    }

    /// The memslot suite: the emulated L0's rows (`source: emulated`), then the real kernel's (`kvm`).
    public static func json(_ rows: [MemslotSuite.Row], real: [RealMemslotProbe.Result] = []) throws -> String {
        struct Either: Encodable {
            let emulated: MemslotSuite.Row?, real: RealMemslotRow?
            func encode(to encoder: Encoder) throws { if let emulated { try emulated.encode(to: encoder) } else { try real?.encode(to: encoder) } }
        }
        return try json("memslot", rows.map { Either(emulated: $0, real: nil) } + real.map { Either(emulated: nil, real: RealMemslotRow(result: $0)) })
    }
    /// The host suite: the real host's figures and the emulated host's, each with its `source`.
    public static func json(_ figures: [HostFigure], host: KVMHostFacts? = nil) throws -> String { try json("host", figures, host: host) }

    /// One header for both kinds of row; a row leaves the other kind's columns empty.
    public static func csv(_ rows: [MemslotSuite.Row], real: [RealMemslotProbe.Result] = []) -> String {
        let med: ([Double]) -> Double = Median.of
        let emulated = rows.map {
            "emulated,\($0.scenario),\($0.policy.rawValue),\(Report.fmt($0.deleteMicros, 2)),\($0.entriesZapped),\($0.refaults),"
                + "\(Report.fmt($0.rebuildMillis, 3)),,,,,,,,"
        }
        let kernel = real.map { r -> String in
            let s = r.rounds.first?.statsAcrossDelete ?? [:]
            let other = r.scenario.otherBytes > 0
            return "kvm,\(r.scenario.name),,\(Report.fmt(med(r.rounds.map { Double($0.deleteNanos) / 1e3 }), 2)),,,,"
                + "\(r.scenario.targetBytes >> 20),\(r.scenario.otherBytes >> 20),\(Report.fmt(r.firstTouchNanosPerPage, 0)),"
                + "\(Report.fmt(med(r.rounds.map(\.targetRefaultNanosPerPage)), 0)),"
                + "\(other ? Report.fmt(r.otherMappedNanosPerPage, 0) : ""),\(other ? Report.fmt(med(r.rounds.map(\.otherRetouchNanosPerPage)), 0) : ""),"
                + "\(s["mmu_shadow_zapped"].map(String.init) ?? ""),\(s["remote_tlb_flush"].map(String.init) ?? "")"
        }
        return "source,scenario,policy,delete_us_median,entries_zapped,refaults,rebuild_ms_median,target_mib,other_mib,"
            + "first_touch_ns_per_page,refault_ns_per_page_median,other_mapped_ns_per_page,other_after_ns_per_page_median,"
            + "mmu_shadow_zapped,remote_tlb_flush\n"
            + (emulated + kernel).joined(separator: "\n") + "\n"
    }

    public static func csv(_ figures: [HostFigure]) -> String {
        func cell(_ s: String) -> String {
            s.contains(",") || s.contains("\"") ? "\"" + s.replacingOccurrences(of: "\"", with: "\"\"") + "\"" : s
        }
        return "source,what,setting,samples,min_ns,median_ns,max_ns\n" + figures.map {
            "\($0.source.rawValue),\(cell($0.what)),\(cell($0.setting)),\($0.samples),\($0.minNanos.map(String.init) ?? ""),"
                + "\($0.medianNanos),\($0.maxNanos.map(String.init) ?? "")"
        }.joined(separator: "\n") + "\n"
    }
}
