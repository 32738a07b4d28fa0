// Golden table of per-operation transition counts.
//
// Every bench operation runs with a fixed iteration count (32, warm-up 4, no time-based doubling)
// on every path, every L2 map mode of every nested path and every PV feature set of the ablation.
// The WHOLE measurement window (`BenchResult.window`) is printed, one line per (test, variant),
// and compared exactly with Tests/StackTests/Golden/bench-counts.txt.
//
// To regenerate the golden file after an INTENDED behaviour change (review the diff!):
//
//     PVM_UPDATE_GOLDEN=1 swift test --filter GoldenCountsTests
//
// With PVM_UPDATE_GOLDEN=1 the test rewrites the file instead of comparing (and still fails if a
// run does not complete).
import ABI
import Bench
import Foundation
@testable import L0
import L2Guest
import Testing

extension StackTests {
@Suite(.serialized) struct GoldenCountsTests {
    static let iterations: UInt64 = 32
    static let warmup: UInt64 = 4

    static let goldenURL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().appendingPathComponent("Golden/bench-counts.txt")

    static let header = """
        # Golden per-op transition counts (Tests/StackTests/GoldenCountsTests.swift). Regenerate with PVM_UPDATE_GOLDEN=1 swift test --filter GoldenCountsTests
        # One line per (test, variant): BenchRunner(iterations: 32, warmup: 4), minNanos nil, the whole measurement window, non-zero values only, keys sorted.
        # Keys: l2_exit.R / l1_exit.R / delivery.R / switcher_exit.R by exit reason name; hypercall.NAME by PV hypercall; l1_entries, l2_entries; work counters, the switcher's (pvm-rfc) and L2's own events in snake_case.
        """

    /// Every variant the table covers: single; each nested path in each map mode; the pv ablation
    /// (eager). Labels are unique (the ablation's full-feature row is plain `pv`, already there).
    static var variants: [BenchVariant] {
        var out: [BenchVariant] = [BenchVariant(path: .single)]
        for p in NestingPath.allCases where p.hasMapModes {
            for m in L2MapMode.allCases { out.append(BenchVariant(path: p, l2MapMode: m)) }
        }
        out.append(BenchVariant(path: .pvmRFC))
        out += BenchVariant.ablation()
        var seen = Set<String>()
        return out.filter { seen.insert($0.label).inserted }
    }

    static func hypercallName(_ nr: UInt64) -> String {
        PVHypercall(rawValue: nr).map { "\($0)" } ?? "0x" + String(nr, radix: 16)
    }

    /// `test label key=value ...`: the whole window, only non-zero values, keys sorted.
    static func row(test: String, label: String, iterations: UInt64, _ w: TransitionCounters) -> String {
        var kv: [String: UInt64] = ["iterations": iterations]
        for (r, n) in TransitionCounters.byReason(w.l2Exits) { kv["l2_exit.\(r.name)"] = n }
        for (r, n) in TransitionCounters.byReason(w.l1Exits) { kv["l1_exit.\(r.name)"] = n }
        for (r, n) in TransitionCounters.byReason(w.deliveries) { kv["delivery.\(r.name)"] = n }
        for (nr, n) in w.hypercalls { kv["hypercall.\(hypercallName(nr))"] = n }
        for (r, n) in TransitionCounters.byReason(w.switcherExits) { kv["switcher_exit.\(r.name)"] = n }
        for c in SwitcherCounter.allCases { kv[c.key] = w[switcher: c] }
        for e in L2EventCounter.allCases { kv[e.key] = w[l2: e] }
        let work: [(String, UInt64)] = [
            ("l1_entries", w.l1Entries), ("l2_entries", w.l2Entries),
            ("vmcs12_field_reads", w.vmcs12FieldReads), ("vmcs12_field_writes", w.vmcs12FieldWrites),
            ("shadow_vmcs_field_copies", w.shadowVMCSFieldCopies), ("evmcs_field_copies", w.evmcsFieldCopies),
            ("vmcs_switches", w.vmcsSwitches), ("ept12_entries_walked", w.ept12EntriesWalked),
            ("ept02_fills", w.ept02Fills), ("ept12_write_traps", w.ept12WriteTraps),
            ("ept12_unsyncs", w.ept12Unsyncs), ("unbacked_accesses", w.unbackedAccesses),
            ("memslot_zaps", w.memslotZaps), ("consistency_checks", w.consistencyChecks),
            ("ept12_ad_updates", w.ept12ADUpdates), ("msr_bitmap_merges", w.msrBitmapMerges),
            ("hw_vmread", w.hwVMREADs), ("hw_vmwrite", w.hwVMWRITEs), ("hw_vmptrld", w.hwVMPTRLDs),
            ("hw_vmclear", w.hwVMCLEARs), ("mmu_root_switches", w.mmuRootSwitches), ("tlb_flushes", w.tlbFlushes),
            ("rare_field_syncs", w.rareFieldSyncs), ("full_entry_checks", w.fullEntryChecks),
            ("vmm_userspace_exits", w.vmmUserspaceExits), ("pv_entries", w.pvEntries), ("ept12_resyncs", w.ept12Resyncs),
            ("pv_deliveries", w.pvDeliveries), ("nested_vmexits", w.nestedVMExits), ("nested_vmentries", w.nestedVMEntries),
            ("kernel_device_accesses", w.kernelDeviceAccesses),
            ("apic_ipis", w.apicIPIs), ("apic_accesses", w.apicAccesses), ("apic_mmio_emulations", w.apicMMIOEmulations),
            ("apic_timer_fires", w.apicTimerFires), ("nested_timer_starts", w.nestedTimerStarts),
            ("pv_ipi_hypercalls", w.pvIPIHypercalls),
            ("apic_kicks", w.apicKicks), ("halts_blocked", w.haltsBlocked), ("apic_wakeups", w.apicWakeups),
            ("interrupts_injected", w.interruptsInjected), ("tlb_flush_hypercalls", w.tlbFlushHypercalls),
            ("tlb_flush_requests", w.tlbFlushRequests), ("tlb_flushes_at_entry", w.tlbFlushesAtEntry),
        ]
        for (k, n) in work { kv[k] = n }
        let fields = kv.filter { $0.value != 0 }.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
        return ([test, label] + fields).joined(separator: " ")
    }

    /// Every plain counter has its own key in a row: one left out would never be compared.
    @Test func aRowHasAKeyForEveryCounter() {
        var w = TransitionCounters()
        for (i, k) in TransitionCounters.scalarFields.enumerated() { w[keyPath: k] = 1000 + UInt64(i) }
        let row = Self.row(test: "t", label: "l", iterations: 1, w)
        for i in TransitionCounters.scalarFields.indices {
            #expect(row.contains("=\(1000 + i)"), "counter \(TransitionCounters.scalarFields[i]) has no key: \(row)")
        }
    }

    /// Row key: "test label".
    static func key(_ line: Substring) -> String { line.split(separator: " ").prefix(2).joined(separator: " ") }

    static func parse(_ text: String) -> [(key: String, line: String)] {
        text.split(separator: "\n").filter { !$0.hasPrefix("#") && !$0.trimmingCharacters(in: .whitespaces).isEmpty }
            .map { (key($0), String($0)) }
    }

    /// The operations whose counts are exact whatever the timing.
    static let compared = BenchOperations.all.filter { $0.helper == nil && !$0.countsDependOnTime }

    @Test(.timeLimit(.minutes(5)))
    func everyOperationOnEveryVariantCountsExactlyWhatTheGoldenTableSays() throws {
        let runner = BenchRunner(tierExecutable: PVMBinary.path, iterations: Self.iterations, warmup: Self.warmup)
        #expect(runner.minNanos == nil)
        var actual: [String] = []
        let start = Date()
        // The IPI tests run on two vCPUs whose interleaving decides what they count (a kick or
        // none, a wake-up or a HLT that ends at once), and a timer a few microseconds ahead
        // fires at its exit or at its arming: MultiVCPUTests checks those by property.
        for op in Self.compared {
            for v in Self.variants where op.runs(on: v.path, pvFeatures: v.pvFeatures) {
                let r = try runner.run(op.name, on: v)
                actual.append(Self.row(test: op.name, label: v.label, iterations: r.iterations, r.window))
            }
        }
        let elapsed = Date().timeIntervalSince(start)
        print("golden: \(actual.count) runs in \(String(format: "%.1f", elapsed)) s")

        if ProcessInfo.processInfo.environment["PVM_UPDATE_GOLDEN"] == "1" {
            let text = Self.header + "\n" + actual.joined(separator: "\n") + "\n"
            try FileManager.default.createDirectory(at: Self.goldenURL.deletingLastPathComponent(), withIntermediateDirectories: true)
            try text.write(to: Self.goldenURL, atomically: true, encoding: .utf8)
            print("golden: rewrote \(Self.goldenURL.path) (\(actual.count) rows)")
            return
        }

        let goldenText = try String(contentsOf: Self.goldenURL, encoding: .utf8)
        let expected = Self.parse(goldenText)
        let got = Self.parse(actual.joined(separator: "\n"))
        let expectedByKey = Dictionary(expected, uniquingKeysWith: { a, _ in a })
        let gotByKey = Dictionary(got, uniquingKeysWith: { a, _ in a })
        #expect(expectedByKey.count == expected.count, "duplicate rows in the golden file")
        #expect(gotByKey.count == got.count, "duplicate (test, variant) rows generated")

        var problems: [String] = []
        for (k, line) in got {
            guard let want = expectedByKey[k] else { problems.append("extra row (not in golden):\n  actual:   \(line)"); continue }
            if want != line { problems.append("row '\(k)' differs:\n  expected: \(want)\n  actual:   \(line)\n  \(Self.fieldDiff(want, line))") }
        }
        for (k, line) in expected where gotByKey[k] == nil {
            problems.append("missing row (in golden, not produced):\n  expected: \(line)")
        }
        let report = "\(problems.count) golden row(s) differ (PVM_UPDATE_GOLDEN=1 regenerates after an intended change):\n" + problems.joined(separator: "\n")
        if !problems.isEmpty { Issue.record(Comment(rawValue: report)) }
        // Same order as the golden file, so a regenerated file diffs cleanly.
        #expect(got.map(\.key) == expected.map(\.key) || !problems.isEmpty, "rows are in a different order than the golden file")
        let planned = Self.compared.reduce(0) { n, op in
            n + Self.variants.filter { op.runs(on: $0.path, pvFeatures: $0.pvFeatures) }.count
        }
        #expect(actual.count == planned && planned > 0)
    }

    /// "changed: a 1->2, only expected: b=3, only actual: c=4".
    static func fieldDiff(_ want: String, _ got: String) -> String {
        func fields(_ s: String) -> [String: String] {
            Dictionary(s.split(separator: " ").dropFirst(2).compactMap { f -> (String, String)? in
                let parts = f.split(separator: "=", maxSplits: 1)
                return parts.count == 2 ? (String(parts[0]), String(parts[1])) : nil
            }, uniquingKeysWith: { a, _ in a })
        }
        let w = fields(want), g = fields(got)
        var out: [String] = []
        for k in Set(w.keys).union(g.keys).sorted() where w[k] != g[k] {
            out.append("\(k): \(w[k] ?? "-") -> \(g[k] ?? "-")")
        }
        return "fields: " + out.joined(separator: ", ")
    }
}
}
