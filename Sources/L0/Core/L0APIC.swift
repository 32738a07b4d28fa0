import ABI
import GuestDevices
import Transport

/// The local APICs L0 runs: L2's where it runs L2 directly (single, and pv with
/// `PVFeatures.directAPIC`), L1's own on nested VMX (`L0VMState.apicTier`), as KVM's in-kernel
/// LAPIC does: x2APIC ICR / SELF_IPI / EOI / TPR
/// writes (as MSRs, or in the xAPIC page), KVM_HC_SEND_IPI, HLT until an interrupt, and the interrupt's way to its target:
/// injected at the target's next entry, with a kick first if the target is in guest mode, or
/// a wake-up if it halted. Every value comes from the guest: a bad vector or mode is the APIC's
/// own error (the write is dropped, as an illegal-vector IPI is), never a fault in L0.
extension L0VCPU {
    /// RFLAGS.IF: the guest takes interrupts.
    static let interruptFlag: UInt64 = 1 << 9

    /// Starts the APIC model for a VM of `count` vCPUs (once, by whichever vCPU asks first),
    /// for `tier`'s vCPUs.
    func enableLocalAPICs(count: Int, for tier: Tier = .l2) {
        if shared.apics == nil {
            shared.apics = LocalAPICs(count: count)
            shared.apicTier = tier
        }
    }

    /// The exits of a guest whose local APICs (`apic`) and flush hypercall (`flushHypercall`)
    /// L0 runs, routed to their handlers: x2APIC, TSC-deadline and steal-time MSRs, the timer's
    /// exit, KVM_HC_SEND_IPI, HLT with interrupts on, L2's flush hypercall, and the exit a kick makes. nil: none of them. One
    /// table for every backend that offers them (single; pv by its features).
    func handleInterruptExit(_ exit: L2Exit, _ regs: inout RegisterFile, apic: Bool, flushHypercall: Bool) -> NextStep? {
        switch exit.kind {
        case let .msrWrite(msr, value) where apic && Self.isX2APICMSR(msr):
            return handleAPICMSR(msr, writing: value, length: exit.info.instructionLength, &regs, resuming: .l2)
        case let .msrRead(msr) where apic && Self.isX2APICMSR(msr):
            return handleAPICMSR(msr, writing: nil, length: exit.info.instructionLength, &regs, resuming: .l2)
        case .msrRead(KVMStealTime.msr) where apic, .msrWrite(KVMStealTime.msr, _) where apic:
            return handleStealTimeMSR(exit, &regs)
        case let .msrWrite(LocalAPICMSR.tscDeadline, value) where apic:
            return handleTSCDeadlineMSR(writing: value, length: exit.info.instructionLength, &regs, resuming: .l2)
        case .msrRead(LocalAPICMSR.tscDeadline) where apic:
            return handleTSCDeadlineMSR(writing: nil, length: exit.info.instructionLength, &regs, resuming: .l2)
        case .other where apic && exit.info.reason == .preemptionTimer:
            return handleTimerExit()
        case .vmcall(KVMHypercall.sendIPI) where apic:
            return handlePVSendIPI(exit, &regs)
        case .vmcall(L2Hypercall.flushTLB.rawValue) where flushHypercall:
            return handleFlushHypercall(exit, &regs)
        case .hlt where apic && regs[.rflags] & Self.interruptFlag != 0:
            return handleHalt(exit, &regs)
        case .other where exit.info.reason == .externalInterrupt || (apic && exit.info.reason == .interruptWindow):
            return handleKickExit(&regs)
        default:
            return nil
        }
    }

    /// The x2APIC MSR range (0x800-0x8FF).
    static func isX2APICMSR(_ msr: UInt32) -> Bool { LocalAPICMSR.range.contains(msr) }

    /// RDMSR (`writing` nil) or WRMSR of an x2APIC register by the tier whose APIC L0 runs: L2
    /// on single and pv, L1 on nvmx (which then resumes). Unknown registers read 0 and ignore
    /// writes (the model has no more of them).
    func handleAPICMSR(_ msr: UInt32, writing value: UInt64?, length: UInt64, _ regs: inout RegisterFile,
                       resuming tier: Tier) -> NextStep {
        if let value { apicWrite(msr, value) } else { regs.edxEax = apicRead(msr) }
        regs.skipInstruction(length: length)
        return .resume(tier)
    }

    /// An EPT violation in this vCPU's xAPIC page (`XAPIC`), for a backend whose guest memory
    /// has nothing there (memory the guest's hypervisor mapped at that address comes first, as
    /// in KVM, where the APIC is an MMIO device behind the memslots): the APIC's MMIO access;
    /// nil if the exit is anything else.
    func handleAPICPageAccess(_ exit: L2Exit, _ regs: inout RegisterFile) -> NextStep? {
        guard shared.apics != nil, case let .eptViolation(gpa, access, size) = exit.kind, let offset = XAPIC.offset(of: gpa) else { return nil }
        return handleAPICMMIO(offset: offset, write: access & EPT.write != 0, size: size, exit, &regs)
    }

    /// A MOV to or from this vCPU's xAPIC page (the MMIO exit of memory no RAM backs): the
    /// value is RAX, as the guest's store put it (a load's result goes back there). KVM gets
    /// here through its instruction emulator; a store of another size or alignment is dropped,
    /// a load outside a register's first word reads 0 (`LocalAPICs.writeMMIO`, `readMMIO`).
    func handleAPICMMIO(offset: UInt64, write: Bool, size: UInt64, _ exit: L2Exit, _ regs: inout RegisterFile) -> NextStep {
        counters.apicAccesses += 1
        counters.apicMMIOEmulations += 1
        if write {
            do {
                if let deliveries = try shared.apics?.writeMMIO(id, offset: offset, size: size, regs[.rax]) { deliver(deliveries) }
            } catch {
                // An illegal vector or an unsupported mode: the APIC drops the IPI.
            }
        } else {
            regs[.rax] = shared.apics?.readMMIO(id, offset: offset, size: size) ?? 0
        }
        regs.skipInstruction(length: exit.info.instructionLength)
        return .resume(.l2)
    }

    func apicWrite(_ msr: UInt32, _ value: UInt64) {
        counters.apicAccesses += 1
        do {
            if let deliveries = try shared.apics?.writeMSR(id, msr, value) { deliver(deliveries) }
        } catch {
            // An illegal vector or an unsupported mode: the APIC drops the IPI (its ESR says why).
        }
    }

    func apicRead(_ msr: UInt32) -> UInt64 {
        counters.apicAccesses += 1
        return shared.apics?.readMSR(id, msr) ?? 0
    }

    /// RDMSR (`writing` nil) or WRMSR IA32_TSC_DEADLINE by the tier whose APIC L0 runs (KVM's
    /// kvm_set_lapic_tscdeadline_msr, its fastpath): the APIC's timer armed at the guest clock,
    /// or fired at once if the deadline has passed. Any value is an answer: 0 disarms, one far
    /// ahead waits; outside TSC-deadline mode the write is ignored. L2's CPU learns the deadline
    /// at its entry (`prepareL2Entry`), as KVM arms the VMX-preemption timer; L1's is looked at
    /// at each of its entries and while it halts.
    func handleTSCDeadlineMSR(writing value: UInt64?, length: UInt64, _ regs: inout RegisterFile, resuming tier: Tier) -> NextStep {
        counters.apicAccesses += 1
        if let value {
            if let fired = shared.apics?.armTSCDeadline(id, value, now: monotonicNanos()) { deliverTimer(fired) }
        } else {
            regs.edxEax = shared.apics?.tscDeadline(id) ?? 0
        }
        regs.skipInstruction(length: length)
        return .resume(tier)
    }

    /// PREEMPTION_TIMER of L2 where L0 runs L2's APIC: L2's CPU reached the deadline L0 gave it
    /// (KVM's handle_fastpath_preemption_timer): the timer fires, its interrupt goes in at the
    /// entry. One that comes early (L2 wrote the exit itself) fires nothing.
    func handleTimerExit() -> NextStep {
        fireTimerIfDue()
        return .resume(.l2)
    }

    /// This vCPU's APIC timer (whichever tier's APIC L0 runs), if its deadline has come: its
    /// interrupt accepted, the vCPU woken if it halted. The clock is read (unless given) only
    /// when a deadline is armed, and the APICs asked in place: this runs at every L1 entry on
    /// nested VMX.
    func fireTimerIfDue(now: UInt64? = nil) {
        guard (shared.apics?.tscDeadline(id) ?? 0) != 0,
              let fired = shared.apics?.timerTick(id, now: now ?? monotonicNanos()) else { return }
        deliverTimer(fired)
    }

    /// A timer's interrupt accepted on this vCPU (its own: injected at its entry, or woken if
    /// it halted).
    func deliverTimer(_ deliveries: [LocalAPICs.Delivery]) {
        for d in deliveries {
            counters.apicTimerFires += 1
            if case .wake(let j) = d {
                shared.wakeups.append(j)
                counters.apicWakeups += 1
            }
        }
    }

    /// KVM_HC_SEND_IPI (kvm_pv_send_ipi): a 128-bit bitmap of APIC IDs from `minID`, one fixed
    /// vector. RAX <- how many it reached; a bad vector or mode is -KVM_EINVAL.
    func handlePVSendIPI(_ exit: L2Exit, _ regs: inout RegisterFile) -> NextStep {
        counters.pvIPIHypercalls += 1
        if let sent = shared.apics?.sendPV(from: id, bitmapLow: regs[.rbx], bitmapHigh: regs[.rcx], minID: regs[.rdx], icr: regs[.rsi]) {
            deliver(sent.deliveries)
            regs[.rax] = sent.error == nil ? UInt64(sent.deliveries.count) : HypercallError.invalid.returnValue
        }
        regs.skipInstruction(length: exit.info.instructionLength)
        return .resume(.l2)
    }

    /// What accepted interrupts ask of L0: a kick for a target in guest mode (not this vCPU,
    /// which is in L0 now and takes it at its entry), a wake-up for a halted one. On nvmx the
    /// APICs are L1's: a target whose L2 runs is kicked out of L2 (L0 then gives L1 its
    /// interrupt as an EXTERNAL_INTERRUPT VM exit) if L1 exits on external interrupts there,
    /// else it waits; one in L1 takes it at its next entry.
    func deliver(_ deliveries: [LocalAPICs.Delivery]) {
        for d in deliveries {
            counters.apicIPIs += 1
            switch d {
            case .notify(let j) where j != id && j < shared.inGuestMode.count && shared.inGuestMode[j]
                                      && (shared.apicTier == .l2 || shared.backends.indices.contains(j) && shared.backends[j].l1InterruptsEndL2):
                control.runPage(.l2, vcpu: j)[RunPage.kick] = RunPage.kickExternal
                counters.apicKicks += 1
            case .wake(let j):
                shared.wakeups.append(j)
                counters.apicWakeups += 1
            case .notify, .pending:
                break
            }
        }
    }

    /// L1's own HLT (nvmx: an L1 vCPU with nothing to run): it blocks until an interrupt for
    /// it comes, or goes on at once if one is deliverable.
    func handleL1Halt(_ exit: L1Exit, _ regs: inout RegisterFile) -> NextStep {
        regs.skipInstruction(length: exit.info.instructionLength)
        fireTimerIfDue()     // kvm_vcpu_check_block: a timer already due is an interrupt, no block
        guard shared.apics?.halt(id) == true else { return .resume(.l1) }
        counters.haltsBlocked += 1
        return .block(.l1)
    }

    /// Before L0 enters L1 (nvmx): L1's highest deliverable interrupt goes in, unless another
    /// event is queued (L1 runs with interrupts on: its kernel's hypervisor loop).
    func prepareL1Entry() {
        guard shared.apicTier == .l1 else { return }
        fireTimerIfDue()
        guard shared.apics?.deliverable(id) != nil, l1Run[RunPage.eventInjection] & (1 << 31) == 0,
              let vector = shared.apics?.acknowledge(id) else { return }
        l1Run[RunPage.eventInjection] = 1 << 31 | UInt64(vector)
        counters.interruptsInjected += 1
    }

    /// HLT: with interrupts enabled and none deliverable, the vCPU blocks in L0 until one
    /// arrives; otherwise (interrupts off, as the one-vCPU `hlt` test runs, or one pending) it
    /// resumes at once.
    func handleHalt(_ exit: L2Exit, _ regs: inout RegisterFile) -> NextStep {
        regs.skipInstruction(length: exit.info.instructionLength)
        guard regs[.rflags] & Self.interruptFlag != 0 else { return .resume(.l2) }
        fireTimerIfDue()     // kvm_vcpu_check_block: a timer already due is an interrupt, no block
        guard shared.apics?.halt(id) == true else { return .resume(.l2) }
        counters.haltsBlocked += 1
        markPreempted()
        return .block(.l2)
    }

    /// EXTERNAL_INTERRUPT or INTERRUPT_WINDOW: the guest took its kick. Nothing to emulate;
    /// the interrupt goes in at the entry.
    func handleKickExit(_ regs: inout RegisterFile) -> NextStep {
        l2Run[RunPage.kick] = 0
        return .resume(.l2)
    }

    /// Before L0 enters L2: a steal-time flush honoured, then L2's interrupt injected where L0
    /// runs L2's APICs.
    /// On nvmx (L0 runs L1's APICs), an interrupt L1 has waiting ends the L2 run at once: a kick
    /// (then a nested EXTERNAL_INTERRUPT exit), also after L0 held the vCPU in L2's context (a
    /// flush hypercall's wait).
    func prepareL2Entry() {
        if !shared.stealTime.isEmpty { takeStealTimeFlush() }
        guard shared.apics != nil else { return }
        if shared.apicTier == .l2 {
            // The deadline L2's CPU exits at (the VMX-preemption timer KVM arms for it).
            let deadline = shared.apics?.tscDeadline(id) ?? 0
            if l2Run[RunPage.timerDeadline] != deadline { l2Run[RunPage.timerDeadline] = deadline }
            injectPendingInterrupt()
        }
        else if shared.apics?.deliverable(id) != nil, backend.l1InterruptsEndL2 { l2Run[RunPage.kick] = RunPage.kickExternal }
    }

    /// Before L0 enters its guest tier: the highest deliverable interrupt, if the guest takes
    /// interrupts and no other event is queued, goes into VM_ENTRY_INTR_INFO (an external
    /// interrupt); the kick it answers is cleared. With interrupts off, one waiting asks for an
    /// interrupt window instead (the CPU exits once they are on).
    func injectPendingInterrupt() {
        guard shared.apics?.deliverable(id) != nil, l2Run[RunPage.eventInjection] & (1 << 31) == 0 else { return }
        guard l2Run[register: .rflags] & Self.interruptFlag != 0 else {
            l2Run[RunPage.kick] = RunPage.kickWindow
            return
        }
        guard let vector = shared.apics?.acknowledge(id) else { return }
        l2Run[RunPage.eventInjection] = 1 << 31 | UInt64(vector)     // type 0: external interrupt
        l2Run[RunPage.kick] = 0
        counters.interruptsInjected += 1
    }
}
