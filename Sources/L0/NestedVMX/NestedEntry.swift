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

extension L0VCPU {
    /// KVM's nested_vmx_run: checks in SDM order, then prepare_vmcs02 and enter L2.
    func nestedVMEntry(launch: Bool) -> NestedEntryResult {
        if path.enlightenedVMCS, !loadEnlightenedVMCS() { return .failed(.failInvalid) }
        guard let vmcs12 = nested.vmcs12 else { return .failed(.failInvalid) }
        // L1's shadowed VMWRITEs since the last exit live in the shadow VMCS: fold them in.
        if nested.shadowing { copyShadowToVMCS12() }

        if launch && vmcs12.launched { return .failed(.failValid(.vmlaunchNonClearVMCS)) }
        if !launch && !vmcs12.launched { return .failed(.failValid(.vmresumeNonLaunchedVMCS)) }
        counters.consistencyChecks += 3          // controls, host state, guest state (SDM 26.2-26.3)
        if let e = checkControls(vmcs12) { return .failed(.failValid(e)) }
        if let e = checkHostState(vmcs12) { return .failed(.failValid(e)) }
        if !guestStateIsValid(vmcs12) {
            // SDM 26.8: the entry fails after the instruction "succeeded"; L1 sees a VM exit.
            // The VMCS stays clear (launch state changes only on a successful entry).
            nestedEntryFailureExit(reason: ExitReason(rawValue: ExitReason.invalidState.rawValue | ExitReason.failedVMEntryFlag))
            return .entryFailureExit
        }

        prepareVMCS02(vmcs12)
        if launch { vmcs12.launched = true }
        nested.guestMode = true
        counters.vmcsSwitches += 1          // vmcs01 -> vmcs02
        if launch { l2Requested = true }
        return .entered
    }

    /// SDM 26.2.1 as far as this L0's VMX capabilities go. This L0 runs L2 only with EPT
    /// (IA32_VMX_PROCBASED_CTLS2 reports "enable EPT" as must-be-1).
    func checkControls(_ v: VMCSImage) -> VMInstructionError? {
        let cpu = v[.cpuBasedVMExecControl]
        let secondary = cpu & CPUBased.activateSecondaryControls != 0 ? v[.secondaryVMExecControl] : 0
        counters.vmcs12FieldReads += 2
        guard secondary & SecondaryExec.enableEPT != 0 else { return .entryInvalidControlField }
        counters.vmcs12FieldReads += 1
        guard eptpIsValid(v[.eptPointer]) else { return .entryInvalidControlField }
        func bitmapValid(_ f: VMCSField) -> Bool {
            let a = L1GPA(v[f])
            counters.vmcs12FieldReads += 1
            return a.isPageAligned && (try? l1Memory.memslots.translate(a, length: pageSize)) != nil
        }
        if cpu & CPUBased.useIOBitmaps != 0, !bitmapValid(.ioBitmapA) || !bitmapValid(.ioBitmapB) {
            return .entryInvalidControlField
        }
        if cpu & CPUBased.useMSRBitmaps != 0, !bitmapValid(.msrBitmap) { return .entryInvalidControlField }
        return nil
    }

    /// SDM 26.2.1.1's EPTP rules: memory type UC or WB, 4-level walk, reserved bits 11:7 clear,
    /// and (this L0's rule) a root inside L1's memory.
    func eptpIsValid(_ eptp: UInt64) -> Bool {
        let memType = eptp & 7
        return (memType == EPT.memoryTypeUC || memType == EPT.memoryTypeWB)
            && eptp & (7 << 3) == EPT.eptpWalkLength4
            && eptp & 0xF80 == 0
            && (try? l1Memory.memslots.translate(L1GPA(eptp & EPT.addressMask), length: pageSize)) != nil
    }

    /// SDM 26.2.2, the checks a 64-bit host needs.
    func checkHostState(_ v: VMCSImage) -> VMInstructionError? {
        let cr0 = v[.hostCR0], cr4 = v[.hostCR4], exitCtl = v[.vmExitControls], rip = v[.hostRIP]
        counters.vmcs12FieldReads += 4
        let pe: UInt64 = 1, pg: UInt64 = 1 << 31, pae: UInt64 = 1 << 5
        guard cr0 & pe != 0, cr0 & pg != 0, cr4 & pae != 0,
              exitCtl & VMExitControl.hostAddressSpaceSize != 0,
              isCanonical(rip) else { return .entryInvalidHostStateField }
        return nil
    }

    /// SDM 26.3.1, the checks that matter for a 64-bit L2.
    func guestStateIsValid(_ v: VMCSImage) -> Bool {
        let rflags = v[.guestRFLAGS], cr0 = v[.guestCR0], cr4 = v[.guestCR4], entry = v[.vmEntryControls]
        counters.vmcs12FieldReads += 4
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
    func prepareVMCS02(_ v: VMCSImage) {
        if nested.vmcs12Dirty {
            // prepare_vmcs02_rare: the fields that rarely change, re-read after an exiting VMWRITE,
            // and the MSR bitmap merge.
            counters.vmcs12FieldReads += 24
            nested.vmcs02 = VMCS02Controls.merge(l1: v)
            mergeL2MSRBitmap(v)
            nested.vmcs12Dirty = false
        }
        let eptp = v[.eptPointer]
        if nested.shadowedEPTP != eptp {
            dropEPT02Shadows()
            nested.shadowedEPTP = eptp
        }
        for r in Register.gprsOutsideVMCS {
            l2Run[register: r] = l1Run[register: r]
        }
        l2Run[register: .rip] = v[.guestRIP]
        l2Run[register: .rsp] = v[.guestRSP]
        l2Run[register: .rflags] = v[.guestRFLAGS]
        let intr = v[.vmEntryIntrInfoField]
        counters.vmcs12FieldReads += 5
        if intr & (1 << 31) != 0 {
            l2Run[RunPage.eventInjection] = intr
            l2Run[RunPage.eventErrorCode] = v[.vmEntryExceptionErrorCode]
            counters.vmcs12FieldReads += 1
        }
    }
}
