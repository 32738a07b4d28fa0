import ABI
import Testing
@testable import L0

/// The fuzz driver's short run (its long run: `pvm fuzz --cases 1000000`, docs/reliability.md).
/// Coverage minimums make a driver that stops reaching L2, the hypercalls or EPT02 fail here.
@Suite struct ExitFuzzerTests {
    @Test(arguments: [NestingPath.pv, .nvmx, .nvmxNoShadow, .nvmxEVMCS])
    func nestedBackendsSurviveHostileExitsWithEPT02InsideL1Memory(path: NestingPath) throws {
        let r = try ExitFuzzer.run(path: path, cases: 4_000, seed: 0x5EED)
        #expect(r.violations.isEmpty, "\(r.violations)")
        #expect(r.cases == 4_000 && r.l1Exits > 1_000 && r.hypercalls > 100 && r.stops > 0, "\(r)")
        if path != .nvmxEVMCS {
            // Booted lives reach L2, and (through EPT12 or the PV map) EPT02.
            #expect(r.l2Exits > 300 && r.ept02EntriesChecked > 0, "\(r)")
        }
    }

    /// pvm-rfc: L1's own exits, half of them harness calls passed on with garbage block
    /// addresses and garbage blocks (window edges in any order, counters L1 scribbled): L0 never
    /// traps on an overflow, never builds EPT02, never hands L2 anything.
    @Test func thePVMRFCBackendSurvivesHostileL1Exits() throws {
        let r = try ExitFuzzer.run(path: .pvmRFC, cases: 20_000, seed: 0x5EED)
        #expect(r.violations.isEmpty, "\(r.violations)")
        #expect(r.l1Exits > 5_000 && r.l2Exits == 0 && r.stops > 1_000 && r.ept02EntriesChecked == 0, "\(r)")
    }

    @Test func theSingleLevelBackendSurvivesHostileL2Exits() throws {
        let r = try ExitFuzzer.run(path: .single, cases: 300, seed: 0x5EED)
        #expect(r.violations.isEmpty, "\(r.violations)")
        #expect(r.l2Exits > 50 && r.ept02EntriesChecked > 0, "\(r)")
    }

    /// The same seed, the same run: a failure is reproduced by its seed.
    @Test func aSeedReproducesItsRun() throws {
        let a = try ExitFuzzer.run(path: .nvmx, cases: 500, seed: 42)
        let b = try ExitFuzzer.run(path: .nvmx, cases: 500, seed: 42)
        #expect(a.l1Exits == b.l1Exits && a.l2Exits == b.l2Exits && a.stops == b.stops && a.hypercalls == b.hypercalls)
    }

    /// The invariant check itself can fail: an EPT02 entry to host memory outside L1's memslot.
    @Test func theCheckCatchesAnEPT02EntryOutsideL1Memory() throws {
        let life = try ExitFuzzer.Life(path: .pv)
        #expect(life.checkInvariants().violation == nil)
        life.vcpu.ept02.install(L2GPA(0x5000), host: HostOffset(0), permissions: EPT.rwxMask, memslot: 0)
        #expect(life.checkInvariants().violation?.contains("outside L1's memory") == true)
    }
}
