import ABI
import Transport

/// The controls L0 runs L2 with (KVM's vmcs02), merged from vmcs12 and what L0 needs itself.
public struct VMCS02Controls: Equatable, Sendable {
    public var pinBased: UInt64 = 0
    public var cpuBased: UInt64 = 0
    public var secondary: UInt64 = 0
    public var exceptionBitmap: UInt64 = 0

    /// What L0 always wants while L2 runs, whatever L1 asks (KVM: external interrupts and NMIs
    /// exit to L0; HLT, I/O and MSR accesses exit so L0 can run its devices and MSR policy;
    /// #MC always; EPT on for EPT02).
    public static let l0Required = VMCS02Controls(
        pinBased: PinBased.externalInterruptExiting | PinBased.nmiExiting,
        cpuBased: CPUBased.hltExiting | CPUBased.unconditionalIOExiting | CPUBased.useMSRBitmaps
            | CPUBased.activateSecondaryControls,
        secondary: SecondaryExec.enableEPT,
        exceptionBitmap: 1 << 18)

    /// prepare_vmcs02: execution controls ORed, exception bitmaps merged.
    public static func merge(l1 v: VMCSImage) -> VMCS02Controls {
        let cpu = v[.cpuBasedVMExecControl]
        return VMCS02Controls(
            pinBased: v[.pinBasedVMExecControl] | l0Required.pinBased,
            cpuBased: cpu | l0Required.cpuBased,
            secondary: (cpu & CPUBased.activateSecondaryControls != 0 ? v[.secondaryVMExecControl] : 0) | l0Required.secondary,
            exceptionBitmap: v[.exceptionBitmap] | l0Required.exceptionBitmap)
    }
}

/// What L0 keeps for L1's VMX operation on one vCPU (KVM: `struct nested_vmx`).
public struct NestedVMXState: @unchecked Sendable {
    /// VMCS shadowing on: shadowed VMREAD/VMWRITE from L1 do not exit.
    public let shadowing: Bool
    public let shadowVMCS: VMCSImage
    let shadowActiveFlag: UInt64
    let control: SharedRegion

    public var vmxon = false
    public var vmxonPointer: L1GPA?
    /// The current VMCS pointer (VMPTRLD) and its vmcs12 page.
    public var current: L1GPA?
    public var vmcs12: VMCSImage?
    /// L2 is active (between a successful VM entry and the next reflected exit).
    public var guestMode = false
    /// An exiting VMWRITE changed vmcs12: the next entry does the full vmcs02 rebuild.
    public var vmcs12Dirty = true
    /// The controls L2 runs with now (rebuilt with the rest of vmcs02 when vmcs12 changed).
    public var vmcs02 = VMCS02Controls()
    /// The EPTP whose EPT12 the current EPT02 shadows.
    public var shadowedEPTP: UInt64?
    /// Enlightened VMCS (nvmx-evmcs): L1's VP assist page, the eVMCS it names, and L0's own copy
    /// of vmcs12 (in L0's memory) that entries and exits work on.
    public var vpAssistPage: L1GPA?
    /// EPT12 pages shadowed into EPT02, and where their write-protect bits live.
    public var shadows = EPT12ShadowTracker()
    let writeProtectBitmap: UInt64
    /// L2's MSR bitmap and pass-through MSR values in control memory.
    let l2MSRBitmap: UInt64
    let l2MSRValues: UInt64
    public var evmcs: VMCSImage?
    public let cachedVMCS12: VMCSImage

    init(shadowing: Bool, control: SharedRegion, layout: ControlLayout, vcpu: Int) {
        self.shadowing = shadowing
        self.control = control
        self.shadowVMCS = try! VMCSImage(region: control, base: layout.shadowVMCS(vcpu))  // fixed layout page
        self.cachedVMCS12 = try! VMCSImage(region: control, base: layout.cachedVMCS12(vcpu))  // fixed layout page
        self.shadowActiveFlag = layout.handoff(vcpu) + HandoffLayout.shadowVMCSActive
        self.writeProtectBitmap = layout.l1WriteProtectBitmap
        self.l2MSRBitmap = layout.l2MSRBitmap(vcpu)
        self.l2MSRValues = layout.l2MSRValues(vcpu)
    }

    /// Tells L1's CPU whether VMREAD/VMWRITE may use the shadow VMCS (vmcs01 link pointer valid).
    func setShadowActive(_ on: Bool) {
        control.unchecked(store: UInt32(on ? 1 : 0), at: shadowActiveFlag)
    }

    /// Fills the VMREAD/VMWRITE bitmaps as KVM does: all ones, then a clear bit for each
    /// shadowed field (bit index = encoding bits 14:0). Read-only fields are VMREAD-only.
    public static func initializeBitmaps(control: SharedRegion, layout: ControlLayout) throws {
        // L2's MSR bitmaps start intercepting everything.
        for i in 0..<layout.vcpuCount { try control.fill(0xFF, at: layout.l2MSRBitmap(i), count: pageSize) }
        try control.fill(0xFF, at: layout.vmreadBitmap, count: pageSize)
        try control.fill(0xFF, at: layout.vmwriteBitmap, count: pageSize)
        func clear(_ f: VMCSField, in bitmap: UInt64) throws {
            let bit = UInt64(f.rawValue & 0x7FFF)
            let at = bitmap + bit / 8
            let byte: UInt8 = try control.load(at: at)
            try control.store(byte & ~(1 << UInt8(bit % 8)), at: at)
        }
        for f in ShadowedFields.readOnly { try clear(f, in: layout.vmreadBitmap) }
        for f in ShadowedFields.readWrite {
            try clear(f, in: layout.vmreadBitmap)
            try clear(f, in: layout.vmwriteBitmap)
        }
    }

    /// Byte offsets of the 8-byte slots shadowed fields occupy (a 64-bit field's high access
    /// shares its slot), computed once: the copies run on every nested exit and entry.
    static let shadowedReadWriteOffsets: [UInt64] = ShadowedFields.readWrite.compactMap { VMCS12Layout.slot(of: $0)?.offset }
    static let shadowedAllOffsets: [UInt64] = (ShadowedFields.readOnly + ShadowedFields.readWrite)
        .filter { !$0.isHighAccess }.compactMap { VMCS12Layout.slot(of: $0)?.offset }
}
