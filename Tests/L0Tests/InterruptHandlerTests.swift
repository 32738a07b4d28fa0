import ABI
import GuestDevices
@testable import L0
import Testing
import Transport

/// L0's interrupt and TLB handlers with made-up exits (no processes): hostile values end in a
/// documented answer, never a trap in L0.
@Suite struct InterruptHandlerTests {
    func wrmsr(_ f: Fixture, _ msr: UInt32, _ value: UInt64) -> NextStep {
        f.l2Run[register: .rcx] = UInt64(msr)
        f.l2Run[register: .rdx] = value >> 32
        f.l2Run[register: .rax] = value & 0xFFFF_FFFF
        return f.l2Exit(L2ExitInfo(reason: .msrWrite, instructionLength: 2))
    }

    /// A steal-time GPA that wraps past 2^64 (found by a cold review: it trapped L0), one past
    /// what EPT02 covers, and reserved bits: none registers an area; reserved bits are #GP.
    @Test(arguments: [NestingPath.single, .pv])
    func aHostileStealTimeGPAIsRefusedWithoutATrap(_ path: NestingPath) throws {
        let f = try Fixture(path)
        #expect(wrmsr(f, KVMStealTime.msr, 0xFFFF_FFFF_FFFF_FFC1) == .resume(.l2))
        #expect(f.vcpu.shared.stealTime.allSatisfy { $0 == nil })
        #expect(wrmsr(f, KVMStealTime.msr, f.layout.l2AddressLimit | 1) == .resume(.l2))
        #expect(f.vcpu.shared.stealTime.allSatisfy { $0 == nil })
        #expect(wrmsr(f, KVMStealTime.msr, 0x7000 | 0x3) == .resume(.l2))
        #expect(f.l2Run[RunPage.eventInjection] == 1 << 31 | 3 << 8 | 1 << 11 | 13, "reserved bits: #GP")
        f.l2Run[RunPage.eventInjection] = 0
        #expect(wrmsr(f, KVMStealTime.msr, 0x7000 | 1) == .resume(.l2))
        #expect(f.vcpu.shared.stealTime.first == L2GPA(0x7000))
    }

    /// A MOV to the xAPIC page (an EPT violation at 0xFEE00xxx, size in the exit): on single
    /// and on pv with direct-apic, L0's APIC takes it through its emulator, RIP moves on, and a
    /// load's value lands in RAX; garbage sizes, offsets and vectors are dropped or read 0; the
    /// page next to it is not the APIC's.
    @Test(arguments: [NestingPath.single, .pv])
    func theXAPICPageIsL0sAPICAndGarbageThereIsDropped(_ path: NestingPath) throws {
        let f = try Fixture(path)
        f.vcpu.enableLocalAPICs(count: 1)        // as the backend's start (single) or PV negotiation (pv) does
        func access(_ offset: UInt64, write: Bool, size: UInt64, _ value: UInt64 = 0) -> NextStep {
            f.l2Run[register: .rax] = value
            let q = write ? EPTViolationQualification.dataWrite : EPTViolationQualification.dataRead
            return f.l2Exit(L2ExitInfo(reason: .eptViolation, qualification: q, guestPhysicalAddress: L2GPA(XAPIC.base + offset),
                                       instructionLength: 3, instructionInfo: size))
        }
        let rip = f.l2Run[register: .rip]
        #expect(access(XAPIC.icrHigh, write: true, size: 4, 0) == .resume(.l2))
        #expect(access(XAPIC.icrLow, write: true, size: 4, 0xB0 | 1 << 18) == .resume(.l2))      // a self-IPI
        #expect(f.l2Run[register: .rip] == rip + 6)
        #expect(f.vcpu.shared.apics?.deliverable(0) == 0xB0)
        #expect(access(XAPIC.id, write: false, size: 4, ~0) == .resume(.l2) && f.l2Run[register: .rax] == 0)
        #expect(access(XAPIC.icrLow, write: false, size: 4) == .resume(.l2) && f.l2Run[register: .rax] == 0xB0 | 1 << 18)
        #expect(f.vcpu.counters.apicMMIOEmulations == 4 && f.vcpu.counters.apicIPIs == 1 && f.vcpu.counters.totalDeliveries == 0)
        let all: UInt64 = ~0
        let garbage: [(UInt64, UInt64, UInt64)] = [
            (XAPIC.icrLow, 8, 0xB1 | 1 << 18), (XAPIC.icrLow + 2, 4, all), (0xFFF, 1, all),
            (XAPIC.icrLow, 4, 0x7 << 8 | 0x3), (XAPIC.icrLow, 4, all), (XAPIC.tpr, all, all), (XAPIC.tpr + 0xF, 1 << 63, all),
        ]
        for (offset, size, value) in garbage {
            #expect(access(offset, write: true, size: size, value) == .resume(.l2))
            if offset != XAPIC.icrLow || size != 4 {
                #expect(access(offset, write: false, size: size, ~0) == .resume(.l2) && f.l2Run[register: .rax] == 0,
                        "offset \(offset) size \(size)")
            }
        }
        #expect(f.vcpu.counters.apicIPIs == 1, "nothing more was sent")
        // One page on: memory no RAM backs, not the APIC (L0's device model or L1's).
        let before = f.vcpu.counters.apicMMIOEmulations
        f.l2Run[register: .rax] = 0x1234
        _ = f.l2Exit(L2ExitInfo(reason: .eptViolation, qualification: EPTViolationQualification.dataWrite,
                                guestPhysicalAddress: L2GPA(XAPIC.base + pageSize), instructionLength: 3, instructionInfo: 4))
        #expect(f.vcpu.counters.apicMMIOEmulations == before)
    }

    /// Memory L1 mapped at the xAPIC page's address comes first (found by a cold review: a
    /// write there went to L0's APIC while reads went to the memory): a store it does not allow
    /// is L1's fault to see, a load refills EPT02, and the APIC takes neither.
    @Test func memoryL1MappedOverTheXAPICPageComesFirst() throws {
        let f = try Fixture(.pv, l2Limit: 4 << 30)
        f.vcpu.enableLocalAPICs(count: 1)
        #expect(f.hypercall(.createVCPU, Plan.exitPage.raw).rax == 0)
        #expect(f.map(l2: XAPIC.base, l1: 4 << 20, length: pageSize, flags: PVMapFlags.read) == 0)
        func access(write: Bool) -> NextStep {
            f.l2Run[register: .rax] = 0xB0 | 1 << 18
            let q = write ? EPTViolationQualification.dataWrite : EPTViolationQualification.dataRead
            return f.l2Exit(L2ExitInfo(reason: .eptViolation, qualification: q, guestPhysicalAddress: L2GPA(XAPIC.base + XAPIC.icrLow),
                                       instructionLength: 3, instructionInfo: 4))
        }
        #expect(access(write: true) == .resume(.l1))
        #expect(f.vcpu.counters.pvDeliveries == 1)
        #expect(access(write: false) == .resume(.l2))
        #expect(f.vcpu.counters.apicMMIOEmulations == 0 && f.vcpu.shared.apics?.deliverable(0) == nil)
    }

    /// L0's TSC-deadline timer with made-up exits: the deadline reaches L2's CPU at the entry
    /// (its preemption timer), its PREEMPTION_TIMER exit fires it once, the interrupt is
    /// injected at the next entry, and any deadline L2 names (0, the far future, the past) is
    /// an answer, not a trap.
    @Test(arguments: [NestingPath.single, .pv])
    func theTSCDeadlineTimerReachesL2sCPUAndFiresAtItsExit(_ path: NestingPath) throws {
        let f = try Fixture(path)
        f.vcpu.enableLocalAPICs(count: 1)
        #expect(wrmsr(f, LocalAPICMSR.lvtTimer, 0xEF | UInt64(LVTTimer.tscDeadlineMode)) == .resume(.l2))
        let deadline = monotonicNanos() + 60_000_000_000
        #expect(wrmsr(f, LocalAPICMSR.tscDeadline, deadline) == .resume(.l2))
        f.l2Run[register: .rflags] = 0x202
        f.vcpu.prepareL2Entry()
        #expect(f.l2Run[RunPage.timerDeadline] == deadline && f.l2Run[RunPage.eventInjection] == 0)
        // An early (or forged) timer exit fires nothing.
        #expect(f.l2Exit(L2ExitInfo(reason: .preemptionTimer)) == .resume(.l2))
        #expect(f.vcpu.counters.apicTimerFires == 0)
        // A deadline already passed fires at the WRMSR; the entry injects it and clears the word.
        #expect(wrmsr(f, LocalAPICMSR.tscDeadline, 1) == .resume(.l2))
        f.vcpu.prepareL2Entry()
        #expect(f.vcpu.counters.apicTimerFires == 1 && f.l2Run[RunPage.eventInjection] == 1 << 31 | 0xEF)
        #expect(f.l2Run[RunPage.timerDeadline] == 0)
        for hostile: UInt64 in [0, ~0, 1 << 63] {
            #expect(wrmsr(f, LocalAPICMSR.tscDeadline, hostile) == .resume(.l2))
            #expect(f.l2Exit(L2ExitInfo(reason: .preemptionTimer)) == .resume(.l2))
        }
        #expect(f.vcpu.counters.apicTimerFires == 1)
        // HLT with the timer armed and nothing deliverable blocks the vCPU (no poll): the loop
        // wakes it at the deadline (`fireTimerIfDue`, as the loop calls it then).
        let later = monotonicNanos() + 60_000_000_000
        #expect(wrmsr(f, LocalAPICMSR.tscDeadline, later) == .resume(.l2))
        f.l2Run[register: .rflags] = 0x202
        #expect(f.l2Exit(L2ExitInfo(reason: .hlt, instructionLength: 1)) == .block(.l2))
        f.vcpu.fireTimerIfDue(now: later - 1)
        #expect(f.vcpu.shared.wakeups.isEmpty)
        f.vcpu.fireTimerIfDue(now: later)
        #expect(f.vcpu.shared.wakeups == [0] && f.vcpu.counters.apicTimerFires == 2)
        // A HLT that comes after the deadline passed does not block (kvm_vcpu_check_block): the
        // timer fires there and the vCPU goes on.
        f.vcpu.shared.wakeups.removeAll()
        f.vcpu.shared.apics?.endOfInterrupt(0)                  // the one injected before
        _ = f.vcpu.shared.apics?.acknowledge(0)                 // the one the wake-up brought
        f.vcpu.shared.apics?.endOfInterrupt(0)
        f.vcpu.shared.apics?.setState(0, .running)
        let passed = monotonicNanos() + 300_000_000      // far enough that the WRMSR comes first
        #expect(wrmsr(f, LocalAPICMSR.tscDeadline, passed) == .resume(.l2))
        #expect(f.vcpu.counters.apicTimerFires == 2 && f.vcpu.shared.apics?.deliverable(0) == nil)
        while monotonicNanos() < passed { sleepNanos(1_000_000) }
        f.l2Run[register: .rflags] = 0x202
        #expect(f.l2Exit(L2ExitInfo(reason: .hlt, instructionLength: 1)) == .resume(.l2))
        #expect(f.vcpu.counters.apicTimerFires == 3 && f.vcpu.counters.haltsBlocked == 1)
    }

    /// ICRs with every garbage vector, mode and destination, and PV IPIs with every bitmap:
    /// accepted, dropped or refused, never a trap; a flush hypercall naming vCPUs the VM does
    /// not have is -KVM_EINVAL.
    @Test func garbageIPIsAndFlushesAreDroppedOrRefused() throws {
        let f = try Fixture(.single)
        for value: UInt64 in [0, 0xF, 0xFF, ~0, 0x4_00FF, 0xFFFF_FFFF_0000_00B0, 0x3 << 18 | 0xB0, 0x7 << 8 | 0x30] {
            #expect(wrmsr(f, LocalAPICMSR.icr, value) == .resume(.l2))
            #expect(wrmsr(f, LocalAPICMSR.selfIPI, value) == .resume(.l2))
        }
        for (low, high, minID) in [(UInt64.max, UInt64.max, UInt64.max), (1, 0, UInt64.max - 1), (0, 1 << 63, 0)] {
            f.l2Run[register: .rax] = KVMHypercall.sendIPI
            f.l2Run[register: .rbx] = low; f.l2Run[register: .rcx] = high
            f.l2Run[register: .rdx] = minID; f.l2Run[register: .rsi] = 0xB0
            #expect(f.l2Exit(L2ExitInfo(reason: .vmcall, instructionLength: 3)) == .resume(.l2))
        }
        f.l2Run[register: .rax] = L2Hypercall.flushTLB.rawValue
        f.l2Run[register: .rbx] = ~0
        #expect(f.l2Exit(L2ExitInfo(reason: .vmcall, instructionLength: 3)) == .resume(.l2))
        #expect(f.l2Run[register: .rax] == HypercallError.invalid.returnValue)
    }
}
