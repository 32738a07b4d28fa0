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

extension HostSuite.Row: Encodable {
    enum CodingKeys: String, CodingKey {
        case enableVirtAtLoad = "enable_virt_at_load", oneTimeSetup = "one_time_setup", loadNanos = "load_ns"
        case firstVMNanos = "first_vm_ns", nextVMNanos = "next_vm_ns", destroyLastVMNanos = "destroy_last_vm_ns"
        case firstProtectedVMNanos = "first_protected_vm_ns"
    }
    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(enableVirtAtLoad, forKey: .enableVirtAtLoad)
        try c.encode(oneTimeSetup.rawValue, forKey: .oneTimeSetup)
        try c.encode(loadNanos, forKey: .loadNanos)
        try c.encode(firstVMNanos, forKey: .firstVMNanos)
        try c.encode(nextVMNanos, forKey: .nextVMNanos)
        try c.encode(destroyLastVMNanos, forKey: .destroyLastVMNanos)
        try c.encode(firstProtectedVMNanos, forKey: .firstProtectedVMNanos)   // null when the setup is off
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
    public static func json(_ rows: [HostSuite.Row]) throws -> String { try json("host", rows) }

    public static func csv(_ rows: [MemslotSuite.Row]) -> String {
        "scenario,policy,delete_us_median,entries_zapped,refaults,rebuild_ms_median\n" + rows.map {
            "\($0.scenario),\($0.policy.rawValue),\(Report.fmt($0.deleteMicros, 2)),\($0.entriesZapped),\($0.refaults),\(Report.fmt($0.rebuildMillis, 3))"
        }.joined(separator: "\n") + "\n"
    }

    public static func csv(_ rows: [HostSuite.Row]) -> String {
        "enable_virt_at_load,one_time_setup,load_ns,first_vm_ns,next_vm_ns,destroy_last_vm_ns,first_protected_vm_ns\n" + rows.map {
            "\($0.enableVirtAtLoad),\($0.oneTimeSetup.rawValue),\($0.loadNanos),\($0.firstVMNanos),\($0.nextVMNanos),"
                + "\($0.destroyLastVMNanos),\($0.firstProtectedVMNanos.map(String.init) ?? "")"
        }.joined(separator: "\n") + "\n"
    }
}
