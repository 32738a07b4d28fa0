// vmcs12: the VMCS L1 believes it has, kept in L1 memory as KVM keeps `struct vmcs12`.
// The layout is this project's (as KVM's is KVM's: hardware VMCS layout is opaque to software);
// what is architectural is the revision id in the first 4 bytes and access by field encoding.

public enum VMCS12Layout {
    /// KVM's VMCS12_REVISION.
    public static let revisionID: UInt32 = 0x11e5_7ed0
    public static let size: UInt64 = 4096
    public static let revisionOffset: UInt64 = 0      // u32, architectural
    public static let abortOffset: UInt64 = 4         // u32, VMX-abort indicator, architectural
    public static let launchStateOffset: UInt64 = 8   // u32: 0 clear, 1 launched (KVM: vmcs12->launch_state)
    public static let firstFieldOffset: UInt64 = 64
    /// Every field takes 8 bytes, in `VMCSField.supported` order.
    public static let fieldStride: UInt64 = 8

    /// Slot index + 1 for every encoding below 0x8000 (0: unsupported). A flat table, because
    /// L0 looks fields up on every nested exit and entry.
    private static let slotTable: [UInt16] = {
        var t = [UInt16](repeating: 0, count: 0x8000)
        for (i, (f, _)) in VMCSField.supported.enumerated() { t[Int(f.rawValue)] = UInt16(i + 1) }
        return t
    }()

    /// Byte offset of a field's 8-byte slot in vmcs12, and whether the access is the high half
    /// of a 64-bit field. nil: the field is not supported (VMfailValid 12).
    @inline(__always)
    public static func slot(of field: VMCSField) -> (offset: UInt64, high: Bool)? {
        guard field.rawValue < 0x8000 else { return nil }
        let direct = slotTable[Int(field.rawValue)]
        if direct != 0 { return (firstFieldOffset + UInt64(direct - 1) * fieldStride, false) }
        if field.isHighAccess, field.width == .bits64 {
            let low = slotTable[Int(field.rawValue & ~1)]
            if low != 0 { return (firstFieldOffset + UInt64(low - 1) * fieldStride, true) }
        }
        return nil
    }
}

/// VM-instruction error numbers (SDM Vol. 3 30.4). Like the field encodings these are absent
/// from the uAPI header; names follow the kernel's VMXERR_*.
public enum VMInstructionError: UInt32, Sendable, CustomStringConvertible {
    case vmcallInVMXRoot = 1
    case vmclearInvalidAddress = 2
    case vmclearVMXONPointer = 3
    case vmlaunchNonClearVMCS = 4
    case vmresumeNonLaunchedVMCS = 5
    case vmresumeAfterVMXOFF = 6
    case entryInvalidControlField = 7
    case entryInvalidHostStateField = 8
    case vmptrldInvalidAddress = 9
    case vmptrldVMXONPointer = 10
    case vmptrldIncorrectRevision = 11
    case unsupportedVMCSComponent = 12
    case vmwriteReadOnlyComponent = 13
    case vmxonInVMXRoot = 15
    case entryEventsBlockedByMovSS = 26
    case invalidOperandToINVEPTOrINVVPID = 28

    public var description: String { "VMXERR \(rawValue) (\(self.name))" }
    public var name: String {
        switch self {
        case .vmcallInVMXRoot: "VMCALL executed in VMX root operation"
        case .vmclearInvalidAddress: "VMCLEAR with invalid physical address"
        case .vmclearVMXONPointer: "VMCLEAR with VMXON pointer"
        case .vmlaunchNonClearVMCS: "VMLAUNCH with non-clear VMCS"
        case .vmresumeNonLaunchedVMCS: "VMRESUME with non-launched VMCS"
        case .vmresumeAfterVMXOFF: "VMRESUME after VMXOFF"
        case .entryInvalidControlField: "VM entry with invalid control field(s)"
        case .entryInvalidHostStateField: "VM entry with invalid host-state field(s)"
        case .vmptrldInvalidAddress: "VMPTRLD with invalid physical address"
        case .vmptrldVMXONPointer: "VMPTRLD with VMXON pointer"
        case .vmptrldIncorrectRevision: "VMPTRLD with incorrect VMCS revision identifier"
        case .unsupportedVMCSComponent: "VMREAD/VMWRITE from/to unsupported VMCS component"
        case .vmwriteReadOnlyComponent: "VMWRITE to read-only VMCS component"
        case .vmxonInVMXRoot: "VMXON executed in VMX root operation"
        case .entryEventsBlockedByMovSS: "VM entry with events blocked by MOV SS"
        case .invalidOperandToINVEPTOrINVVPID: "Invalid operand to INVEPT/INVVPID"
        }
    }
}

/// Outcome of a VMX instruction as the SDM defines it (30.2): VMsucceed, VMfailInvalid (no
/// current VMCS: CF=1), VMfailValid (ZF=1 and VM_INSTRUCTION_ERROR set).
public enum VMXInstructionResult: Equatable, Sendable {
    case succeed
    case failInvalid
    case failValid(VMInstructionError)
}

/// VMCS shadowing as KVM configures it (vmcs_shadow_fields.h): the fields whose VMREAD / VMWRITE
/// do not exit. Everything else exits.
public enum ShadowedFields {
    public static let readOnly: [VMCSField] = [
        .vmExitReason, .vmExitIntrInfo, .vmExitIntrErrorCode, .idtVectoringInfoField,
        .idtVectoringErrorCode, .vmExitInstructionLen, .guestCSARBytes, .guestSSARBytes,
        .exitQualification, .guestLinearAddress, .guestPhysicalAddress, .guestPhysicalAddressHigh,
    ]
    public static let readWrite: [VMCSField] = [
        .pinBasedVMExecControl, .cpuBasedVMExecControl, .exceptionBitmap, .vmEntryIntrInfoField,
        .vmEntryExceptionErrorCode, .vmEntryInstructionLen, .tprThreshold, .guestInterruptibilityInfo,
        .vmxPreemptionTimerValue, .cr0GuestHostMask, .cr0ReadShadow, .cr4ReadShadow, .guestCR0,
        .guestCR3, .guestCR4, .guestRSP, .guestRIP, .guestRFLAGS, .hostFSBase, .hostGSBase,
        .hostFSSelector, .hostGSSelector,
        // GUEST_INTR_STATUS and GUEST_PML_INDEX are shadowed only when L0 has APICv and PML
        // (init_vmcs_shadow_fields drops them otherwise); this L0 has neither.
    ]
}
