// VMCS field encodings. linux-libc-dev's <asm/vmx.h> carries exit reasons but not the field
// encodings (those live in the kernel-internal arch/x86/include/asm/vmx.h, `enum vmcs_field`), so
// they are written here once, from Intel SDM Vol. 3 Appendix B, with the kernel's names.

/// A VMCS component encoding (SDM 24.11.2). Width and type are decoded from the encoding itself.
public struct VMCSField: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    init(_ v: UInt32) { self.rawValue = v }

    public enum Width: UInt32, Sendable { case bits16 = 0, bits64 = 1, bits32 = 2, natural = 3 }
    public enum Kind: UInt32, Sendable { case control = 0, exitInformation = 1, guestState = 2, hostState = 3 }

    /// Bits 14:13.
    public var width: Width { Width(rawValue: (rawValue >> 13) & 3)! }
    /// Bits 11:10. "Exit information" is the read-only data area.
    public var kind: Kind { Kind(rawValue: (rawValue >> 10) & 3)! }
    /// Bit 0: the high 32 bits of a 64-bit field.
    public var isHighAccess: Bool { rawValue & 1 == 1 }
    /// Bits 31:15 must be zero, and bit 12 too (SDM 24.11.2).
    public var isWellFormed: Bool { rawValue & 0xFFFF_9000 == 0 }
    /// Read-only fields: writes get VMfailValid(VMWRITE to read-only component) unless the
    /// CPU supports VMWRITE to exit-information fields (IA32_VMX_MISC bit 29), which this one does not.
    public var isReadOnly: Bool { kind == .exitInformation }

    /// Mask of value bits the field holds (a 64-bit field's high access holds 32).
    public var valueMask: UInt64 {
        if isHighAccess { return 0xFFFF_FFFF }
        switch width {
        case .bits16: return 0xFFFF
        case .bits32: return 0xFFFF_FFFF
        case .bits64, .natural: return ~0
        }
    }

    public var name: String { VMCSField.names[self] ?? "FIELD_0x\(String(rawValue, radix: 16))" }
    public var description: String { name }

    // 16-bit control, guest, host
    public static let virtualProcessorID = VMCSField(0x0000)
    public static let guestESSelector = VMCSField(0x0800)
    public static let guestCSSelector = VMCSField(0x0802)
    public static let guestSSSelector = VMCSField(0x0804)
    public static let guestDSSelector = VMCSField(0x0806)
    public static let guestFSSelector = VMCSField(0x0808)
    public static let guestGSSelector = VMCSField(0x080A)
    public static let guestLDTRSelector = VMCSField(0x080C)
    public static let guestTRSelector = VMCSField(0x080E)
    public static let guestIntrStatus = VMCSField(0x0810)
    public static let guestPMLIndex = VMCSField(0x0812)
    public static let hostESSelector = VMCSField(0x0C00)
    public static let hostCSSelector = VMCSField(0x0C02)
    public static let hostSSSelector = VMCSField(0x0C04)
    public static let hostDSSelector = VMCSField(0x0C06)
    public static let hostFSSelector = VMCSField(0x0C08)
    public static let hostGSSelector = VMCSField(0x0C0A)
    public static let hostTRSelector = VMCSField(0x0C0C)
    // 64-bit control
    public static let ioBitmapA = VMCSField(0x2000)
    public static let ioBitmapB = VMCSField(0x2002)
    public static let msrBitmap = VMCSField(0x2004)
    public static let vmExitMsrStoreAddr = VMCSField(0x2006)
    public static let vmExitMsrLoadAddr = VMCSField(0x2008)
    public static let vmEntryMsrLoadAddr = VMCSField(0x200A)
    public static let tscOffset = VMCSField(0x2010)
    public static let virtualAPICPageAddr = VMCSField(0x2012)
    public static let apicAccessAddr = VMCSField(0x2014)
    public static let eptPointer = VMCSField(0x201A)
    public static let vmreadBitmap = VMCSField(0x2026)
    public static let vmwriteBitmap = VMCSField(0x2028)
    // 64-bit read-only
    public static let guestPhysicalAddress = VMCSField(0x2400)
    public static let guestPhysicalAddressHigh = VMCSField(0x2401)
    // 64-bit guest
    public static let vmcsLinkPointer = VMCSField(0x2800)
    public static let guestIA32Debugctl = VMCSField(0x2802)
    public static let guestIA32PAT = VMCSField(0x2804)
    public static let guestIA32EFER = VMCSField(0x2806)
    // 64-bit host
    public static let hostIA32PAT = VMCSField(0x2C00)
    public static let hostIA32EFER = VMCSField(0x2C02)
    // 32-bit control
    public static let pinBasedVMExecControl = VMCSField(0x4000)
    public static let cpuBasedVMExecControl = VMCSField(0x4002)
    public static let exceptionBitmap = VMCSField(0x4004)
    public static let pageFaultErrorCodeMask = VMCSField(0x4006)
    public static let pageFaultErrorCodeMatch = VMCSField(0x4008)
    public static let cr3TargetCount = VMCSField(0x400A)
    public static let vmExitControls = VMCSField(0x400C)
    public static let vmExitMsrStoreCount = VMCSField(0x400E)
    public static let vmExitMsrLoadCount = VMCSField(0x4010)
    public static let vmEntryControls = VMCSField(0x4012)
    public static let vmEntryMsrLoadCount = VMCSField(0x4014)
    public static let vmEntryIntrInfoField = VMCSField(0x4016)
    public static let vmEntryExceptionErrorCode = VMCSField(0x4018)
    public static let vmEntryInstructionLen = VMCSField(0x401A)
    public static let tprThreshold = VMCSField(0x401C)
    public static let secondaryVMExecControl = VMCSField(0x401E)
    // 32-bit read-only
    public static let vmInstructionError = VMCSField(0x4400)
    public static let vmExitReason = VMCSField(0x4402)
    public static let vmExitIntrInfo = VMCSField(0x4404)
    public static let vmExitIntrErrorCode = VMCSField(0x4406)
    public static let idtVectoringInfoField = VMCSField(0x4408)
    public static let idtVectoringErrorCode = VMCSField(0x440A)
    public static let vmExitInstructionLen = VMCSField(0x440C)
    public static let vmxInstructionInfo = VMCSField(0x440E)
    // 32-bit guest
    public static let guestESLimit = VMCSField(0x4800)
    public static let guestCSLimit = VMCSField(0x4802)
    public static let guestSSLimit = VMCSField(0x4804)
    public static let guestDSLimit = VMCSField(0x4806)
    public static let guestFSLimit = VMCSField(0x4808)
    public static let guestGSLimit = VMCSField(0x480A)
    public static let guestLDTRLimit = VMCSField(0x480C)
    public static let guestTRLimit = VMCSField(0x480E)
    public static let guestGDTRLimit = VMCSField(0x4810)
    public static let guestIDTRLimit = VMCSField(0x4812)
    public static let guestESARBytes = VMCSField(0x4814)
    public static let guestCSARBytes = VMCSField(0x4816)
    public static let guestSSARBytes = VMCSField(0x4818)
    public static let guestDSARBytes = VMCSField(0x481A)
    public static let guestFSARBytes = VMCSField(0x481C)
    public static let guestGSARBytes = VMCSField(0x481E)
    public static let guestLDTRARBytes = VMCSField(0x4820)
    public static let guestTRARBytes = VMCSField(0x4822)
    public static let guestInterruptibilityInfo = VMCSField(0x4824)
    public static let guestActivityState = VMCSField(0x4826)
    public static let guestSysenterCS = VMCSField(0x482A)
    public static let vmxPreemptionTimerValue = VMCSField(0x482E)
    // 32-bit host
    public static let hostIA32SysenterCS = VMCSField(0x4C00)
    // natural-width control
    public static let cr0GuestHostMask = VMCSField(0x6000)
    public static let cr4GuestHostMask = VMCSField(0x6002)
    public static let cr0ReadShadow = VMCSField(0x6004)
    public static let cr4ReadShadow = VMCSField(0x6006)
    // natural-width read-only
    public static let exitQualification = VMCSField(0x6400)
    public static let guestLinearAddress = VMCSField(0x640A)
    // natural-width guest
    public static let guestCR0 = VMCSField(0x6800)
    public static let guestCR3 = VMCSField(0x6802)
    public static let guestCR4 = VMCSField(0x6804)
    public static let guestESBase = VMCSField(0x6806)
    public static let guestCSBase = VMCSField(0x6808)
    public static let guestSSBase = VMCSField(0x680A)
    public static let guestDSBase = VMCSField(0x680C)
    public static let guestFSBase = VMCSField(0x680E)
    public static let guestGSBase = VMCSField(0x6810)
    public static let guestLDTRBase = VMCSField(0x6812)
    public static let guestTRBase = VMCSField(0x6814)
    public static let guestGDTRBase = VMCSField(0x6816)
    public static let guestIDTRBase = VMCSField(0x6818)
    public static let guestDR7 = VMCSField(0x681A)
    public static let guestRSP = VMCSField(0x681C)
    public static let guestRIP = VMCSField(0x681E)
    public static let guestRFLAGS = VMCSField(0x6820)
    public static let guestPendingDbgExceptions = VMCSField(0x6822)
    public static let guestSysenterESP = VMCSField(0x6824)
    public static let guestSysenterEIP = VMCSField(0x6826)
    // natural-width host
    public static let hostCR0 = VMCSField(0x6C00)
    public static let hostCR3 = VMCSField(0x6C02)
    public static let hostCR4 = VMCSField(0x6C04)
    public static let hostFSBase = VMCSField(0x6C06)
    public static let hostGSBase = VMCSField(0x6C08)
    public static let hostTRBase = VMCSField(0x6C0A)
    public static let hostGDTRBase = VMCSField(0x6C0C)
    public static let hostIDTRBase = VMCSField(0x6C0E)
    public static let hostIA32SysenterESP = VMCSField(0x6C10)
    public static let hostIA32SysenterEIP = VMCSField(0x6C12)
    public static let hostRSP = VMCSField(0x6C14)
    public static let hostRIP = VMCSField(0x6C16)

    /// Every field vmcs12 supports, in layout order. VMREAD/VMWRITE of anything else gets
    /// VMfailValid(unsupported VMCS component), as KVM does for fields missing from vmcs12.
    public static let supported: [(VMCSField, String)] = [
        (.virtualProcessorID, "VIRTUAL_PROCESSOR_ID"),
        (.guestESSelector, "GUEST_ES_SELECTOR"), (.guestCSSelector, "GUEST_CS_SELECTOR"),
        (.guestSSSelector, "GUEST_SS_SELECTOR"), (.guestDSSelector, "GUEST_DS_SELECTOR"),
        (.guestFSSelector, "GUEST_FS_SELECTOR"), (.guestGSSelector, "GUEST_GS_SELECTOR"),
        (.guestLDTRSelector, "GUEST_LDTR_SELECTOR"), (.guestTRSelector, "GUEST_TR_SELECTOR"),
        (.guestIntrStatus, "GUEST_INTR_STATUS"), (.guestPMLIndex, "GUEST_PML_INDEX"),
        (.hostESSelector, "HOST_ES_SELECTOR"), (.hostCSSelector, "HOST_CS_SELECTOR"),
        (.hostSSSelector, "HOST_SS_SELECTOR"), (.hostDSSelector, "HOST_DS_SELECTOR"),
        (.hostFSSelector, "HOST_FS_SELECTOR"), (.hostGSSelector, "HOST_GS_SELECTOR"),
        (.hostTRSelector, "HOST_TR_SELECTOR"),
        (.ioBitmapA, "IO_BITMAP_A"), (.ioBitmapB, "IO_BITMAP_B"), (.msrBitmap, "MSR_BITMAP"),
        (.vmExitMsrStoreAddr, "VM_EXIT_MSR_STORE_ADDR"), (.vmExitMsrLoadAddr, "VM_EXIT_MSR_LOAD_ADDR"),
        (.vmEntryMsrLoadAddr, "VM_ENTRY_MSR_LOAD_ADDR"), (.tscOffset, "TSC_OFFSET"),
        (.virtualAPICPageAddr, "VIRTUAL_APIC_PAGE_ADDR"), (.apicAccessAddr, "APIC_ACCESS_ADDR"),
        (.eptPointer, "EPT_POINTER"), (.vmreadBitmap, "VMREAD_BITMAP"), (.vmwriteBitmap, "VMWRITE_BITMAP"),
        (.guestPhysicalAddress, "GUEST_PHYSICAL_ADDRESS"),
        (.vmcsLinkPointer, "VMCS_LINK_POINTER"), (.guestIA32Debugctl, "GUEST_IA32_DEBUGCTL"),
        (.guestIA32PAT, "GUEST_IA32_PAT"), (.guestIA32EFER, "GUEST_IA32_EFER"),
        (.hostIA32PAT, "HOST_IA32_PAT"), (.hostIA32EFER, "HOST_IA32_EFER"),
        (.pinBasedVMExecControl, "PIN_BASED_VM_EXEC_CONTROL"), (.cpuBasedVMExecControl, "CPU_BASED_VM_EXEC_CONTROL"),
        (.exceptionBitmap, "EXCEPTION_BITMAP"), (.pageFaultErrorCodeMask, "PAGE_FAULT_ERROR_CODE_MASK"),
        (.pageFaultErrorCodeMatch, "PAGE_FAULT_ERROR_CODE_MATCH"), (.cr3TargetCount, "CR3_TARGET_COUNT"),
        (.vmExitControls, "VM_EXIT_CONTROLS"), (.vmExitMsrStoreCount, "VM_EXIT_MSR_STORE_COUNT"),
        (.vmExitMsrLoadCount, "VM_EXIT_MSR_LOAD_COUNT"), (.vmEntryControls, "VM_ENTRY_CONTROLS"),
        (.vmEntryMsrLoadCount, "VM_ENTRY_MSR_LOAD_COUNT"), (.vmEntryIntrInfoField, "VM_ENTRY_INTR_INFO_FIELD"),
        (.vmEntryExceptionErrorCode, "VM_ENTRY_EXCEPTION_ERROR_CODE"),
        (.vmEntryInstructionLen, "VM_ENTRY_INSTRUCTION_LEN"), (.tprThreshold, "TPR_THRESHOLD"),
        (.secondaryVMExecControl, "SECONDARY_VM_EXEC_CONTROL"),
        (.vmInstructionError, "VM_INSTRUCTION_ERROR"), (.vmExitReason, "VM_EXIT_REASON"),
        (.vmExitIntrInfo, "VM_EXIT_INTR_INFO"), (.vmExitIntrErrorCode, "VM_EXIT_INTR_ERROR_CODE"),
        (.idtVectoringInfoField, "IDT_VECTORING_INFO_FIELD"), (.idtVectoringErrorCode, "IDT_VECTORING_ERROR_CODE"),
        (.vmExitInstructionLen, "VM_EXIT_INSTRUCTION_LEN"), (.vmxInstructionInfo, "VMX_INSTRUCTION_INFO"),
        (.guestESLimit, "GUEST_ES_LIMIT"), (.guestCSLimit, "GUEST_CS_LIMIT"), (.guestSSLimit, "GUEST_SS_LIMIT"),
        (.guestDSLimit, "GUEST_DS_LIMIT"), (.guestFSLimit, "GUEST_FS_LIMIT"), (.guestGSLimit, "GUEST_GS_LIMIT"),
        (.guestLDTRLimit, "GUEST_LDTR_LIMIT"), (.guestTRLimit, "GUEST_TR_LIMIT"),
        (.guestGDTRLimit, "GUEST_GDTR_LIMIT"), (.guestIDTRLimit, "GUEST_IDTR_LIMIT"),
        (.guestESARBytes, "GUEST_ES_AR_BYTES"), (.guestCSARBytes, "GUEST_CS_AR_BYTES"),
        (.guestSSARBytes, "GUEST_SS_AR_BYTES"), (.guestDSARBytes, "GUEST_DS_AR_BYTES"),
        (.guestFSARBytes, "GUEST_FS_AR_BYTES"), (.guestGSARBytes, "GUEST_GS_AR_BYTES"),
        (.guestLDTRARBytes, "GUEST_LDTR_AR_BYTES"), (.guestTRARBytes, "GUEST_TR_AR_BYTES"),
        (.guestInterruptibilityInfo, "GUEST_INTERRUPTIBILITY_INFO"), (.guestActivityState, "GUEST_ACTIVITY_STATE"),
        (.guestSysenterCS, "GUEST_SYSENTER_CS"), (.vmxPreemptionTimerValue, "VMX_PREEMPTION_TIMER_VALUE"),
        (.hostIA32SysenterCS, "HOST_IA32_SYSENTER_CS"),
        (.cr0GuestHostMask, "CR0_GUEST_HOST_MASK"), (.cr4GuestHostMask, "CR4_GUEST_HOST_MASK"),
        (.cr0ReadShadow, "CR0_READ_SHADOW"), (.cr4ReadShadow, "CR4_READ_SHADOW"),
        (.exitQualification, "EXIT_QUALIFICATION"), (.guestLinearAddress, "GUEST_LINEAR_ADDRESS"),
        (.guestCR0, "GUEST_CR0"), (.guestCR3, "GUEST_CR3"), (.guestCR4, "GUEST_CR4"),
        (.guestESBase, "GUEST_ES_BASE"), (.guestCSBase, "GUEST_CS_BASE"), (.guestSSBase, "GUEST_SS_BASE"),
        (.guestDSBase, "GUEST_DS_BASE"), (.guestFSBase, "GUEST_FS_BASE"), (.guestGSBase, "GUEST_GS_BASE"),
        (.guestLDTRBase, "GUEST_LDTR_BASE"), (.guestTRBase, "GUEST_TR_BASE"),
        (.guestGDTRBase, "GUEST_GDTR_BASE"), (.guestIDTRBase, "GUEST_IDTR_BASE"), (.guestDR7, "GUEST_DR7"),
        (.guestRSP, "GUEST_RSP"), (.guestRIP, "GUEST_RIP"), (.guestRFLAGS, "GUEST_RFLAGS"),
        (.guestPendingDbgExceptions, "GUEST_PENDING_DBG_EXCEPTIONS"),
        (.guestSysenterESP, "GUEST_SYSENTER_ESP"), (.guestSysenterEIP, "GUEST_SYSENTER_EIP"),
        (.hostCR0, "HOST_CR0"), (.hostCR3, "HOST_CR3"), (.hostCR4, "HOST_CR4"),
        (.hostFSBase, "HOST_FS_BASE"), (.hostGSBase, "HOST_GS_BASE"), (.hostTRBase, "HOST_TR_BASE"),
        (.hostGDTRBase, "HOST_GDTR_BASE"), (.hostIDTRBase, "HOST_IDTR_BASE"),
        (.hostIA32SysenterESP, "HOST_IA32_SYSENTER_ESP"), (.hostIA32SysenterEIP, "HOST_IA32_SYSENTER_EIP"),
        (.hostRSP, "HOST_RSP"), (.hostRIP, "HOST_RIP"),
    ]

    static let names: [VMCSField: String] = {
        var d = Dictionary(uniqueKeysWithValues: supported.map { ($0.0, $0.1) })
        d[.guestPhysicalAddressHigh] = "GUEST_PHYSICAL_ADDRESS_HIGH"
        return d
    }()
}
