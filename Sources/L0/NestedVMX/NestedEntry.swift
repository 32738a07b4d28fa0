import ABI
import Transport

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
        if variant == .enlightened, !loadEnlightenedVMCS(vcpu) { return .failed(.failInvalid) }
        guard let vmcs12 else { return .failed(.failInvalid) }
        // L1's shadowed VMWRITEs since the last exit live in the shadow VMCS: fold them in.
        if shadowing { copyShadowToVMCS12(vcpu) }

        if launch && vmcs12.launched { return .failed(.failValid(.vmlaunchNonClearVMCS)) }
        if !launch && !vmcs12.launched { return .failed(.failValid(.vmresumeNonLaunchedVMCS)) }
        vcpu.counters.consistencyChecks += 3          // controls, host state, guest state (SDM 26.2-26.3)
        if let e = checkControls(vmcs12, vcpu) { return .failed(.failValid(e)) }
        if let e = checkHostState(vmcs12, vcpu) { return .failed(.failValid(e)) }
        if !guestStateIsValid(vmcs12, vcpu) {
            // SDM 26.8: the entry fails after the instruction "succeeded"; L1 sees a VM exit.
            // The VMCS stays clear (launch state changes only on a successful entry).
            entryFailureExit(reason: ExitReason(rawValue: ExitReason.invalidState.rawValue | ExitReason.failedVMEntryFlag), &l1, vcpu)
            return .entryFailureExit
        }

        prepareVMCS02(vmcs12, l1: l1, vcpu)
        if launch { vmcs12.launched = true }
        guestMode = true
        vcpu.counters.vmcsSwitches += 1          // vmcs01 -> vmcs02
        if launch { launched() }
        return .entered
    }

    /// A VM entry that failed its guest-state checks (SDM 26.8, KVM's nested_vmx_entry_failure):
    /// only VM_EXIT_REASON and EXIT_QUALIFICATION change, L2 never ran so its state is not
    /// synced, L1's GPRs stay as they were, and L1 continues at HOST_RIP.
    func entryFailureExit(reason: ExitReason, qualification: UInt64 = 0, _ l1: inout RegisterFile, _ vcpu: L0VCPU) {
        guard let v = vmcs12 else { return }
        v[.vmExitReason] = UInt64(reason.rawValue)
        v[.exitQualification] = qualification
        vcpu.counters.vmcs12FieldWrites += 2
        if shadowing { copyVMCS12ToShadow(vcpu) }
        if variant == .enlightened { writeBackEnlightenedVMCS(vcpu) }
        loadHostState(v, &l1, vcpu)
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
            // prepare_vmcs02_rare: the fields that rarely change, re-read after an exiting VMWRITE,
            // and the MSR bitmap merge.
            vcpu.counters.vmcs12FieldReads += 24
            vmcs02 = VMCS02Controls.merge(l1: v)
            mergeL2MSRBitmap(v, vcpu)
            vmcs12Dirty = false
        }
        let eptp = v[.eptPointer]
        if shadowedEPTP != eptp {
            dropEPT02Shadows(vcpu)
            shadowedEPTP = eptp
        }
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
