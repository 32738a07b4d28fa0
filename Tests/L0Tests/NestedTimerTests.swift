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

    /// L1 with its own timer armed `ahead` ns from now (far enough that the arming is done long
    /// before it, even on a loaded machine), then in L2 (vmcs12's pin-based
    /// controls `pin`): the fixture and L0's copy of vmcs12.
    func inL2WithL1Timer(ahead: UInt64, pin: UInt64) throws -> (Fixture, VMCSImage, UInt64) {
        let f = try Fixture(.nvmxNoShadow)
        f.vcpu.enableLocalAPICs(count: 1, for: .l1)
        #expect(l1WRMSR(f, LocalAPICMSR.lvtTimer, 0xEC | UInt64(LVTTimer.tscDeadlineMode)) == .resume(.l1))
        let l1Deadline = monotonicNanos() + ahead
        #expect(l1WRMSR(f, LocalAPICMSR.tscDeadline, l1Deadline) == .resume(.l1))
        try f.loadValidVMCS12()
        let v = try #require(f.nested.vmcs12)
        _ = f.vmwrite(.pinBasedVMExecControl, pin)
        #expect(f.vmx(.vmlaunch) == .enterL2)
        #expect(f.l2Run[RunPage.timerDeadline] == l1Deadline, "L1's own deadline, the only one")
        return (f, v, l1Deadline)
    }

    @Test func aTimerExitBeforeL1sOwnDeadlineGoesBackToL2() throws {
        let (f, _, l1Deadline) = try inL2WithL1Timer(ahead: 60_000_000_000, pin: PinBased.externalInterruptExiting)
        #expect(f.l2Exit(L2ExitInfo(reason: .preemptionTimer)) == .resume(.l2))
        #expect(f.nested.guestMode && f.l2Run[RunPage.timerDeadline] == l1Deadline && f.vcpu.counters.apicTimerFires == 0)
    }

    @Test func l1sOwnTimerEndsL2sRunAsAnExternalInterruptForL1() throws {
        let (f, v, l1Deadline) = try inL2WithL1Timer(ahead: 200_000_000, pin: PinBased.externalInterruptExiting)
        while monotonicNanos() < l1Deadline { sleepNanos(1_000_000) }
        #expect(f.l2Exit(L2ExitInfo(reason: .preemptionTimer)) == .resume(.l1))
        #expect(v[.vmExitReason] == UInt64(ExitReason.externalInterrupt.rawValue))
        #expect(v[.vmExitIntrInfo] == 1 << 31 | 0xEC && f.vcpu.counters.apicTimerFires == 1)
        #expect(f.vcpu.shared.apics?.tscDeadline(0) == 0, "fired once")
    }

    /// An L1 that does not take external interrupts in L2 (no external-interrupt exiting):
    /// its timer's interrupt waits for L1, and L2 goes on with no deadline already passed, so
    /// its CPU does not exit PREEMPTION_TIMER again and again (L0 would never run anything else).
    @Test func l1sTimerWithoutExternalInterruptExitingLeavesNoPassedDeadlineBehind() throws {
        let (f, _, l1Deadline) = try inL2WithL1Timer(ahead: 200_000_000, pin: PinBased.nmiExiting)
        while monotonicNanos() < l1Deadline { sleepNanos(1_000_000) }
        #expect(f.l2Exit(L2ExitInfo(reason: .preemptionTimer)) == .resume(.l2))
        let word = f.l2Run[RunPage.timerDeadline]
        #expect(word == 0 || word > monotonicNanos(), "a deadline already passed: L2's CPU would exit at once, for ever")
        #expect(f.vcpu.counters.apicTimerFires == 1 && f.vcpu.shared.apics?.deliverable(0) == 0xEC, "L1's interrupt waits for L1")
        // Nor does L0 kick L2 for it at the entry: L2 would exit at every PAUSE or NOP.
        f.vcpu.prepareL2Entry()
        #expect(f.l2Run[RunPage.kick] == 0)
        // An L1 that takes external interrupts has L2 kicked for the same interrupt.
        let (g, _, gDeadline) = try inL2WithL1Timer(ahead: 200_000_000, pin: PinBased.externalInterruptExiting)
        while monotonicNanos() < gDeadline { sleepNanos(1_000_000) }
        g.vcpu.fireTimerIfDue()
        g.vcpu.prepareL2Entry()
        #expect(g.l2Run[RunPage.kick] == RunPage.kickExternal)
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
