// L2's own page tables and privilege levels (issue 14), through the real three tiers.
import ABI
import Bench
import L0
import L2Guest
import Testing

extension StackTests {
@Suite struct PagingTests {
    /// What `paging-probe` must sync on every path: the shadow MMU of pvm-rfc included, L2's
    /// view of its own paging does not depend on who provides the second stage.
    static let expectedProbe: [[UInt64]] = [
        [1, PageWalk.Bit.accessed | PageWalk.Bit.dirty, 0, 0, 0, 0],       // a written page: A and D
        [2, PageWalk.Bit.accessed, 0, 0, 0, 0],                             // a read page: A only
        [3, 0xF1F1, 0, 0, 0, 0],                                            // INVLPG: the new frame
        [4, 1, PagingOperations.user(1).raw, 0, 0x1111, 0],                 // #PF to L2, not present
        [5, 1, 7, 0x2222, 0, 0],                                            // user write, read-only
        [6, 0x0B0B, 0x2222, 0, 0, 0],                                       // CR3 switch and back
        [7, 1, 0x11, 0xC3, 0, 0],                                           // fetch, XD: P|I
        [8, 1, 5, 0x2222, 0, 0],                                            // user read, supervisor PDE: P|U
        [9, PageWalk.Bit.accessed, 0, 0, 0, 0],                             // A cleared, set again
    ]

    @Test(arguments: NestingPath.allCases)
    func theProbeSeesArchitecturalPagingOnEveryPath(_ path: NestingPath) throws {
        let (r, _) = try runStack(path, program: "paging-probe")
        #expect(r.succeeded, "\(r.stop)")
        #expect(Array(r.harness.syncs) == Self.expectedProbe)
    }

    /// Two-dimensional paging: L2's page faults, page-table writes, INVLPGs, CR3 writes,
    /// syscalls and #BP stay inside L2 on single, pv and nvmx (no exit at all in the window).
    @Test(arguments: ["syscall", "exception", "page_fault", "cr3_switch", "tlb_miss", "fork"])
    func theKernelOperationsCauseNoExitWithTwoDimensionalPaging(_ test: String) throws {
        for path: NestingPath in [.single, .pv, .nvmx] {
            let r = try bench(path, test: test, iterations: 16, warmup: 2)
            #expect(r.window.totalL2Exits == 0 && r.window.totalL1Exits == 0, "\(test) on \(path): \(r.window.totalL2Exits) L2 exits")
        }
    }
}
}

/// The transport suite's hop count, from made-up windows: every exit and entry, through L0 or
/// L1's switcher.
@Suite struct TransportHopTests {
    func result(_ path: NestingPath, _ w: TransitionCounters) -> BenchResult {
        BenchResult(test: "cpuid", variant: BenchVariant(path: path), iterations: 10,
                    latency: LatencyReport(samples: 10, minNanos: 1, medianNanos: 1, p99Nanos: 1, maxNanos: 1, totalNanos: 10), window: w)
    }

    @Test func aHopIsAnExitOrAnEntryWhoeverTakesIt() {
        var pv = TransitionCounters()
        for _ in 0..<10 { pv.countL2Exit(.cpuid) }
        pv.l2Entries = 10
        #expect(TransportSuite.hops(result(.pv, pv)) == 2)
        var nvmx = pv
        for _ in 0..<10 { nvmx.countL1Exit(.vmresume) }
        nvmx.l1Entries = 10
        #expect(TransportSuite.hops(result(.nvmx, nvmx)) == 4)
        var rfc = TransitionCounters()
        rfc.switcher[Int(ExitReason.cpuid.rawValue)] = 10
        rfc.switcher[SwitcherLayout.reasonSlots + SwitcherCounter.entries.rawValue] = 10
        #expect(TransportSuite.hops(result(.pvmRFC, rfc)) == 2)
    }
}
