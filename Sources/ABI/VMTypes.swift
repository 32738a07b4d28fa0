// KVM's x86 VM types and the capability that advertises them. Definitions only: what each type
// implies for a VM (private memory, protected state) is decided by L0 when it creates the VM.
//
// The numbers are the upstream uAPI's: KVM_X86_*_VM in arch/x86/include/uapi/asm/kvm.h and
// KVM_CAP_VM_TYPES in include/uapi/linux/kvm.h, both Linux 6.8+. This machine's linux-libc-dev
// is 6.1, which predates them, so unlike the rest of ABI they are written out here instead of
// coming from CPVMShim. When the installed header carries them, take them from it.

/// A VM type: the argument of KVM_CREATE_VM on x86.
public enum VMType: UInt32, CaseIterable, Sendable, Hashable, CustomStringConvertible {
    /// KVM_X86_DEFAULT_VM: an ordinary VM.
    case `default` = 0
    /// KVM_X86_SW_PROTECTED_VM: guest_memfd private memory without hardware protection (testing).
    case swProtected = 1
    /// KVM_X86_SEV_VM: AMD SEV, encrypted memory.
    case sev = 2
    /// KVM_X86_SEV_ES_VM: SEV with encrypted register state.
    case sevES = 3
    /// KVM_X86_SNP_VM: SEV-SNP.
    case snp = 4
    /// KVM_X86_TDX_VM: Intel TDX.
    case tdx = 5

    /// The uAPI macro that names this type.
    public var uapiName: String {
        switch self {
        case .default: "KVM_X86_DEFAULT_VM"
        case .swProtected: "KVM_X86_SW_PROTECTED_VM"
        case .sev: "KVM_X86_SEV_VM"
        case .sevES: "KVM_X86_SEV_ES_VM"
        case .snp: "KVM_X86_SNP_VM"
        case .tdx: "KVM_X86_TDX_VM"
        }
    }

    /// Short names, as a command line or a table would print them.
    public var name: String {
        switch self {
        case .default: "default"
        case .swProtected: "sw-protected"
        case .sev: "sev"
        case .sevES: "sev-es"
        case .snp: "snp"
        case .tdx: "tdx"
        }
    }

    public var description: String { "\(name) (\(uapiName) = \(rawValue))" }
}

/// The supported VM types as KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES) returns them: bit n set means
/// type n can be created. It is 32 bits, one per type, so a type's properties are never packed
/// into the type number (seeds/004): a base type can gain private memory later without a new type.
public struct VMTypeMask: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public init(_ type: VMType) { self.rawValue = 1 << type.rawValue }
    public init(_ types: [VMType]) { self.rawValue = types.reduce(0) { $0 | 1 << $1.rawValue } }

    public func contains(_ type: VMType) -> Bool { contains(rawType: type.rawValue) }
    /// Whether a raw KVM_CREATE_VM type is in the mask; a number the mask cannot hold is not.
    public func contains(rawType: UInt32) -> Bool { rawType < 32 && rawValue & (1 << rawType) != 0 }

    /// The types this build defines whose bits are set, in number order.
    public var types: [VMType] { VMType.allCases.filter { contains($0) } }

    public var description: String {
        let names = types.map(\.name)
        let hex = "0x" + String(rawValue, radix: 16)
        return names.isEmpty ? "\(hex) (none)" : "\(hex) (\(names.joined(separator: ", ")))"
    }
}

/// KVM_CHECK_EXTENSION capability numbers this project answers.
public enum KVMCapability {
    /// KVM_CAP_VM_TYPES: the answer is the `VMTypeMask` of supported types.
    public static let vmTypes: UInt32 = 235
}
