import ABI
import Bench
import Testing

/// The memslot benchmark suite in a short mode: it runs, and its counts say what each policy does.
@Suite struct MemslotSuiteTests {
    @Test func bothZapPoliciesLeaveNothingStaleAndCostWhatTheySay() throws {
        let touched = 65_536 / 256
        let rows = try MemslotSuite.run(rounds: 1, scale: 256)
        #expect(rows.count == 4)
        for r in rows where r.policy == .targeted {
            #expect(r.refaults == 0, "\(r.scenario): a targeted zap keeps the other memory mapped")
        }
        for r in rows where r.policy == .fast {
            #expect(r.refaults == touched, "\(r.scenario): a fast zap drops everything; L2 refaults what it touches")
        }
        #expect(rows.first { $0.scenario == "recreate 2 GiB" && $0.policy == .targeted }?.entriesZapped == touched)
        #expect(rows.first { $0.scenario == "delete 32 GiB" && $0.policy == .targeted }?.entriesZapped == 4 * touched)
        #expect(MemslotSuite.table(rows).contains("recreate 2 GiB"))
    }
}
