import ABI

/// What a VM can do, decided once from its type when it is created and kept as plain booleans
/// beside the type, never encoded in it (seeds/004: `has_private_mem`, `has_protected_state` in
/// `struct kvm_arch`). A base type could then gain private memory later without a new type.
public struct VMCapabilities: Equatable, Sendable {
    /// Guest memory can be private (guest_memfd), invisible to the host.
    public var hasPrivateMem: Bool
    /// Register state is protected: the host can neither read nor change the vCPUs' state, so it
    /// cannot emulate instructions for the guest.
    public var hasProtectedState: Bool

    public init(hasPrivateMem: Bool, hasProtectedState: Bool) {
        self.hasPrivateMem = hasPrivateMem
        self.hasProtectedState = hasProtectedState
    }

    /// KVM's assignments: `kvm_arch_init_vm` (SW_PROTECTED: private memory), `sev_vm_init`
    /// (protected state for SEV-ES and SNP, private memory for SNP), `tdx_vm_init` (both).
    public init(type: VMType) {
        switch type {
        case .default, .sev: self.init(hasPrivateMem: false, hasProtectedState: false)
        case .swProtected: self.init(hasPrivateMem: true, hasProtectedState: false)
        case .sevES: self.init(hasPrivateMem: false, hasProtectedState: true)
        case .snp, .tdx: self.init(hasPrivateMem: true, hasProtectedState: true)
        }
    }

    /// Whether creating a VM of this kind needs the host's one-time setup first: the
    /// protected-state types, whose security module (the TDX module) must be initialised.
    var needsOneTimeSetup: Bool { hasProtectedState }
}
