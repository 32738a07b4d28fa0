import ABI
import Bench
import Foundation
import L0
import Testing

extension StackTests {
@Suite(.serialized) struct StatTraceTests {
    func recorded(_ path: NestingPath, iterations: UInt64 = 50) throws -> TransitionLog {
        var config = StackConfig(path: path, program: "cpuid", programArguments: [iterations, 0, 0], tierExecutable: PVMBinary.path)
        config.recordTransitions = true
        let result = try L0Stack(config: config).run()
        #expect(result.succeeded, "\(result.stop)")
        return try #require(result.log)
    }

    @Test func statCountsEveryExitL0HandledByTierAndReason() throws {
        let rows = ExitStats.rows(try recorded(.nvmx))
        let l2CPUID = rows.first { $0.tier == .l2 && $0.reason == .cpuid }
        let l1Resume = rows.first { $0.tier == .l1 && $0.reason == .vmresume }
        #expect(l2CPUID?.samples == 50 && l1Resume?.samples == 50)
        #expect(rows.allSatisfy { $0.minNanos <= $0.maxNanos && $0.samples > 0 })
        let text = ExitStats.report(rows)
        #expect(text.contains("VM-EXIT") && text.contains("CPUID") && text.contains("VMRESUME"))
    }

    @Test func theTraceIsWellFormedJSONWithATrackPerTierAndTheNestedPingPong() throws {
        let data = try ChromeTrace.json(try recorded(.nvmx, iterations: 5), title: "cpuid on nvmx")
        let doc = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let events = try #require(doc["traceEvents"] as? [[String: Any]])
        let threads = events.filter { ($0["name"] as? String) == "thread_name" }.compactMap { ($0["args"] as? [String: String])?["name"] }
        #expect(Set(threads) == ["L0 (pvm-l0)", "L1 (pvm-l1)", "L2 (pvm-l2)"])
        let spans = events.filter { ($0["ph"] as? String) == "X" }
        #expect(spans.allSatisfy { ($0["dur"] as? Double ?? -1) >= 0 && $0["ts"] is Double })
        // An nVMX CPUID: L2 runs, L0 handles CPUID, L1 runs (exits VMRESUME), L0 handles VMRESUME.
        let names = spans.map { $0["name"] as? String ?? "" }
        let cpuid = try #require(names.firstIndex(of: "run, exits CPUID"))
        #expect(Array(names[cpuid..<min(cpuid + 4, names.count)]) ==
                ["run, exits CPUID", "handle CPUID from L2", "run, exits VMRESUME", "handle VMRESUME from L1"])
    }

    @Test func onPVTheSameCPUIDIsOneHop() throws {
        let rows = ExitStats.rows(try recorded(.pv))
        #expect(rows.first { $0.tier == .l2 && $0.reason == .cpuid }?.samples == 50)
        #expect(!rows.contains { $0.tier == .l1 && $0.reason == .vmresume })
    }
}
}
