import ABI
import GuestDevices
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

/// The emulated nested-VMX paths, as KVM runs a KVM guest hypervisor (KVM: `struct nested_vmx`
/// and nested.c). This backend owns L1's VMX state: VMXON, the current vmcs12, the shadow VMCS
/// or eVMCS, vmcs02's controls, and the EPT12 pages shadowed into EPT02.
///
/// Where each exit goes: L2 exits, VM exits and VM entries in NestedTransitions.swift, L1's
/// exits in VMXInstructions.swift, EPT-on-EPT in NestedEPT.swift, the eVMCS in
/// EnlightenedVMCS.swift.
public final class NestedVMXBackend: NestingBackend {
    /// How vmcs12 reaches L0: VMCS shadowing (KVM's default), plain exiting VMREAD/VMWRITE, or
    /// Hyper-V's enlightened VMCS.
    public enum Variant: Sendable, Equatable {
        case shadowing, noShadowing, enlightened
        init?(_ path: NestingPath) {
            switch path {
            case .nvmx: self = .shadowing
            case .nvmxNoShadow: self = .noShadowing
            case .nvmxEVMCS: self = .enlightened
            case .single, .pv, .pvmRFC: return nil
            }
        }
    }
    public let variant: Variant
    /// VMCS shadowing on: shadowed VMREAD/VMWRITE from L1 do not exit.
    public var shadowing: Bool { variant == .shadowing }
    public let shadowVMCS: VMCSImage
    /// L0's own copy of vmcs12 (in L0's memory) that entries and exits work on with an eVMCS.
    public let cachedVMCS12: VMCSImage
    /// vmcs01's link pointer is valid: L1's VMREAD/VMWRITE may use the shadow VMCS.
    let shadowActive: SharedFlag
    /// L1 pages whose stores exit to L0 (EPT12 tables L0 shadows).
    let writeProtect: BitmapView

    public internal(set) var vmxon = false
    public internal(set) var vmxonPointer: L1GPA?
    /// The current VMCS pointer (VMPTRLD) and its vmcs12 page.
    public internal(set) var current: L1GPA?
    public internal(set) var vmcs12: VMCSImage?
    /// L2 is active (between a successful VM entry and the next reflected exit).
    public internal(set) var guestMode = false
    /// An exiting VMWRITE changed vmcs12: the next entry does the full vmcs02 rebuild.
    public internal(set) var vmcs12Dirty = true
    /// The controls L2 runs with now (rebuilt with the rest of vmcs02 when vmcs12 changed).
    public internal(set) var vmcs02 = VMCS02Controls()
    /// What the VM's vCPUs share: EPT02 is one table, so the EPT12 it shadows and the
    /// shadow bookkeeping are the VM's (KVM's shadow pages hang off `struct kvm`).
    public let vmState: NestedVMXVMState
    /// The EPTP whose EPT12 the current EPT02 shadows.
    public internal(set) var shadowedEPTP: UInt64? {
        get { vmState.shadowedEPTP }
        set { vmState.shadowedEPTP = newValue }
    }
    /// The VP assist page L1 enabled (nvmx-evmcs names its eVMCS there), and that eVMCS.
    public internal(set) var vpAssistPage: L1GPA?
    public internal(set) var evmcs: VMCSImage?
    /// EPT12 pages shadowed into EPT02.
    public internal(set) var shadows: EPT12ShadowTracker {
        get { vmState.shadows }
        set { vmState.shadows = newValue }
    }
    /// L2's control registers where L1 does not own them (L0 keeps those, as KVM's kernel would).
    var l2ControlRegisters = GuestControlRegisters()
    /// The clean-field bits of the last eVMCS load (0 on VMLAUNCH or a new eVMCS).
    var lastEVMCSClean: UInt32 = 0
    /// The VPID of the last entry, for the transition TLB-flush rule.
    var lastEnteredVPID: UInt64 = 0
    /// The 35 rarely used fields have not been synced into vmcs12 since the last exit
    /// (KVM's need_sync_vmcs02_to_vmcs12_rare): an exiting VMREAD of one syncs them first.
    var needsRareSync = false
    /// Why L0 refused L1's nested VMX (a TDX L1), if it did.
    public internal(set) var refusal: PVRefusal?
    /// When vmcs12's VMX-preemption timer, which L0 emulates (KVM: an hrtimer,
    /// vmx_start_preemption_timer), runs out: set at each nested entry with the timer on, from
    /// VMX_PREEMPTION_TIMER_VALUE (this L0's timer counts one tick a nanosecond of the guest
    /// clock); 0 while it is off or after it fired.
    public internal(set) var vmcs12TimerDeadline: UInt64 = 0
    /// A VMLAUNCH succeeded once: L1 has an L2 vCPU.
    public private(set) var hasL2VCPU = false

    init(variant: Variant, control: ControlMemory, vcpu: Int, vmState: NestedVMXVMState = NestedVMXVMState()) {
        self.variant = variant
        self.vmState = vmState
        self.shadowVMCS = control.shadowVMCS(vcpu: vcpu)
        self.cachedVMCS12 = control.cachedVMCS12(vcpu: vcpu)
        self.shadowActive = control.shadowVMCSActive(vcpu: vcpu)
        self.writeProtect = control.l1WriteProtect
        Self.initializeFieldBitmaps(control)
    }

    /// L1 starts; L0 runs L1's local APICs (its vCPUs' IPIs to each other).
    public func start(_ vcpu: L0VCPU, l2: inout RegisterFile) throws -> NextStep {
        vcpu.enableLocalAPICs(count: vcpu.control.layout.vcpuCount, for: .l1)
        return .resume(.l1)
    }

    func launched() { hasL2VCPU = true }

    /// Fills the VMREAD/VMWRITE bitmaps as KVM does: all ones, then a clear bit for each
    /// shadowed field (bit index = encoding bits 14:0). Read-only fields are VMREAD-only. They
    /// are the VM's, not a vCPU's: every vCPU's backend writes the same bits.
    static func initializeFieldBitmaps(_ control: ControlMemory) {
        // The views once (each `control.` accessor builds one).
        let vmread = control.vmreadBitmap, vmwrite = control.vmwriteBitmap
        vmread.setAll(true)
        vmwrite.setAll(true)
        for f in ShadowedFields.readOnly { vmread[UInt64(f.rawValue & 0x7FFF)] = false }
        for f in ShadowedFields.readWrite {
            vmread[UInt64(f.rawValue & 0x7FFF)] = false
            vmwrite[UInt64(f.rawValue & 0x7FFF)] = false
        }
    }

    /// Byte offsets of the 8-byte slots shadowed fields occupy (a 64-bit field's high access
    /// shares its slot), computed once: the copies run on every nested exit and entry.
    static let shadowedReadWriteOffsets: [UInt64] = ShadowedFields.readWrite.compactMap { VMCS12Layout.slot(of: $0)?.offset }
    static let shadowedAllOffsets: [UInt64] = (ShadowedFields.readOnly + ShadowedFields.readWrite)
        .filter { !$0.isHighAccess }.compactMap { VMCS12Layout.slot(of: $0)?.offset }

    // MARK: memslots

    /// EPT12 tables that lived in deleted memory lose their shadows. After a fast zap every
    /// shadow goes (EPT02 was invalidated as a whole); after a targeted one only those whose
    /// table page was in the slot, with the EPT02 entries derived from them.
    public func memoryRemoved(_ range: AddressRange<L1GPA>, slot: UInt32, fastZap: Bool, _ vcpu: L0VCPU) {
        if fastZap {
            for page in shadows.tables.keys { setWriteProtected(page, false) }
            shadows = EPT12ShadowTracker()
            return
        }
        for (page, shadow) in shadows.tables {
            guard let base = L1GPA(pageNumber: page), range.contains(base) else { continue }
            for dep in shadow.dependents { vcpu.ept02.remove(page: L2GPA(pageNumber: dep)!); shadows.forget(dep) }
            shadows.tables[page] = nil
            shadows.unsync.remove(page)
            setWriteProtected(page, false)
        }
    }
}

/// The nested-VMX state of one VM, shared by its vCPUs' backends: the EPTP whose EPT12 the one
/// EPT02 shadows, and which EPT12 pages are shadowed (write-protected or unsync).
public final class NestedVMXVMState {
    public var shadowedEPTP: UInt64?
    public var shadows = EPT12ShadowTracker()
    public init() {}
}
