import ABI
import Testing
import Transport
@testable import L0

/// The timers L0 runs while L1's vCPU is in L2, with made-up exits: vmcs12's VMX-preemption
/// timer, which L0 emulates (L1's PREEMPTION_TIMER exit when it runs out, restarted at each
/// nested entry), and L1's own APIC timer (an EXTERNAL_INTERRUPT exit for L1 when it comes).
/// L2's CPU learns the earlier of the two as `RunPage.timerDeadline`; a PREEMPTION_TIMER exit
/// L2 writes before either is due ends nowhere but back in L2. (nvmx-noshadow: L1's VMWRITEs
/// here are exits, as the fixture makes them; with shadowing they would go to the shadow VMCS.)
@Suite struct NestedTimerTests {
    /// L1's WRMSR (an exit to L0, which runs L1's APIC).
    func l1WRMSR(_ f: Fixture, _ msr: UInt32, _ value: UInt64) -> NextStep {
        f.l1Run[register: .rcx] = UInt64(msr)
        (f.l1Run[register: .rdx], f.l1Run[register: .rax]) = EDXEAX.split(value)
        return f.vcpu.handleL1Exit(L1ExitInfo(reason: .msrWrite, instructionLength: 2))
    }

    @Test func vmcs12sPreemptionTimerRunsFromEachEntryAndIsL1sExitOnlyWhenItRunsOut() throws {
        let f = try Fixture(.nvmxNoShadow)
        try f.loadValidVMCS12()
        let v = try #require(f.nested.vmcs12)                          // L0's copy, as L1's VMWRITEs change it
        _ = f.vmwrite(.pinBasedVMExecControl, PinBased.externalInterruptExiting | PinBased.preemptionTimer)
        _ = f.vmwrite(.vmxPreemptionTimerValue, 60_000_000_000 & 0xFFFF_FFFF)     // the field is 32 bits
        let before = monotonicNanos()
        #expect(f.vmx(.vmlaunch) == .enterL2)
        let deadline = f.l2Run[RunPage.timerDeadline]
        #expect(deadline >= before + (60_000_000_000 & 0xFFFF_FFFF) && deadline == f.nested.vmcs12TimerDeadline)
        // L2 forges the exit long before the deadline: not L1's; L2 goes on, deadline kept.
        f.l2Run[register: .rip] = 0x1234
        #expect(f.l2Exit(L2ExitInfo(reason: .preemptionTimer)) == .resume(.l2))
        #expect(f.nested.guestMode && f.l2Run[RunPage.timerDeadline] == deadline && f.l2Run[register: .rip] == 0x1234)
        // A reflected exit, then VMRESUME with no time left: a deadline already passed.
        #expect(f.l2Exit(L2ExitInfo(reason: .cpuid, instructionLength: 2)) == .resume(.l1))
        _ = f.vmwrite(.vmxPreemptionTimerValue, 0)
        #expect(f.vmx(.vmresume) == .enterL2)
        #expect(f.l2Run[RunPage.timerDeadline] <= monotonicNanos())
        // Now it is L1's: PREEMPTION_TIMER, no instruction length, RIP where L2 was.
        #expect(f.l2Exit(L2ExitInfo(reason: .preemptionTimer)) == .resume(.l1))
        #expect(!f.nested.guestMode && v[.vmExitReason] == UInt64(ExitReason.preemptionTimer.rawValue))
        #expect(v[.vmExitInstructionLen] == 0 && v[.guestRIP] == 0x1234 && f.vcpu.counters.deliveries[Int(ExitReason.preemptionTimer.rawValue)] == 1)
        // The timer off: no deadline at the next entry.
        _ = f.vmwrite(.pinBasedVMExecControl, PinBased.externalInterruptExiting)
        #expect(f.vmx(.vmresume) == .enterL2)
        #expect(f.l2Run[RunPage.timerDeadline] == 0 && f.nested.vmcs12TimerDeadline == 0)
    }

    @Test func l1sOwnTimerEndsL2sRunAsAnExternalInterruptForL1() throws {
        let f = try Fixture(.nvmxNoShadow)
        f.vcpu.enableLocalAPICs(count: 1, for: .l1)
        #expect(l1WRMSR(f, LocalAPICMSR.lvtTimer, 0xEC | UInt64(LVTTimer.tscDeadlineMode)) == .resume(.l1))
        let l1Deadline = monotonicNanos() + 2_000_000
        #expect(l1WRMSR(f, LocalAPICMSR.tscDeadline, l1Deadline) == .resume(.l1))
        try f.loadValidVMCS12()
        let v = try #require(f.nested.vmcs12)
        _ = f.vmwrite(.pinBasedVMExecControl, PinBased.externalInterruptExiting)
        #expect(f.vmx(.vmlaunch) == .enterL2)
        #expect(f.l2Run[RunPage.timerDeadline] == l1Deadline, "L1's own deadline, the only one")
        // Before it: nothing (L2 forged the exit).
        if monotonicNanos() < l1Deadline {
            #expect(f.l2Exit(L2ExitInfo(reason: .preemptionTimer)) == .resume(.l2))
        }
        while monotonicNanos() < l1Deadline { sleepNanos(100_000) }
        #expect(f.l2Exit(L2ExitInfo(reason: .preemptionTimer)) == .resume(.l1))
        #expect(v[.vmExitReason] == UInt64(ExitReason.externalInterrupt.rawValue))
        #expect(v[.vmExitIntrInfo] == 1 << 31 | 0xEC && f.vcpu.counters.apicTimerFires == 1)
        #expect(f.vcpu.shared.apics?.tscDeadline(0) == 0, "fired once")
    }

    /// Whatever deadline L1 writes for itself, 0, the far future or one passed, is an answer.
    @Test(arguments: [UInt64(0), 1, ~0, 1 << 63])
    func anyDeadlineL1WritesForItselfIsAnAnswer(_ value: UInt64) throws {
        let f = try Fixture(.nvmxNoShadow)
        f.vcpu.enableLocalAPICs(count: 1, for: .l1)
        #expect(l1WRMSR(f, LocalAPICMSR.lvtTimer, 0xEC | UInt64(LVTTimer.tscDeadlineMode)) == .resume(.l1))
        #expect(l1WRMSR(f, LocalAPICMSR.tscDeadline, value) == .resume(.l1))
        #expect(f.vcpu.counters.apicTimerFires == (value == 1 ? 1 : 0))
    }
}
