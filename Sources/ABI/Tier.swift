/// The three levels of the stack. The raw value is what a handoff lane stores.
public enum Tier: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    case l0 = 0, l1 = 1, l2 = 2
    public var description: String { "L\(rawValue)" }
}

/// How the guest program runs: one level deep directly on L0 (the baseline), or as L2 under an
/// L1 that uses the paravirtual ABI or emulated nested VMX (shadowed, not, or enlightened).
public enum NestingPath: String, Sendable, CaseIterable, Codable {
    /// The guest program runs where L1 would, directly on L0: no L1 process (its exits are in the
    /// L2 columns, and the L1 columns stay 0).
    case single
    case pv
    case nvmx
    case nvmxNoShadow = "nvmx-noshadow"
    case nvmxEVMCS = "nvmx-evmcs"
    /// The PVM RFC's design: L1 runs L2 deprivileged behind a switcher, with shadow page
    /// tables; L2's exits go straight to L1, and L1 is an ordinary one-level guest of L0.
    case pvmRFC = "pvm-rfc"

    public var usesVMX: Bool { self != .pv && self != .single && self != .pvmRFC }
    /// L2's second stage is L1's shadow page tables (no EPT02), and its exits go to L1 through
    /// the switcher, not to L0.
    public var usesSwitcher: Bool { self == .pvmRFC }
    /// Whether L2 has a local APIC here (interrupts between its vCPUs): L0's on single, and
    /// on pv with `directAPIC`; L1's on the nested-VMX paths (with L0 running L1's own); not on
    /// pvm-rfc.
    public func hasLocalAPIC(pvFeatures: PVFeatures) -> Bool {
        switch self {
        case .single, .nvmx, .nvmxNoShadow, .nvmxEVMCS: true
        case .pv: pvFeatures.contains(.directAPIC)
        case .pvmRFC: false
        }
    }
    /// L1 maps L2's memory in one of the `L2MapMode`s (pv's map hypercalls, nvmx's EPT12); on
    /// pvm-rfc the shadow MMU fills on demand whatever the mode.
    public var hasMapModes: Bool { isNested && !usesSwitcher }
    public var isNested: Bool { self != .single }
    /// The nested paths, for what only a nested stack has.
    public static let nestedCases: [NestingPath] = allCases.filter(\.isNested)
    public var vmcsShadowing: Bool { self == .nvmx }
    /// L1 uses an enlightened VMCS (Hyper-V eVMCS) instead of VMREAD/VMWRITE.
    public var enlightenedVMCS: Bool { self == .nvmxEVMCS }
}

/// How L1 maps L2's memory: all at start; one page at its first touch (a map hypercall on pv, an
/// EPT12 entry on nvmx, as KVM's MMU does); or a window of 64 pages around each first touch (a
/// batch hypercall, or 64 EPT12 entries and one INVEPT).
public enum L2MapMode: String, Sendable, CaseIterable {
    case eager
    case perPage = "per-page"
    case batch
}
