import ABI
import GuestDevices
import Transport

/// Nested VMX's transitions between L1 and L2, both ways: which L2 exits L1 must see
/// (`NestedExitRules`, pure) and what L0 does with the ones it keeps; how L0 reflects one as a
/// VM exit into vmcs12 (KVM's nested_vmx_vmexit); how it emulates VMLAUNCH/VMRESUME
/// (nested_vmx_run, prepare_vmcs02); and the shadow VMCS copies both directions need. EPT
/// violations continue in NestedEPT.swift.
extension NestedVMXBackend {
    public func handleL2Exit(_ exit: L2Exit, _ regs: inout RegisterFile, _ vcpu: L0VCPU) -> NextStep {
        guard let vmcs12 else { return .stop(.fatal(.noCurrentVMCS12)) }
        if exit.info.reason == .externalInterrupt { return handleL1InterruptInL2(exit, regs, vmcs12, vcpu) }
        if exit.info.reason == .interruptWindow {
            // The window L1 asked for (interrupt-window exiting in vmcs12) is open: L1's exit.
            // One L1 did not ask for (it turned the control off meanwhile) ends here.
            vcpu.l2Run[RunPage.kick] = 0
            guard Self.wantsInterruptWindow(vmcs12) else { return .resume(.l2) }
        }
        if case .vmcall(L2Hypercall.flushTLB.rawValue) = exit.kind, l2TLBFlushEnlightened(vcpu) {
            return vcpu.handleFlushHypercall(exit, &regs)
        }
        if NestedExitRules.reflects(exit, vmcs12: vmcs12, registers: regs, l1Memory: vcpu.l1Memory) {
            vcpu.countVMMUserspaceExit(exit)
            return reflect(exit.info, l2: regs, vcpu)
        }
        switch exit.kind {
        case let .eptViolation(gpa, access, _):
            return handleEPTViolation(exit, gpa: gpa, access: access, vmcs12, &regs, vcpu)
        case .io(let io):
            return vcpu.handleL0PortIO(io, exit, &regs)
        case .msrRead, .msrWrite:
            return vcpu.handleL0MSR(exit, &regs)
        default:
            switch exit.info.reason {
            case .hlt, .pause, .rdtsc, .rdtscp, .invlpg, .mwait, .monitor, .wbinvd, .rdpmc, .drAccess,
                 .gdtrIdtr, .ldtrTr, .invpcid, .umwait, .tpause, .rdrand, .rdseed:
                // Instructions L1 did not ask for: L0 completes them (HLT: L0 has no other work
                // and an interrupt is "pending" at once, so L2 wakes immediately).
                regs.skipInstruction(length: exit.info.instructionLength)
                return .resume(.l2)
            case .preemptionTimer:
                return handleTimerInL2(exit, regs, vmcs12, vcpu)
            case .exceptionNMI, .externalInterrupt, .pmlFull, .busLock, .notify,
                 .mceDuringVMEntry, .monitorTrapFlag, .tprBelowThreshold:
                // L0's own events (an NMI or interrupt for the host, its timer, its PML buffer...):
                // handled, and L2 goes on where it was.
                return .resume(.l2)
            case .crAccess:
                // A CR bit L1 does not own (CR8 without TPR shadow or CR8 exiting, say): L0 keeps
                // L2's value, as its kernel would.
                l2ControlRegisters.emulateCR(qualification: exit.info.qualification, &regs)
                regs.skipInstruction(length: exit.info.instructionLength)
                return .resume(.l2)
            case .encls, .vmfunc:
                // Not exposed to L1, so not to L2 either: #UD.
                vcpu.inject(into: .l2, vector: 6)
                return .resume(.l2)
            default:
                return .stop(.fatal(.unhandledL2Exit(exit.info.reason)))
            }
        }
    }

    /// L1 exits on external interrupts in L2 (a vmcs12 field in L0's memory, as KVM's
    /// nested_exit_on_intr reads it).
    public var l1InterruptsEndL2: Bool {
        guard let v = vmcs12 else { return true }
        return v[.pinBasedVMExecControl] & PinBased.externalInterruptExiting != 0
    }

    /// L1 asked for an interrupt-window exit (a vmcs12 field in L0's memory, as KVM's
    /// nested_cpu_has reads it: no VMREAD counted).
    static func wantsInterruptWindow(_ v: VMCSImage) -> Bool {
        v[.cpuBasedVMExecControl] & CPUBased.interruptWindowExiting != 0
    }

    /// Hyper-V's "L2 TLB flush": L1 turned on direct hypercalls in its VP assist page and
    /// `nested_flush_hypercall` in the eVMCS, so L0 answers L2's flush hypercall itself (KVM's
    /// kvm_hv_l2_tlb_flush_exposed; a VMCALL is otherwise always L1's). Both read from L1's
    /// memory at the exit, as KVM reads them.
    func l2TLBFlushEnlightened(_ vcpu: L0VCPU) -> Bool {
        guard variant == .enlightened, let assist = vpAssistPage, let image = evmcs,
              let features: UInt32 = try? vcpu.l1Memory.load(assist + VPAssistPage.nestedControlFeatures),
              features & VPAssistPage.directHypercall != 0 else { return false }
        return image.evmcsEnlightenmentsControl & EnlightenedVMCS.nestedFlushHypercall != 0
    }

    /// L2 was kicked out because L1 has an interrupt waiting (L0 runs L1's APIC): with
    /// external-interrupt exiting, L1 gets it as an EXTERNAL_INTERRUPT VM exit, acknowledged on
    /// the way (VM_EXIT_INTR_INFO holds the vector, as with "acknowledge interrupt on exit");
    /// KVM's vmx_check_nested_events. Nothing waiting (a kick that raced an entry): L2 goes on.
    func handleL1InterruptInL2(_ exit: L2Exit, _ regs: RegisterFile, _ v: VMCSImage, _ vcpu: L0VCPU) -> NextStep {
        // The kick may have overwritten a window request L1 still has on: it stays.
        vcpu.l2Run[RunPage.kick] = Self.wantsInterruptWindow(v) ? RunPage.kickWindow : 0
        guard v[.pinBasedVMExecControl] & PinBased.externalInterruptExiting != 0,
              let vector = vcpu.shared.apics?.acknowledge(vcpu.id) else { return .resume(.l2) }
        vcpu.counters.interruptsInjected += 1
        var info = exit.info
        info.interruptionInfo = 1 << 31 | UInt64(vector)      // type 0: external interrupt
        return reflect(info, l2: regs, vcpu)
    }

    /// PREEMPTION_TIMER in L2: L2's CPU reached the deadline L0 gave it, the earlier of
    /// vmcs12's emulated timer and L1's own APIC timer. vmcs12's timer run out is L1's
    /// PREEMPTION_TIMER exit (KVM's vmx_check_nested_events takes it before interrupts); L1's
    /// own timer due is L1's interrupt, an EXTERNAL_INTERRUPT exit. Neither due (L2 wrote the
    /// exit itself, or came early): L2 goes on with the deadline rewritten.
    func handleTimerInL2(_ exit: L2Exit, _ regs: RegisterFile, _ v: VMCSImage, _ vcpu: L0VCPU) -> NextStep {
        let now = monotonicNanos()
        vcpu.fireTimerIfDue(now: now)
        if vmcs12TimerDeadline != 0, now >= vmcs12TimerDeadline {
            // nested_vmx_vmexit(vcpu, EXIT_REASON_PREEMPTION_TIMER, 0, 0): nothing else of
            // what L2's CPU wrote goes to L1.
            return reflect(L2ExitInfo(reason: .preemptionTimer), l2: regs, vcpu)
        }
        if vcpu.shared.apics?.deliverable(vcpu.id) != nil {
            // L1's timer interrupt ends L2's run as an external interrupt does (if L1 takes
            // external interrupts there; otherwise it waits, and L2 goes on).
            let next = handleL1InterruptInL2(L2Exit(info: L2ExitInfo(reason: .externalInterrupt), registers: regs), regs, v, vcpu)
            if case .resume(.l2) = next { armL2Timer(vcpu) }
            return next
        }
        // Neither due: L2 goes on, with a deadline that has not passed (or none), so its CPU
        // cannot exit at once again.
        armL2Timer(vcpu)
        return .resume(.l2)
    }

    /// The deadline L2's CPU exits at: the earlier of vmcs12's emulated preemption timer and
    /// L1's own APIC timer (which L0 runs, and keeps running while L1's vCPU is in L2, as KVM
    /// arms vmcs02's preemption timer for L1's deadline); 0 if neither is armed.
    func armL2Timer(_ vcpu: L0VCPU) {
        let l1 = vcpu.shared.apics?.tscDeadline(vcpu.id) ?? 0
        let nested = vmcs12TimerDeadline
        let deadline = l1 == 0 ? nested : nested == 0 ? l1 : min(l1, nested)
        if vcpu.l2Run[RunPage.timerDeadline] != deadline { vcpu.l2Run[RunPage.timerDeadline] = deadline }
    }

    /// nested_vmx_vmexit: sync L2's state into vmcs12, write the exit information, refresh the
    /// shadow VMCS (or eVMCS), hand L1 L2's GPRs and load vmcs12's host state into L1.
    func reflect(_ info: L2ExitInfo, l2 regs: RegisterFile, _ vcpu: L0VCPU) -> NextStep {
        guard let v = vmcs12 else { return .stop(.fatal(.noCurrentVMCS12)) }
        var writes: UInt64 = 0
        v[.guestRIP] = regs[.rip]
        v[.guestRSP] = regs[.rsp]
        v[.guestRFLAGS] = regs[.rflags]
        v[.guestInterruptibilityInfo] = 0
        writes += 4
        v[.vmExitReason] = UInt64(info.reason.rawValue)
        v[.exitQualification] = info.qualification
        v[.guestPhysicalAddress] = info.guestPhysicalAddress.raw
        v[.guestLinearAddress] = info.guestLinearAddress
        v[.vmExitInstructionLen] = info.instructionLength
        v[.vmxInstructionInfo] = info.instructionInfo
        v[.vmExitIntrInfo] = info.interruptionInfo
        v[.vmExitIntrErrorCode] = info.interruptionErrorCode
        v[.idtVectoringInfoField] = 0
        v[.vmEntryIntrInfoField] = v[.vmEntryIntrInfoField] & ~(1 << 31)   // SDM 27.2: valid bit cleared
        writes += 10
        vcpu.counters.vmcs12FieldWrites += writes
        let interruption = info.interruptionInfo
        vcpu.counters.count(KVMWork.reflectedExit(
            exceptionWithErrorCode: info.reason == .exceptionNMI && interruption & (1 << 11) != 0, failedEntry: false))
        countTransitionTLBFlush(entering: false, v, vcpu)
        vcpu.counters.mmuRootSwitches += 1       // nested_ept_uninit_mmu_context: back to L1's root
        vmcs12TimerDeadline = 0                  // hrtimer_cancel of vmcs12's preemption timer
        if variant == .enlightened {
            // sync_vmcs02_to_vmcs12_rare runs on every exit with an eVMCS.
            vcpu.counters.rareFieldSyncs += 1
        } else {
            needsRareSync = true
        }
        if shadowing { copyVMCS12ToShadow(vcpu) }
        if variant == .enlightened { writeBackEnlightenedVMCS(vcpu) }

        // L2's GPRs stay in the CPU across the exit: L1 finds them in its registers.
        var l1 = vcpu.l1Run.registers
        for r in Register.gprsOutsideVMCS { l1[r] = regs[r] }
        loadHostState(v, &l1, vcpu)
        vcpu.l1Run.registers = l1
        // The decoded access size of a faulting load/store: what L1's instruction emulator would
        // learn by fetching and decoding the instruction from L2 memory (no VMREAD involved).
        vcpu.l1Run[RunPage.instructionInfo] = info.instructionInfo
        guestMode = false
        vcpu.counters.vmcsSwitches += 1          // vmcs02 -> vmcs01
        vcpu.counters.countDelivery(info.reason)
        vcpu.counters.nestedVMExits += 1
        return .resume(.l1)
    }

    /// SDM 27.5: L1 continues at HOST_RIP with HOST_RSP and RFLAGS = 0x2, entered by a VM exit.
    func loadHostState(_ v: VMCSImage, _ l1: inout RegisterFile, _ vcpu: L0VCPU) {
        l1[.rip] = v[.hostRIP]
        l1[.rsp] = v[.hostRSP]
        l1[.rflags] = 0x2
        vcpu.counters.vmcs12FieldReads += 2
        vcpu.l1Run[RunPage.enteredByVMExit] = 1
        vcpu.l1Run[RunPage.vmxResult] = 0
    }
}

// MARK: VM entry (VMLAUNCH / VMRESUME)

/// How an emulated VMLAUNCH/VMRESUME ended.
enum NestedEntryResult {
    case entered
    /// VMfailInvalid / VMfailValid: L1 continues after the instruction.
    case failed(VMXInstructionResult)
    /// Guest-state check failed: L1 resumes at HOST_RIP with exit reason 33 | 0x80000000.
    case entryFailureExit
}

extension NestedVMXBackend {
    /// KVM's nested_vmx_run: checks in SDM order, then prepare_vmcs02 and enter L2.
    /// `l1` is L1's register file (the instruction already skipped).
    func nestedVMEntry(launch: Bool, _ l1: inout RegisterFile, _ vcpu: L0VCPU) -> NestedEntryResult {
        // Rows 1-2: L1's exit on vmcs01 and nested_vmx_run's preamble.
        vcpu.counters.count(KVMWork.Ops(reads: KVMWork.l1ExitReads + KVMWork.preambleReads))
        if variant == .enlightened, !loadEnlightenedVMCS(launch: launch, vcpu) { return .failed(.failInvalid) }
        guard let vmcs12 else { return .failed(.failInvalid) }
        // L1's shadowed VMWRITEs since the last exit live in the shadow VMCS: fold them in.
        if shadowing { copyShadowToVMCS12(vcpu) }

        // The check groups in KVM's order, each counted when it runs.
        vcpu.counters.consistencyChecks += 1      // nested_vmx_run: MOV-SS blocking, launch state
        if vcpu.l1Run[RunPage.interruptibility] & 2 != 0 { return .failed(.failValid(.entryEventsBlockedByMovSS)) }
        if launch && vmcs12.launched { return .failed(.failValid(.vmlaunchNonClearVMCS)) }
        if !launch && !vmcs12.launched { return .failed(.failValid(.vmresumeNonLaunchedVMCS)) }
        // Execution, exit and entry controls (and the eVMCS-unsupported controls).
        vcpu.counters.consistencyChecks += variant == .enlightened ? 4 : 3
        if let e = checkControls(vmcs12, vcpu) { return .failed(.failValid(e)) }
        vcpu.counters.consistencyChecks += 1      // host state
        if let e = checkHostState(vmcs12, vcpu) { return .failed(.failValid(e)) }
        vcpu.counters.consistencyChecks += 1      // guest state
        if !guestStateIsValid(vmcs12, vcpu) {
            // SDM 26.8: the entry fails after the instruction "succeeded"; L1 sees a VM exit.
            // The VMCS stays clear (launch state changes only on a successful entry).
            entryFailureExit(reason: ExitReason(rawValue: ExitReason.invalidState.rawValue | ExitReason.failedVMEntryFlag), &l1, vcpu)
            return .entryFailureExit
        }

        let rare: KVMWork.RareWork
        if variant == .enlightened {
            // early_rare and rare run on every eVMCS entry; the guest groups only when dirty.
            rare = .init(early: true, guestGrp2: lastEVMCSClean & EnlightenedVMCS.Group.guestGrp2.bit == 0,
                         guestGrp1: lastEVMCSClean & EnlightenedVMCS.Group.guestGrp1.bit == 0, other: true)
        } else {
            rare = vmcs12Dirty ? .all : .none
        }
        // A major control was written since the last entry: the hardware runs its full checks.
        if vmcs12Dirty { vcpu.counters.fullEntryChecks += 1 }
        let controlsBefore = vmcs02
        prepareVMCS02(vmcs12, l1: l1, vcpu)
        let changed = [controlsBefore.pinBased != vmcs02.pinBased, controlsBefore.cpuBased != vmcs02.cpuBased,
                       controlsBefore.secondary != vmcs02.secondary, controlsBefore.exceptionBitmap != vmcs02.exceptionBitmap]
            .filter { $0 }.count
        vcpu.counters.count(KVMWork.nestedEntry(rare: rare, changedControls: changed))
        countTransitionTLBFlush(entering: true, vmcs12, vcpu)
        vcpu.counters.mmuRootSwitches += 1       // nested_ept_init_mmu_context: the shadow-EPT root
        if launch { vmcs12.launched = true }
        // L1 asked for an interrupt window (it has an interrupt for L2, which had interrupts
        // off): L2 exits INTERRUPT_WINDOW as soon as they are on (a vmcs12 field in L0's
        // memory, as KVM's nested_cpu_has reads it: no VMREAD).
        if Self.wantsInterruptWindow(vmcs12) {
            vcpu.l2Run[RunPage.kick] = RunPage.kickWindow
        }
        guestMode = true
        vcpu.counters.vmcsSwitches += 1          // vmcs01 -> vmcs02
        vcpu.counters.nestedVMEntries += 1
        if launch { launched() }
        return .entered
    }

    /// nested_vmx_transition_tlb_flush: a vmcs12 without VPID flushes L0's current VPID on every
    /// transition (INVVPID single-context); with one, only an entry with a changed VPID does.
    func countTransitionTLBFlush(entering: Bool, _ v: VMCSImage, _ vcpu: L0VCPU) {
        let cpu = v[.cpuBasedVMExecControl]
        let secondary = cpu & CPUBased.activateSecondaryControls != 0 ? v[.secondaryVMExecControl] : 0
        let vpid = secondary & SecondaryExec.enableVPID != 0 ? v[.virtualProcessorID] : 0
        vcpu.counters.vmcs12FieldReads += 3
        if vpid == 0 {
            vcpu.counters.tlbFlushes += 1
        } else if entering, vpid != lastEnteredVPID {
            vcpu.counters.tlbFlushes += 1
            lastEnteredVPID = vpid
        }
    }

    /// A VM entry that failed its guest-state checks (SDM 26.8, KVM's nested_vmx_entry_failure):
    /// only VM_EXIT_REASON and EXIT_QUALIFICATION change, L2 never ran so its state is not
    /// synced, L1's GPRs stay as they were, and L1 continues at HOST_RIP.
    func entryFailureExit(reason: ExitReason, qualification: UInt64 = 0, _ l1: inout RegisterFile, _ vcpu: L0VCPU) {
        guard let v = vmcs12 else { return }
        v[.vmExitReason] = UInt64(reason.rawValue)
        v[.exitQualification] = qualification
        vcpu.counters.vmcs12FieldWrites += 2
        // KVM's vmentry_fail_vmexit: vmcs02 loaded and left again, then L1's host state.
        vcpu.counters.count(KVMWork.failedEntry)
        if shadowing { copyVMCS12ToShadow(vcpu) }
        if variant == .enlightened { writeBackEnlightenedVMCS(vcpu) }
        loadHostState(v, &l1, vcpu)
        vcpu.counters.nestedVMExits += 1
    }

    /// SDM 26.2.1 as far as this L0's VMX capabilities go. This L0 runs L2 only with EPT
    /// (IA32_VMX_PROCBASED_CTLS2 reports "enable EPT" as must-be-1).
    func checkControls(_ v: VMCSImage, _ vcpu: L0VCPU) -> VMInstructionError? {
        var reads: UInt64 = 0
        defer { vcpu.counters.vmcs12FieldReads += reads }
        let cpu = v[.cpuBasedVMExecControl]
        let secondary = cpu & CPUBased.activateSecondaryControls != 0 ? v[.secondaryVMExecControl] : 0
        reads += 2
        guard secondary & SecondaryExec.enableEPT != 0 else { return .entryInvalidControlField }
        reads += 1
        guard eptpIsValid(v[.eptPointer], vcpu) else { return .entryInvalidControlField }
        func bitmapValid(_ f: VMCSField) -> Bool {
            let a = L1GPA(v[f])
            reads += 1
            return a.isPageAligned && (try? vcpu.l1Memory.memslots.translate(a, length: pageSize)) != nil
        }
        if cpu & CPUBased.useIOBitmaps != 0, !bitmapValid(.ioBitmapA) || !bitmapValid(.ioBitmapB) {
            return .entryInvalidControlField
        }
        if cpu & CPUBased.useMSRBitmaps != 0, !bitmapValid(.msrBitmap) { return .entryInvalidControlField }
        // nested_evmcs_check_controls: the eVMCS has no VMX_PREEMPTION_TIMER_VALUE, so KVM
        // takes the timer out of what it offers an eVMCS L1 (EVMCS1_UNSUPPORTED_PINCTRL) and
        // fails an entry that asks for it.
        if variant == .enlightened, v[.pinBasedVMExecControl] & PinBased.preemptionTimer != 0 { return .entryInvalidControlField }
        return nil
    }

    /// SDM 26.2.1.1's EPTP rules: memory type UC or WB, 4-level walk, reserved bits 11:7 clear,
    /// and (this L0's rule) a root inside L1's memory.
    func eptpIsValid(_ eptp: UInt64, _ vcpu: L0VCPU) -> Bool {
        let memType = eptp & 7
        return (memType == EPT.memoryTypeUC || memType == EPT.memoryTypeWB)
            && eptp & (7 << 3) == EPT.eptpWalkLength4
            && eptp & 0xF80 == 0
            && (try? vcpu.l1Memory.memslots.translate(L1GPA(eptp & EPT.addressMask), length: pageSize)) != nil
    }

    /// SDM 26.2.2, the checks a 64-bit host needs.
    func checkHostState(_ v: VMCSImage, _ vcpu: L0VCPU) -> VMInstructionError? {
        let cr0 = v[.hostCR0], cr4 = v[.hostCR4], exitCtl = v[.vmExitControls], rip = v[.hostRIP]
        vcpu.counters.vmcs12FieldReads += 4
        let pe: UInt64 = 1, pg: UInt64 = 1 << 31, pae: UInt64 = 1 << 5
        guard cr0 & pe != 0, cr0 & pg != 0, cr4 & pae != 0,
              exitCtl & VMExitControl.hostAddressSpaceSize != 0,
              isCanonical(rip) else { return .entryInvalidHostStateField }
        return nil
    }

    /// SDM 26.3.1, the checks that matter for a 64-bit L2.
    func guestStateIsValid(_ v: VMCSImage, _ vcpu: L0VCPU) -> Bool {
        let rflags = v[.guestRFLAGS], cr0 = v[.guestCR0], cr4 = v[.guestCR4], entry = v[.vmEntryControls]
        vcpu.counters.vmcs12FieldReads += 4
        let pg: UInt64 = 1 << 31, pae: UInt64 = 1 << 5
        guard rflags & 0x2 != 0, rflags >> 22 == 0 else { return false }            // bit 1 set, 63:22 clear
        if entry & VMEntryControl.ia32eModeGuest != 0, cr0 & pg == 0 || cr4 & pae == 0 { return false }
        return isCanonical(v[.guestRIP])
    }

    func isCanonical(_ a: UInt64) -> Bool {
        let top = a >> 47
        return top == 0 || top == 0x1FFFF
    }

    /// prepare_vmcs02: L2's state from vmcs12 (RIP/RSP/RFLAGS) and L1's registers (the GPRs,
    /// which no VMCS holds), a fresh EPT02 root if the EPTP changed, and any event to inject.
    func prepareVMCS02(_ v: VMCSImage, l1: RegisterFile, _ vcpu: L0VCPU) {
        if vmcs12Dirty {
            // prepare_vmcs02_rare: the fields that rarely change, re-read after an exiting VMWRITE.
            vcpu.counters.vmcs12FieldReads += 24
            vmcs12Dirty = false
        }
        // prepare_vmcs02_early: the controls, through KVM's cached setters (a VMWRITE only for
        // one that changed, counted by the caller).
        vmcs02 = VMCS02Controls.merge(l1: v)
        vcpu.counters.vmcs12FieldReads += 4
        // vmcs02's CR0/CR4 guest/host masks: a bit exits if L0 or L1 owns it (prepare_vmcs02).
        let masks = vcpu.control.l2CRGuestHostMasks(vcpu: vcpu.id)
        masks[0] = ControlRegisterBits.kvmCR0GuestHostMask | v[.cr0GuestHostMask]
        masks[1] = ControlRegisterBits.kvmCR4GuestHostMask | v[.cr4GuestHostMask]
        vcpu.counters.vmcs12FieldReads += 2
        // nested_get_vmcs12_pages -> nested_vmx_prepare_msr_bitmap, on every entry (KVM skips
        // it only for an eVMCS whose L1 enabled the enlightened MSR bitmap; this L1 does not).
        mergeL2MSRBitmap(v, vcpu)
        // vmcs12's VMX-preemption timer (vmx_start_preemption_timer): it counts from this entry
        // down from VMX_PREEMPTION_TIMER_VALUE, so L1 writes what is left before each entry.
        if vmcs02.pinBased & PinBased.preemptionTimer != 0 {
            vmcs12TimerDeadline = monotonicNanos() &+ (v[.vmxPreemptionTimerValue] & 0xFFFF_FFFF)
            vcpu.counters.vmcs12FieldReads += 1
            vcpu.counters.nestedTimerStarts += 1
        } else {
            vmcs12TimerDeadline = 0
        }
        armL2Timer(vcpu)
        shadowEPT12(of: v[.eptPointer], vcpu)
        var l2 = vcpu.l2Run.registers
        for r in Register.gprsOutsideVMCS { l2[r] = l1[r] }
        l2[.rip] = v[.guestRIP]
        l2[.rsp] = v[.guestRSP]
        l2[.rflags] = v[.guestRFLAGS]
        vcpu.l2Run.registers = l2
        let intr = v[.vmEntryIntrInfoField]
        vcpu.counters.vmcs12FieldReads += 5
        if intr & (1 << 31) != 0 {
            vcpu.l2Run[RunPage.eventInjection] = intr
            vcpu.l2Run[RunPage.eventErrorCode] = v[.vmEntryExceptionErrorCode]
            vcpu.counters.vmcs12FieldReads += 1
        }
    }

    /// nested_vmx_prepare_msr_bitmap: an MSR passes through to L2 only where L0 and L1 both let it.
    func mergeL2MSRBitmap(_ v: VMCSImage, _ vcpu: L0VCPU) {
        let l1Bitmap = v[.cpuBasedVMExecControl] & CPUBased.useMSRBitmaps != 0 ? L1GPA(v[.msrBitmap]) : nil
        for msr in PassthroughMSRs.all {
            for write in [false, true] {
                var l1Intercepts = true
                if let base = l1Bitmap, let (byte, bit) = MSRBitmap.position(of: msr, write: write),
                   let at = base.adding(byte), let b: UInt8 = try? vcpu.l1Memory.load(at) {
                    l1Intercepts = b & (1 << bit) != 0
                }
                vcpu.setL2Intercept(msr, write: write, l1Intercepts)
            }
        }
        vcpu.counters.msrBitmapMerges += 1
    }
}

extension NestedVMXBackend {
    // MARK: shadow VMCS synchronisation (KVM: copy_shadow_to_vmcs12 / copy_vmcs12_to_shadow)

    func copyShadowToVMCS12(_ vcpu: L0VCPU) {
        guard let vmcs12 else { return }
        shadowVMCS.copySlots(Self.shadowedReadWriteOffsets, to: vmcs12)
        vcpu.counters.shadowVMCSFieldCopies += UInt64(Self.shadowedReadWriteOffsets.count)
        vcpu.counters.count(KVMWork.shadowToVMCS12(fields: Self.shadowedReadWriteOffsets.count))
    }

    func copyVMCS12ToShadow(_ vcpu: L0VCPU) {
        guard let vmcs12 else { return }
        vmcs12.copySlots(Self.shadowedAllOffsets, to: shadowVMCS)
        vcpu.counters.shadowVMCSFieldCopies += UInt64(Self.shadowedAllOffsets.count)
        vcpu.counters.count(KVMWork.vmcs12ToShadow(fields: Self.shadowedAllOffsets.count))
    }
}

// MARK: which L2 exits reach L1

/// nested_vmx_reflect_vmexit: which L2 exits L1 must see, from vmcs12's controls and bitmaps,
/// as KVM's two tables decide (kvm-nested-work.md section 6): first what L0 keeps
/// (nested_vmx_l0_wants_exit), then what L1 asked for (nested_vmx_l1_wants_exit).
/// Pure: reads vmcs12, L2's registers (CR moves, VMREAD/VMWRITE fields) and L1's bitmaps.
public enum NestedExitRules {
    public static func reflects(_ exit: L2Exit, vmcs12 v: VMCSImage, registers l2: RegisterFile, l1Memory: L1MemoryAccess) -> Bool {
        !l0Keeps(exit) && l1Wants(exit, vmcs12: v, registers: l2, l1Memory: l1Memory)
    }

    /// nested_vmx_l0_wants_exit, for this L0 (no async #PF, no host debugging, no Hyper-V L2
    /// TLB-flush hypercall): NMIs, external interrupts, EPT faults (checked against EPT12 first),
    /// the preemption timer, PML full, VMFUNC, bus lock, machine checks during entry.
    public static func l0Keeps(_ exit: L2Exit) -> Bool {
        switch exit.info.reason.basic {
        case .externalInterrupt, .mceDuringVMEntry, .eptViolation, .eptMisconfig, .preemptionTimer, .pmlFull, .vmfunc, .busLock:
            return true
        case .exceptionNMI:
            return (exit.info.interruptionInfo >> 8) & 7 == 2     // an NMI is the host's
        case .ioInstruction:
            // The harness's ucall port is L0's on every path (selftests' UCALL_PIO_PORT): the
            // measurement's own channel, not part of what is measured.
            if case .io(let io) = exit.kind { return io.port == Ucall.port }
            return false
        default:
            return false
        }
    }

    /// nested_vmx_l1_wants_exit.
    public static func l1Wants(_ exit: L2Exit, vmcs12 v: VMCSImage, registers l2: RegisterFile, l1Memory: L1MemoryAccess) -> Bool {
        let cpu = v[.cpuBasedVMExecControl]
        let secondary = cpu & CPUBased.activateSecondaryControls != 0 ? v[.secondaryVMExecControl] : 0
        let info = exit.info
        switch info.reason.basic {
        case .tripleFault, .interruptWindow, .nmiWindow, .taskSwitch, .cpuid, .invd,
             .vmcall, .vmclear, .vmlaunch, .vmptrld, .vmptrst, .vmresume, .vmxoff, .vmxon, .invept, .invvpid,
             .apicAccess, .apicWrite, .eoiInduced, .xsetbv, .xsaves, .xrstors, .invalidState, .mceDuringVMEntry:
            return true
        case .externalInterrupt: return v[.pinBasedVMExecControl] & PinBased.externalInterruptExiting != 0
        case .hlt: return cpu & CPUBased.hltExiting != 0
        case .invlpg: return cpu & CPUBased.invlpgExiting != 0
        case .rdpmc: return cpu & CPUBased.rdpmcExiting != 0
        case .rdtsc, .rdtscp: return cpu & CPUBased.rdtscExiting != 0
        case .mwait: return cpu & CPUBased.mwaitExiting != 0
        case .monitor: return cpu & CPUBased.monitorExiting != 0
        case .drAccess: return cpu & CPUBased.movDRExiting != 0
        case .wbinvd: return secondary & SecondaryExec.wbinvdExiting != 0
        case .rdrand: return secondary & SecondaryExec.rdrandExiting != 0
        case .rdseed: return secondary & SecondaryExec.rdseedExiting != 0
        case .gdtrIdtr, .ldtrTr: return secondary & SecondaryExec.descriptorTableExiting != 0
        case .monitorTrapFlag: return cpu & CPUBased.monitorTrapFlag != 0
        case .pause: return cpu & CPUBased.pauseExiting != 0 || secondary & SecondaryExec.pauseLoopExiting != 0
        case .tprBelowThreshold: return cpu & CPUBased.tprShadow != 0
        case .invpcid: return secondary & SecondaryExec.enableINVPCID != 0 && cpu & CPUBased.invlpgExiting != 0
        case .umwait, .tpause: return secondary & SecondaryExec.enableUserWaitPause != 0
        case .encls: return false                  // SGX is not exposed to L1: L0 raises #UD
        case .notify: return false                 // never L1's
        case .vmread, .vmwrite: return vmcsAccessReflects(exit, write: info.reason.basic == .vmwrite, secondary, v, l2, l1Memory)
        case .crAccess: return crAccessReflects(info.qualification, v, l2)
        case .ioInstruction:
            guard case .io(let io) = exit.kind else { return true }
            return ioReflects(io, cpu, v, l1Memory)
        case .msrRead, .msrWrite:
            switch exit.kind {
            case .msrRead(let msr): return msrReflects(msr, write: false, cpu, v, l1Memory)
            case .msrWrite(let msr, _): return msrReflects(msr, write: true, cpu, v, l1Memory)
            default: return true
            }
        case .exceptionNMI:
            let vector = info.interruptionInfo & 0xFF
            let bitmapSays = v[.exceptionBitmap] & (1 << vector) != 0
            guard vector == 14 else { return bitmapSays }
            // #PF (SDM 25.2): bit 14 decides when PFEC & MASK == MATCH, its inverse otherwise.
            // (KVM reflects every #PF that reaches it: the hardware applied this rule through
            // vmcs02, which this L2's CPU does not model, so L0 applies it here.)
            let matches = info.interruptionErrorCode & v[.pageFaultErrorCodeMask] == v[.pageFaultErrorCodeMatch]
            return matches ? bitmapSays : !bitmapSays
        default:
            return true
        }
    }

    /// VMREAD/VMWRITE by L2 (nested_vmx_exit_handled_vmcs_access): L1 gets it unless vmcs12
    /// uses VMCS shadowing and L1's VMREAD/VMWRITE bitmap lets the field through.
    static func vmcsAccessReflects(_ exit: L2Exit, write: Bool, _ secondary: UInt64, _ v: VMCSImage,
                                   _ l2: RegisterFile, _ mem: L1MemoryAccess) -> Bool {
        guard secondary & SecondaryExec.shadowVMCS != 0,
              let fieldRegister = VMXInstructionInfo.fieldRegister(exit.info.instructionInfo) else { return true }
        let field = l2[fieldRegister]
        guard field < 0x8000, let byteAddr = L1GPA(v[write ? .vmwriteBitmap : .vmreadBitmap]).adding(field / 8),
              let byte: UInt8 = try? mem.load(byteAddr) else { return true }
        return byte & (1 << UInt8(field % 8)) != 0
    }

    /// I/O: unconditional I/O exiting, or a set bit in I/O bitmap A (< 0x8000) / B for any byte.
    static func ioReflects(_ io: PortIO, _ cpu: UInt64, _ v: VMCSImage, _ mem: L1MemoryAccess) -> Bool {
        guard cpu & CPUBased.useIOBitmaps != 0 else { return cpu & CPUBased.unconditionalIOExiting != 0 }
        let port = UInt64(io.port)
        for p in port..<(port + io.size) {
            if p > 0xFFFF { return true }
            let bitmap = L1GPA(v[p < 0x8000 ? .ioBitmapA : .ioBitmapB])
            guard let byteAddr = bitmap.adding((p & 0x7FFF) / 8),
                  let byte: UInt8 = try? mem.load(byteAddr) else { return true }
            if byte & (1 << UInt8(p % 8)) != 0 { return true }
        }
        return false
    }

    /// MSRs: no MSR bitmap -> always; else L1's bitmap bit (read-low 0x000, read-high 0x400,
    /// write-low 0x800, write-high 0xC00); MSRs outside both ranges always reflect.
    static func msrReflects(_ msr: UInt32, write: Bool, _ cpu: UInt64, _ v: VMCSImage, _ mem: L1MemoryAccess) -> Bool {
        guard cpu & CPUBased.useMSRBitmaps != 0, let (offset, bit) = MSRBitmap.position(of: msr, write: write) else { return true }
        guard let addr = L1GPA(v[.msrBitmap]).adding(offset),
              let byte: UInt8 = try? mem.load(addr) else { return true }
        return byte & (1 << bit) != 0
    }

    /// CR access (SDM Table 28-3): MOV to CR0/CR4 reflects when a bit L1 owns (guest/host mask)
    /// would differ from its read shadow; CR3/CR8 by their load/store exiting controls.
    /// (KVM's nested_vmx_exit_handled_cr.)
    static func crAccessReflects(_ q: UInt64, _ v: VMCSImage, _ l2: RegisterFile) -> Bool {
        let cr = q & 0xF, type = (q >> 4) & 3
        let reg = Register(sdmNumber: (q >> 8) & 0xF) ?? .rax
        let cpu = v[.cpuBasedVMExecControl]
        switch (cr, type) {
        case (0, 0):
            return (l2[reg] ^ v[.cr0ReadShadow]) & v[.cr0GuestHostMask] != 0
        case (4, 0):
            return (l2[reg] ^ v[.cr4ReadShadow]) & v[.cr4GuestHostMask] != 0
        case (3, 0): return cpu & CPUBased.cr3LoadExiting != 0
        case (3, 1): return cpu & CPUBased.cr3StoreExiting != 0
        case (8, 0): return cpu & CPUBased.cr8LoadExiting != 0
        case (8, 1): return cpu & CPUBased.cr8StoreExiting != 0
        case (0, 2):   // CLTS: reflects if L1 owns CR0.TS and its shadow has TS set
            return v[.cr0GuestHostMask] & 8 != 0 && v[.cr0ReadShadow] & 8 != 0
        case (0, 3):   // LMSW: bits 3:1 by the mask; PE only when LMSW would set it
            let src = (q >> 16) & 0xF
            if v[.cr0GuestHostMask] & 0xE & (src ^ v[.cr0ReadShadow]) != 0 { return true }
            return v[.cr0GuestHostMask] & 1 != 0 && v[.cr0ReadShadow] & 1 == 0 && src & 1 != 0
        default: return false      // MOV from CR0/CR4 never exits; other CRs are not L1's
        }
    }
}
