// Enlightened VMCS (Hyper-V TLFS "Nested virtualization", supported by KVM as L0): the VMCS is a
// plain structure in L1 memory that L1 reads and writes directly; "clean field" bits tell L0
// which groups of fields it must copy at the next VM entry.

public enum EnlightenedVMCS {
    /// KVM_EVMCS_VERSION.
    public static let revision: UInt32 = 1
    public static let size: UInt64 = 4096
    /// u32 hv_clean_fields: a set bit means "this group did not change since L0 last read it".
    /// Fields sit in the same 8-byte slots as vmcs12 (`VMCS12Layout`); this word is in the header.
    public static let cleanFieldsOffset: UInt64 = 16
    /// u32 hv_enlightenments_control (header): bit 0 `nested_flush_hypercall`: with the VP
    /// assist page's direct hypercalls on, L0 answers L2's TLB-flush hypercall itself instead of
    /// reflecting it (KVM's "L2 TLB flush", kvm_hv_l2_tlb_flush_exposed).
    public static let enlightenmentsControlOffset: UInt64 = 20
    public static let nestedFlushHypercall: UInt32 = 1 << 0

    /// HV_VMX_ENLIGHTENED_CLEAN_FIELD_* (TLFS), bit numbers.
    public enum Group: Int, CaseIterable, Sendable {
        case ioBitmap = 0, msrBitmap, controlGrp2, controlGrp1, controlProc, controlEvent, controlEntry,
             controlExcpn, crdr, controlXlat, guestBasic, guestGrp1, guestGrp2, hostPointer, hostGrp1,
             enlightenmentsControl
        public var bit: UInt32 { 1 << UInt32(rawValue) }
    }
    public static let allClean: UInt32 = 0xFFFF

    /// The clean-field group a field is copied with at VM entry, as KVM's
    /// copy_enlightened_to_vmcs12 groups them (kvm-nested-work.md section 5); nil for a field
    /// that is copied on every entry (`copiedOnEveryEntry`) or never (`neverCopiedIn`).
    public static func group(of f: VMCSField) -> Group? {
        switch f {
        case .ioBitmapA, .ioBitmapB: return .ioBitmap
        case .msrBitmap: return .msrBitmap
        case .tscOffset, .virtualAPICPageAddr: return .controlGrp2
        case .pinBasedVMExecControl, .vmExitControls, .secondaryVMExecControl: return .controlGrp1
        case .cpuBasedVMExecControl: return .controlProc
        case .vmEntryIntrInfoField, .vmEntryExceptionErrorCode, .vmEntryInstructionLen: return .controlEvent
        case .vmEntryControls: return .controlEntry
        case .exceptionBitmap: return .controlExcpn
        case .cr0GuestHostMask, .cr4GuestHostMask, .cr0ReadShadow, .cr4ReadShadow, .guestCR0, .guestCR3, .guestCR4, .guestDR7:
            return .crdr
        case .virtualProcessorID, .eptPointer: return .controlXlat
        case .guestRSP, .guestRFLAGS, .guestInterruptibilityInfo: return .guestBasic
        case .vmcsLinkPointer, .guestIA32Debugctl, .guestIA32PAT, .guestIA32EFER, .guestPendingDbgExceptions,
             .guestSysenterCS, .guestSysenterESP, .guestSysenterEIP, .guestActivityState:
            return .guestGrp1
        case .hostFSBase, .hostGSBase, .hostTRBase, .hostGDTRBase, .hostIDTRBase, .hostRSP: return .hostPointer
        case .tprThreshold, .guestRIP: return nil
        default:
            switch f.kind {
            case .guestState: return .guestGrp2          // segment selectors, bases, limits, AR bytes
            case .hostState: return .hostGrp1
            case .control, .exitInformation: return nil
            }
        }
    }

    /// Fields struct hv_enlightened_vmcs has no slot for: VMREAD/VMWRITE of them fails (KVM's
    /// evmcs_field_offset finds none). VMX_PREEMPTION_TIMER_VALUE is why KVM hides the
    /// preemption timer from an eVMCS L1 (EVMCS1_UNSUPPORTED_PINCTRL).
    public static func lacks(_ f: VMCSField) -> Bool { f == .vmxPreemptionTimerValue }

    /// Copied on every entry whatever the clean bits say: TPR_THRESHOLD and GUEST_RIP.
    public static func copiedOnEveryEntry(_ f: VMCSField) -> Bool { f == .tprThreshold || f == .guestRIP }

    /// What copy_vmcs12_to_enlightened writes back at a nested exit: guest segment state, PAT,
    /// EFER, pending debug exceptions, SYSENTER, activity, CR0/3/4, DR7, RSP, RIP, RFLAGS,
    /// interruptibility, the guest physical/linear address and every exit-information field,
    /// the processor-based and entry controls and the entry-event fields. No host state and no
    /// other control.
    public static func writtenBackAtExit(_ f: VMCSField) -> Bool {
        switch f {
        case .cpuBasedVMExecControl, .vmEntryControls, .vmEntryIntrInfoField, .vmEntryExceptionErrorCode, .vmEntryInstructionLen:
            return true
        case .vmcsLinkPointer, .guestIA32Debugctl, .guestIntrStatus, .guestPMLIndex, .vmxPreemptionTimerValue:
            return false
        default:
            return f.kind == .guestState || f.kind == .exitInformation
        }
    }
}

/// Hyper-V's VP assist page (struct hv_vp_assist_page), the part nested virtualization uses.
/// L1 enables it by writing its GPA | 1 to HV_X64_MSR_VP_ASSIST_PAGE.
public enum VPAssistPage {
    public static let msr: UInt32 = 0x4000_0073
    public static let enable: UInt64 = 1
    /// u32 nested_control.features: bit 0 `directhypercall` (L2's hypercalls may go to L0).
    public static let nestedControlFeatures: UInt64 = 32
    public static let directHypercall: UInt32 = 1 << 0
    /// u8: nonzero = VMLAUNCH/VMRESUME use the eVMCS named by `currentNestedVMCS`.
    public static let enlightenVMEntry: UInt64 = 40
    /// u64: L1 GPA of the current eVMCS.
    public static let currentNestedVMCS: UInt64 = 48
}
