import ABI
import Bench
import L2Guest
import Testing

extension StackTests {
/// The whole benchmark suite in a short mode: every test on every path (and every map mode for
/// first touch) runs to completion and counts what its design says, so none of them rots.
/// The exact counts are pinned by GoldenCountsTests; this checks the design's shape with the
/// suite's own defaults (64 iterations, no warm-up).
@Suite(.serialized) struct SuiteSmokeTests {
    @Test func everyTestRunsOnEveryPathInShortMode() throws {
        let n: UInt64 = 64
        let runner = BenchRunner(tierExecutable: PVMBinary.path, iterations: n, warmup: 0)
        for op in BenchOperations.all {
            for v in BenchRunner.defaultVariants(for: op.name, paths: NestingPath.allCases) {
                let r = try runner.run(op.name, on: v)
                let what = "\(op.name) on \(v.label): \(r.window.totalL2Exits) L2 exits, \(r.window.totalDeliveries) deliveries in \(r.iterations)"
                #expect(r.iterations == n, "\(what)")
                // An operation either never exits, or every one of them reaches L0 at least once.
                // Pass-through MSRs, and CR bits KVM with EPT lets the guest own: no exit at all.
                // L2's own kernel work (the paging tests) never exits with two-dimensional paging.
                // On pvm-rfc nothing reaches L0: every operation but a syscall (the switcher's
                // direct path) and a TLB miss (a walk of shadow entries already filled) exits to
                // L1 through the switcher.
                let passThrough = op.name.hasSuffix("kernel_gs_base") || op.name.hasPrefix("toggle_cr")
                let kernelWork = PagingOperations.all.contains { $0.name == op.name }
                if v.path.usesSwitcher {
                    #expect(r.window.totalL2Exits == 0 && r.window.totalL1Exits == 0, "\(what)")
                    if op.name == "syscall" {
                        #expect(r.switcherExitsPerOp == 0 && r.window[switcher: .directSwitches] == 2 * n, "\(what)")
                    } else if op.name == "tlb_miss" {
                        #expect(r.switcherExitsPerOp == 0 && r.window[l2: .tlbMisses] >= n, "\(what)")
                    } else {
                        #expect(r.switcherExitsPerOp >= 1.0, "\(what): \(r.switcherExitsPerOp) switcher exits per op")
                    }
                } else if kernelWork {
                    // With no warm-up, the first touches of fresh pages fill EPT02 (nested EPT's
                    // own cost); nothing else exits.
                    let ept = r.window.l2Exits[Int(ExitReason.eptViolation.rawValue)]
                    #expect(r.window.totalL2Exits == ept && ept < n, "\(what)")
                } else if passThrough {
                    #expect(r.l2ExitsPerOp < 0.1, "\(what)")
                } else if op.name == "tlb_shootdown_pv" {
                    // The target is idle (preempted): a steal-time flag instead of an IPI, so no
                    // IPI at all and next to no exit (the target's own HLT may fall in its window;
                    // its flush comes at its next entry, after it: MultiVCPUTests counts it).
                    #expect(r.window.apicIPIs == 0 && r.l2ExitsPerOp < 0.5, "\(what)")
                } else if op.name != "ept_first_touch" {
                    #expect(r.l2ExitsPerOp >= 1.0, "\(what)")
                } else {
                    switch (v.path, v.l2MapMode) {
                    case (.single, _), (.pv, .eager):
                        // Everything is mapped before the guest starts: no first touch exits.
                        #expect(r.window.totalL2Exits == 0, "\(what)")
                    case (.pv, .batch):
                        // One batch hypercall maps a window of pages: some first touches exit
                        // (warm-up is 0, so the very first one is in the window), most do not.
                        let batches = r.window.hypercalls[PVHypercall.mapGPABatch.rawValue] ?? 0
                        #expect(r.window.totalL2Exits > 0 && r.window.totalL2Exits < n / 4, "\(what)")
                        #expect(batches > 0 && batches <= r.window.totalDeliveries, "\(what), \(batches) batch hypercalls")
                    case (_, .batch):
                        // nVMX: every first touch exits to L0 (EPT02 is filled lazily), but L1
                        // wrote a window of EPT12 entries, so it sees only a few of them.
                        #expect(r.l2ExitsPerOp >= 1.0, "\(what)")
                        #expect(r.window.totalDeliveries > 0 && r.window.totalDeliveries < n / 4, "\(what)")
                    case (_, .perPage):
                        // Every first touch goes to L1, which maps one page.
                        #expect(r.l2ExitsPerOp >= 1.0 && r.deliveriesPerOp >= 1.0, "\(what)")
                    case (_, .eager):
                        // nVMX with EPT12 complete: L0 fills EPT02 on each touch, L1 sees none.
                        #expect(r.l2ExitsPerOp >= 1.0 && r.window.totalDeliveries == 0, "\(what)")
                    }
                }
            }
        }
    }
}
}
