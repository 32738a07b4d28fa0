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

    /// HV_VMX_ENLIGHTENED_CLEAN_FIELD_* (TLFS), bit numbers.
    public enum Group: Int, CaseIterable, Sendable {
        case ioBitmap = 0, msrBitmap, controlGrp2, controlGrp1, controlProc, controlEvent, controlEntry,
             controlExcpn, crdr, controlXlat, guestBasic, guestGrp1, guestGrp2, hostPointer, hostGrp1,
             enlightenmentsControl
        public var bit: UInt32 { 1 << UInt32(rawValue) }
    }
    public static let allClean: UInt32 = 0xFFFF

    /// The clean-field group of a field; nil: HV_VMX_ENLIGHTENED_CLEAN_FIELD_NONE, copied on
    /// every entry (RIP, RSP, RFLAGS and the exit information L0 itself writes).
    public static func group(of f: VMCSField) -> Group? {
        switch f {
        case .ioBitmapA, .ioBitmapB: return .ioBitmap
        case .msrBitmap: return .msrBitmap
        case .pinBasedVMExecControl, .vmExitControls, .secondaryVMExecControl: return .controlGrp1
        case .cpuBasedVMExecControl: return .controlProc
        case .vmEntryIntrInfoField, .vmEntryExceptionErrorCode, .vmEntryInstructionLen: return .controlEvent
        case .vmEntryControls: return .controlEntry
        case .exceptionBitmap, .pageFaultErrorCodeMask, .pageFaultErrorCodeMatch: return .controlExcpn
        case .cr0GuestHostMask, .cr4GuestHostMask, .cr0ReadShadow, .cr4ReadShadow, .guestCR0, .guestCR3, .guestCR4, .guestDR7:
            return .crdr
        case .virtualProcessorID, .eptPointer: return .controlXlat
        case .guestInterruptibilityInfo, .guestActivityState: return .guestGrp2
        case .guestSysenterCS, .guestSysenterESP, .guestSysenterEIP, .guestIA32PAT, .guestIA32EFER, .guestIA32Debugctl,
             .guestPendingDbgExceptions, .vmcsLinkPointer:
            return .guestGrp1
        case .hostRIP, .hostRSP: return .hostPointer
        case .guestRIP, .guestRSP, .guestRFLAGS: return nil
        default:
            switch f.kind {
            case .exitInformation: return nil
            case .hostState: return .hostGrp1
            case .guestState: return .guestBasic
            case .control: return .controlGrp2
            }
        }
    }
}

/// Hyper-V's VP assist page (struct hv_vp_assist_page), the part nested virtualization uses.
/// L1 enables it by writing its GPA | 1 to HV_X64_MSR_VP_ASSIST_PAGE.
public enum VPAssistPage {
    public static let msr: UInt32 = 0x4000_0073
    public static let enable: UInt64 = 1
    /// u8: nonzero = VMLAUNCH/VMRESUME use the eVMCS named by `currentNestedVMCS`.
    public static let enlightenVMEntry: UInt64 = 40
    /// u64: L1 GPA of the current eVMCS.
    public static let currentNestedVMCS: UInt64 = 48
}
