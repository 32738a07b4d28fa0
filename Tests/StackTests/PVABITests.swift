import ABI
import Bench
import L0
import L1PV
import Testing

/// PV ABI v1 through the three real processes.
extension StackTests {
@Suite(.serialized) struct PVABITests {
    func run(_ program: String, _ path: NestingPath = .pv, args: [UInt64] = [], features: PVFeatures = .all,
             mapMode: L2MapMode = .eager) throws -> (StackResult, L0Stack) {
        var config = StackConfig(path: path, program: program, programArguments: args, tierExecutable: PVMBinary.path)
        config.pvFeatures = features
        config.l2MapMode = mapMode
        let stack = try L0Stack(config: config)
        return (try stack.run(), stack)
    }

    @Test(arguments: NestingPath.nestedCases)
    func permissionFaultsReachL1WhichGrantsTheAccess(path: NestingPath) throws {
        let (r, _) = try run("permission-probe", path)
        #expect(r.succeeded, "\(r.stop)")
        #expect(Array(r.harness.syncs) == [[0x30_0000, 0xFEED, 0, 0, 0, 0], [0x31_0000, 0xC3, 0, 0, 0, 0]])
        // pvm-rfc's L1 gives L2's pages their full rights in the shadow (no EPT to restrict them).
        if path.usesSwitcher { return }
        #expect(r.counters.deliveries[Int(ExitReason.eptViolation.rawValue)] == 2)
        if path == .pv {
            #expect(r.counters.hypercalls[PVHypercall.mapGPARange.rawValue] == 2)   // the two replacing maps
        } else {
            #expect(r.counters.l1Exits[Int(ExitReason.invept.rawValue)] == 2)       // EPT12 edited, then INVEPT
        }
    }

    @Test func msrPoliciesEmulatePassAndFault() throws {
        let (r, _) = try run("msr-policy-probe")
        #expect(r.succeeded, "\(r.stop)")
        // msr, value read, WRMSR fault vector, RDMSR fault vector (0xFF: none)
        #expect(Array(r.harness.syncs) == [
            [0x3B, 0xABCD, 0xFF, 0xFF, 0, 0],            // L0 emulates TSC_ADJUST
            [0x1A0, 0xABCD, 0xFF, 0xFF, 0, 0],           // L1 handles MISC_ENABLE
            [0x4B56_4DFF, 0, 13, 13, 0, 0],              // #GP by policy
        ])
        let delivered = TransitionCounters.byReason(r.counters.deliveries)
        #expect(delivered[.msrRead] == 1 && delivered[.msrWrite] == 1)
    }

    @Test func withoutDirectMSREveryMSRGoesToL1() throws {
        let (r, _) = try run("msr-policy-probe", features: PVFeatures.all.subtracting(.directMSR))
        #expect(r.succeeded, "\(r.stop)")
        #expect(r.harness.syncs.map { $0[2] } == [0xFF, 0xFF, 0xFF])   // no #GP: L1 has no such policy
        let delivered = TransitionCounters.byReason(r.counters.deliveries)
        #expect(delivered[.msrRead] == 3 && delivered[.msrWrite] == 3)
    }

    @Test(arguments: NestingPath.allCases)
    func afterL1TakesAPageAwayL2CannotReadTheOldBytes(path: NestingPath) throws {
        let gpa: UInt64 = 0x40_0000, pattern: UInt64 = 0x5EC2_E7DA_7A00_0001
        let (r, stack) = try run("balloon-probe", path, args: [gpa, pattern])
        #expect(r.succeeded, "\(r.stop)")
        #expect(Array(r.harness.syncs) == [[gpa, pattern, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [gpa, ~0, 0, 0, 0, 0]])
        // The bytes are still in L1's memory: only L2's view of them is gone.
        #expect(try stack.vcpu.l1Memory.load64(L1MemoryPlan.backing(of: L2GPA(gpa))!) == pattern)
        if path == .pv {
            #expect(r.counters.hypercalls[PVHypercall.unmapGPARange.rawValue] == 1)
            #expect(stack.vcpu.ept02.translate(L2GPA(gpa)) == nil)
        }
    }

    @Test func switchingDirectCPUIDOffSendsCPUIDToL1() throws {
        let on = try bench(.pv)
        let off = try bench(BenchVariant(path: .pv, pvFeatures: PVFeatures.all.subtracting(.directCPUID)), test: "cpuid")
        #expect(on.l1EntriesPerOp == 0)
        #expect(off.l1EntriesPerOp == 1.0 && off.deliveriesPerOp == 1.0)
        #expect(perOp(off, off.l1ExitsByReasonPerOp) == ["VMCALL": 1.0])    // enter-L2 again
    }

    @Test func switchingL0PortsOffSendsThePortToL1() throws {
        let on = try bench(.pv, test: "inl_from_kernel")
        let off = try bench(BenchVariant(path: .pv, pvFeatures: PVFeatures.all.subtracting(.l0Ports)), test: "inl_from_kernel")
        #expect(on.l1EntriesPerOp == 0 && off.l1EntriesPerOp == 1.0)
    }

    @Test func firstTouchCostsTwoHypercallsPerPageUnbatchedAndAFractionBatched() throws {
        let perPage = try bench(BenchVariant(path: .pv, l2MapMode: .perPage), test: "ept_first_touch", iterations: 256, warmup: 0)
        let batch = try bench(BenchVariant(path: .pv, l2MapMode: .batch), test: "ept_first_touch", iterations: 256, warmup: 0)
        let eager = try bench(.pv, test: "ept_first_touch", iterations: 256, warmup: 0)
        #expect(perPage.hypercallsPerOp == 2.0)                   // map + enter-L2 again
        #expect(batch.hypercallsPerOp == 2.0 / 64.0)              // one batch per 64-page window
        #expect(eager.hypercallsPerOp == 0 && eager.l2ExitsPerOp == 0)
        let nvmx = try bench(.nvmx, test: "ept_first_touch", iterations: 256, warmup: 0)
        #expect(nvmx.l2ExitsPerOp == 1.0 && nvmx.l1EntriesPerOp == 0 && nvmx.window.ept02Fills == 256)
    }
}
}

extension StackTests {
@Suite(.serialized) struct NestedFirstTouchTests {
    /// KVM's chain per page (kvm-nested-work.md sections 3-4): the L2 exit, the reflected EPT
    /// violation, L1's EPT12 write (trapped only while its leaf table is still write-protected:
    /// the first store makes it unsync), no INVEPT (a non-present entry made present needs no
    /// flush), VMRESUME, and L2's retry with the silent EPT02 fill.
    @Test func firstTouchOnNVMXShowsKVMsWholeChainPerPage() throws {
        let r = try bench(BenchVariant(path: .nvmx, l2MapMode: .perPage), test: "ept_first_touch", iterations: 256, warmup: 0)
        #expect(r.window.totalL2Exits == 2 * 256)                // per page: the fault and its retry
        #expect(r.deliveriesPerOp == 1.0)                        // the reflected EPT violation
        let byReason = Dictionary(uniqueKeysWithValues: r.l1ExitsByReasonPerOp.map { ($0.0, $0.1) })
        #expect(byReason[.vmresume] == 1.0 && byReason[.invept] == nil)
        #expect(r.window.ept12WriteTraps < 8)                    // once per leaf table, not per page
        #expect(r.window.ept02Fills == 256)                      // each page filled silently once
        #expect(r.hypercallsPerOp == 0)
    }
}
}
