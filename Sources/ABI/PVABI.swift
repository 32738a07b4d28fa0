import CPVMShim

// The paravirtual ABI between L1 and L0 (and between L2 and L0). Definitions only.
//
// Calling convention (as KVM's hypercalls): VMCALL with the hypercall number in RAX and
// arguments in RBX, RCX, RDX, RSI; the result comes back in RAX: >= 0 success, or a negated
// KVM error code from <linux/kvm_para.h>. Bulk data is passed by L1 GPA of a buffer in L1 memory.

public enum PVHypercall: UInt64, Sendable, CaseIterable {
    /// Register L2's CPUID table: RBX = L1 GPA of `kvm_cpuid_entry2[]`, RCX = entry count.
    case setCPUID = 0x5056_0001
    /// Map L2 GPA range to L1 memory: RBX = L2 GPA, RCX = L1 GPA, RDX = length, RSI = flags.
    case mapGPARange = 0x5056_0002
    /// Unmap an L2 GPA range: RBX = L2 GPA, RCX = length.
    case unmapGPARange = 0x5056_0003
    /// Create the L2 vCPU: RBX = L1 GPA of its PV exit page (a `RunPage` in L1 memory).
    case createVCPU = 0x5056_0004
    /// Run L2 until an exit L1 must see; exit information lands in the PV exit page.
    case enterL2 = 0x5056_0005

    public static let base: UInt64 = 0x5056_0000
}

/// Flags of `mapGPARange`.
public enum PVMapFlags {
    public static let read: UInt64 = 1 << 0
    public static let write: UInt64 = 1 << 1
    public static let execute: UInt64 = 1 << 2
    public static let rwx: UInt64 = 0x7
    public static let known: UInt64 = rwx
}

/// Hypercall results: the KVM error codes of <linux/kvm_para.h>, returned negated in RAX.
public struct HypercallError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The positive KVM_E* code.
    public let code: Int64
    public let name: String

    public static let noSys = HypercallError(code: Int64(KVM_ENOSYS), name: "-KVM_ENOSYS")
    public static let fault = HypercallError(code: Int64(KVM_EFAULT), name: "-KVM_EFAULT")
    public static let invalid = HypercallError(code: Int64(KVM_EINVAL), name: "-KVM_EINVAL")
    public static let tooBig = HypercallError(code: Int64(KVM_E2BIG), name: "-KVM_E2BIG")
    public static let permission = HypercallError(code: Int64(KVM_EPERM), name: "-KVM_EPERM")
    public static let notSupported = HypercallError(code: Int64(KVM_EOPNOTSUPP), name: "-KVM_EOPNOTSUPP")
    public static let all: [HypercallError] = [.noSys, .fault, .invalid, .tooBig, .permission, .notSupported]

    /// The value L1 finds in RAX.
    public var returnValue: UInt64 { UInt64(bitPattern: -code) }
    /// nil for a non-negative (successful) return value.
    public static func from(returnValue rax: UInt64) -> HypercallError? {
        let v = Int64(bitPattern: rax)
        guard v < 0 else { return nil }
        return all.first { $0.code == -v } ?? HypercallError(code: -v, name: "-\(-v)")
    }
    public var description: String { name }
}
