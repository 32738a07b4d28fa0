import ABI
import Bench
import L0
import L1PV
import L2Guest
import Testing

/// The foundation's promises about one L2 CPUID, checked through three real processes.
extension StackTests {
@Suite(.serialized) struct CPUIDPathTests {
    @Test func oneLevelCPUIDIsOneExitToL0AndThereIsNoL1() throws {
        let r = try bench(.single)
        #expect(r.l2ExitsPerOp == 1.0 && r.l2EntriesPerOp == 1.0)     // the guest's exits, in the L2 columns
        #expect(r.l1EntriesPerOp == 0 && r.l1ExitsPerOp == 0 && r.deliveriesPerOp == 0)
        let text = Report.ratios([r, try bench(.nvmx)])
        #expect(text.contains("cpuid: nvmx / single = "))
    }

    @Test func pvCPUIDIsAnsweredByL0WithoutEnteringL1() throws {
        let r = try bench(.pv)
        #expect(r.l2ExitsPerOp == 1.0)
        #expect(r.l2EntriesPerOp == 1.0)
        #expect(r.l1EntriesPerOp == 0.0)
        #expect(r.l1ExitsPerOp == 0.0)
        #expect(perOp(r, r.l2ExitsByReasonPerOp) == ["CPUID": 1.0])
    }

    @Test func nvmxCPUIDWithShadowingCostsOneL1RoundTripAndNoVMREADExits() throws {
        let r = try bench(.nvmx)
        #expect(r.l2ExitsPerOp == 1.0)
        #expect(r.l2EntriesPerOp == 1.0)
        #expect(r.l1EntriesPerOp == 1.0)
        #expect(r.l1ExitsPerOp == 1.0)
        #expect(r.deliveriesPerOp == 1.0)
        #expect(perOp(r, r.l1ExitsByReasonPerOp) == ["VMRESUME": 1.0])
    }

    /// KVM's CPUID path in L1 (kvm-nested-work.md section 3): VMREAD VM_EXIT_REASON and
    /// IDT_VECTORING_INFO_FIELD on every exit; to skip the instruction RFLAGS,
    /// VM_EXIT_INSTRUCTION_LEN, GUEST_RIP and GUEST_INTERRUPTIBILITY_INFO; VMWRITE GUEST_RIP
    /// before VMRESUME: 6 VMREADs and 1 VMWRITE.
    @Test func nvmxWithoutShadowingAddsExactlyTheHandlersVMREADsAndVMWRITEs() throws {
        let r = try bench(.nvmxNoShadow)
        #expect(r.l2ExitsPerOp == 1.0)
        #expect(perOp(r, r.l1ExitsByReasonPerOp) == ["VMREAD": 6.0, "VMWRITE": 1.0, "VMRESUME": 1.0])
        #expect(r.l1EntriesPerOp == 8.0)
        #expect(r.deliveriesPerOp == 1.0)
    }

    @Test func nvmxWithAnEnlightenedVMCSCostsTwoExitsAndNoVMREADOrVMWRITE() throws {
        let r = try bench(.nvmxEVMCS)
        #expect(r.l2ExitsPerOp == 1.0 && r.l1EntriesPerOp == 1.0)
        #expect(perOp(r, r.l1ExitsByReasonPerOp) == ["VMRESUME": 1.0])
        // Only the always-copied fields (RIP, RSP, RFLAGS) go eVMCS -> vmcs12 per entry, and the
        // guest state plus exit information come back on each exit.
        #expect(r.window.evmcsFieldCopies > 0 && r.window.shadowVMCSFieldCopies == 0)
    }

    @Test func guestSeesTheSameCPUIDValuesOnEveryPathAndTheyAreL1sTable() throws {
        var answers: [NestingPath: [[UInt64]]] = [:]
        for path in NestingPath.allCases {
            let (result, _) = try runStack(path, program: "cpuid-values")
            #expect(result.succeeded, "\(path): \(result.stop)")
            answers[path] = Array(result.harness.syncs)
        }
        let expected = GuestPrograms.cpuidValuesLeaves.map { f, i -> [UInt64] in
            let (a, b, c, d) = GuestCPUIDTable.table.lookup(function: f, index: i)
            return [UInt64(f), UInt64(i), UInt64(a), UInt64(b), UInt64(c), UInt64(d)]
        }
        for path in NestingPath.allCases { #expect(answers[path] == expected, "\(path)") }
    }
}
}

extension StackTests {
@Suite(.serialized) struct InstructionTourTests {
    @Test func everySensitiveInstructionGivesTheGuestTheSameResultOnEveryPath() throws {
        var answers: [NestingPath: [[UInt64]]] = [:]
        for path in NestingPath.allCases {
            let (result, _) = try runStack(path, program: "instruction-tour")
            #expect(result.succeeded, "\(path): \(result.stop)")
            answers[path] = Array(result.harness.syncs)
        }
        let expected: [[UInt64]] = [
            [0x3B, 0x1234_5678_9ABC, 0, 0, 0, 0],
            [0xC000_0102, 0xFFFF_8880_0000_1000, 0, 0, 0, 0],
            [0x3FD, 0x60, 0, 0, 0, 0],
            [0x80, 0xFFFF_FFFF, 0, 0, 0, 0],
            [0xF4, HypercallError.noSys.returnValue, 0, 0, 0, 0],
        ]
        for path in NestingPath.allCases { #expect(answers[path] == expected, "\(path)") }
    }

    @Test func nvmxKeepsWhatL1PassesThroughAndReflectsWhatItIntercepts() throws {
        let (result, _) = try runStack(.nvmx, program: "instruction-tour")
        let delivered = TransitionCounters.byReason(result.counters.deliveries)
        // TSC_ADJUST is intercepted by L1's MSR bitmap; KERNEL_GS_BASE passes through L0 and L1
        // both, so the vmcs02 bitmap lets L2 reach it with no exit at all.
        #expect(delivered[.msrWrite] == 1 && delivered[.msrRead] == 1)
        #expect(TransitionCounters.byReason(result.counters.l2Exits)[.msrRead] == 1)
        #expect(result.counters.msrBitmapMerges >= 1)
        #expect(delivered[.hlt] == 1 && delivered[.vmcall] == 1)
        // KVM as L1 uses unconditional I/O exiting (no I/O bitmaps): the 14 serial bytes, the LSR
        // read and port 0x80 all reach L1; only the harness's ucalls stay in L0.
        #expect(delivered[.ioInstruction] == 16)
    }
}
}

extension StackTests {
@Suite(.serialized) struct IterationDoublingTests {
    @Test func iterationsDoubleUntilARunLastsLongEnoughAndThatCountIsMeasured() throws {
        var runner = BenchRunner(tierExecutable: PVMBinary.path, iterations: 1 << 20, warmup: 10)
        runner.minNanos = 2_000_000
        let r = try runner.run("cpuid", on: BenchVariant(path: .pv))
        #expect(r.iterations >= 32 && r.iterations & (r.iterations - 1) == 0, "\(r.iterations) is not a power of two")
        #expect(r.latency.totalNanos >= 1_000_000)               // the measured run lasted about as long
        #expect(r.window.totalL2Exits == r.iterations)            // and the window counted exactly it
        let text = Report.vmexitFormat([r])
        #expect(text == "# pv (median ns per iteration)\ncpuid \(r.latency.medianNanos)\n")
        #expect(Report.csv([r], profile: nil).hasPrefix("test,path,variant,iterations"))
    }
}
}
