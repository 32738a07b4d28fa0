import CPVMShim

// The paravirtual ABI between L1 and L0 (and between L2 and L0). Definitions only.
//
// Calling convention (as KVM's hypercalls): VMCALL with the hypercall number in RAX and
// arguments in RBX, RCX, RDX, RSI; the result comes back in RAX: >= 0 success, or a negated
// KVM error code from <linux/kvm_para.h>. Bulk data is passed by L1 GPA of a buffer in L1 memory.

/// A value a hypercall takes in a register: a number, or an address in one of the address
/// spaces (its raw value is exactly what the register holds).
public protocol HypercallArgument {
    var registerValue: UInt64 { get }
}
extension UInt64: HypercallArgument { public var registerValue: UInt64 { self } }
extension L1GPA: HypercallArgument { public var registerValue: UInt64 { raw } }
extension L2GPA: HypercallArgument { public var registerValue: UInt64 { raw } }

/// The ABI version. Majors are incompatible; a minor adds hypercalls or feature bits only.
public struct PVABIVersion: Equatable, Sendable, CustomStringConvertible {
    public var major: UInt16
    public var minor: UInt16
    public init(major: UInt16, minor: UInt16) { self.major = major; self.minor = minor }
    /// This build's version.
    public static let current = PVABIVersion(major: 1, minor: 0)
    /// As passed in a register: major in bits 31:16, minor in 15:0.
    public var packed: UInt64 { UInt64(major) << 16 | UInt64(minor) }
    public init(packed: UInt64) { self.init(major: UInt16(truncatingIfNeeded: packed >> 16), minor: UInt16(truncatingIfNeeded: packed)) }
    public var description: String { "\(major).\(minor)" }
}

/// Feature bits L0 offers and L1 enables (like KVM_CPUID_FEATURES / KVM_CAP_*). Each one can be
/// left off; L0 then forwards the exits it would have handled to L1 through the PV exit page.
public struct PVFeatures: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// L0 answers L2's CPUID from the table L1 registered (`setCPUID`).
    public static let directCPUID = PVFeatures(rawValue: 1 << 0)
    /// L0 applies the per-MSR policy L1 registered (`setMSRPolicy`, `getMSRs`, `setMSRs`).
    public static let directMSR = PVFeatures(rawValue: 1 << 1)
    /// L0 completes port I/O to ports L1 handed it (`registerL0Ports`).
    public static let l0Ports = PVFeatures(rawValue: 1 << 2)
    /// Many ranges in one mapping hypercall (`mapGPABatch`).
    public static let batchMap = PVFeatures(rawValue: 1 << 3)
    /// L0 runs L2's local APICs (`LocalAPICs`): L2's x2APIC ICR/SELF_IPI/EOI/TPR writes, its
    /// KVM_HC_SEND_IPI, and its HLT until an interrupt are L0's, and an IPI between L2 vCPUs
    /// never reaches L1 (as KVM's in-kernel LAPIC with PV IPIs does for a one-level guest).
    public static let directAPIC = PVFeatures(rawValue: 1 << 4)

    /// L0 handles L2's `L2Hypercall.flushTLB`: it flushes the TLBs of the vCPUs L2 names
    /// itself, kicking those in guest mode, with no IPI in L2 and nothing for L1 (as KVM's
    /// Hyper-V "L2 TLB flush" lets L0 answer L2's flush hypercall without L1).
    public static let directTLBFlush = PVFeatures(rawValue: 1 << 5)

    public static let all: PVFeatures = [.directCPUID, .directMSR, .l0Ports, .batchMap, .directAPIC, .directTLBFlush]
    /// Bits this version defines; any other bit is refused.
    public static let known = all

    /// Command-line names, in bit order.
    public static let names: [(String, PVFeatures)] = [
        ("direct-cpuid", .directCPUID), ("direct-msr", .directMSR), ("l0-ports", .l0Ports), ("batch-map", .batchMap),
        ("direct-apic", .directAPIC), ("direct-tlb-flush", .directTLBFlush),
    ]
    public var description: String {
        let n = Self.names.filter { contains($0.1) }.map(\.0)
        return n.isEmpty ? "none" : n.joined(separator: ",")
    }
}

public enum PVHypercall: UInt64, Sendable, CaseIterable {
    /// RAX <- this L0's version, packed (`PVABIVersion.packed`). Allowed before `negotiate`.
    case getVersion = 0x5056_0000
    /// Register L2's CPUID table: RBX = L1 GPA of `kvm_cpuid_entry2[]`, RCX = entry count.
    case setCPUID = 0x5056_0001
    /// Map an L2 GPA range to L1 memory: RBX = L2 GPA, RCX = L1 GPA, RDX = length, RSI = flags.
    case mapGPARange = 0x5056_0002
    /// Unmap an L2 GPA range: RBX = L2 GPA, RCX = length.
    case unmapGPARange = 0x5056_0003
    /// Create the L2 vCPU: RBX = L1 GPA of its PV exit page (a `RunPage` in L1 memory).
    case createVCPU = 0x5056_0004
    /// Run L2 until an exit L1 must see; exit information lands in the PV exit page.
    case enterL2 = 0x5056_0005
    /// RAX <- the feature bits this L0 offers. Allowed before `negotiate`.
    case getFeatures = 0x5056_0006
    /// RBX = L1's version (packed), RCX = features to enable, RDX = L1 GPA of the argument page.
    case negotiate = 0x5056_0007
    /// RBX = number of `PVMapBatchEntry` records in the argument page. All or nothing.
    case mapGPABatch = 0x5056_0008
    /// RBX = number of `PVMSRPolicyEntry` records in the argument page.
    case setMSRPolicy = 0x5056_0009
    /// RBX = number of `kvm_msr_entry` records in the argument page; L0 fills `data` for each MSR
    /// it emulates. RAX <- how many it filled (stops at the first it does not emulate).
    case getMSRs = 0x5056_000A
    /// RBX = number of `kvm_msr_entry` records: L0 sets the values of MSRs it emulates.
    case setMSRs = 0x5056_000B
    /// Hand ports to L0: RBX = first port, RCX = port count, RDX = `PVL0Device` kind.
    case registerL0Ports = 0x5056_000C

    public static let base: UInt64 = 0x5056_0000
    /// The hypercalls L1 may make before `negotiate`.
    public var allowedBeforeNegotiation: Bool { self == .getVersion || self == .getFeatures || self == .negotiate }
    /// The feature a hypercall belongs to, if any.
    public var feature: PVFeatures? {
        switch self {
        case .setCPUID: .directCPUID
        case .setMSRPolicy, .getMSRs, .setMSRs: .directMSR
        case .registerL0Ports: .l0Ports
        case .mapGPABatch: .batchMap
        default: nil
        }
    }
}

/// Flags of `mapGPARange` and of each `PVMapBatchEntry`.
public enum PVMapFlags {
    public static let read: UInt64 = 1 << 0
    public static let write: UInt64 = 1 << 1
    public static let execute: UInt64 = 1 << 2
    public static let rwx: UInt64 = 0x7
    /// Replace whatever the range overlaps instead of refusing with -KVM_EINVAL.
    public static let replace: UInt64 = 1 << 3
    public static let known: UInt64 = rwx | replace
}

/// The argument page: one 4 KiB page of L1 memory, registered at `negotiate`, for bulk arguments.
public enum PVArgumentPage {
    public static let size: UInt64 = 4096
}

/// One range of `mapGPABatch`: four little-endian u64s.
public enum PVMapBatchEntry {
    public static let l2GPA: UInt64 = 0
    public static let l1GPA: UInt64 = 8
    public static let length: UInt64 = 16
    public static let flags: UInt64 = 24
    public static let size: UInt64 = 32
    public static let maxPerCall: UInt64 = PVArgumentPage.size / size
}

/// One MSR policy: a `kvm_msr_entry` (index, reserved -> action, data -> initial value) followed
/// by a u64 writable mask.
public enum PVMSRPolicyEntry {
    public static let index: UInt64 = 0          // u32, as kvm_msr_entry.index
    public static let action: UInt64 = 4         // u32, kvm_msr_entry.reserved carries the action
    public static let value: UInt64 = 8          // u64, as kvm_msr_entry.data
    public static let writableMask: UInt64 = 16  // u64
    public static let size: UInt64 = 24
    public static let maxPerCall: UInt64 = PVArgumentPage.size / size
    /// Distinct MSRs L0 keeps a policy for, over all calls (L0's table is bounded; a call that
    /// would pass it gets E2BIG and changes nothing). Re-setting a known MSR is always allowed.
    public static let maxPolicies = 512
}

/// What L0 does with an L2 RDMSR/WRMSR of one MSR.
public enum PVMSRAction: UInt32, Sendable {
    /// L0 keeps the value: reads return it; writes change only bits in the writable mask (a
    /// write that changes any other bit gets #GP).
    case emulate = 0
    /// Delivered to L1 through the PV exit page.
    case passToL1 = 1
    /// L0 injects #GP(0) into L2.
    case injectGP = 2
    /// L2 reads and writes the MSR without an exit (only MSRs in `PassthroughMSRs`); L0 keeps
    /// its value with L2's state, and getMSRs/setMSRs reach it.
    case passthrough = 3
}

/// `kvm_msr_entry` as <asm/kvm.h> lays it out (for getMSRs / setMSRs).
public enum KVMMSREntry {
    public static let index: UInt64 = UInt64(MemoryLayout<kvm_msr_entry>.offset(of: \.index)!)
    public static let data: UInt64 = UInt64(MemoryLayout<kvm_msr_entry>.offset(of: \.data)!)
    public static let size: UInt64 = UInt64(MemoryLayout<kvm_msr_entry>.size)
    public static let maxPerCall: UInt64 = PVArgumentPage.size / size
}

/// Devices L0 can run on ports L1 hands it (`registerL0Ports`), like KVM's in-kernel devices.
public enum PVL0Device: UInt64, Sendable {
    /// A 32-bit latch: IN returns the last value OUT wrote to that port (0 at first).
    case latch = 1
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

/// KVM's own PV interface to a guest (<linux/kvm_para.h>, taken through the shim), as L0
/// offers it to the guest whose local APIC it runs.
public enum KVMHypercall {
    /// KVM_HC_SEND_IPI: RBX/RCX = a 128-bit bitmap of destination APIC IDs from RDX (the lowest
    /// ID), RSI = the ICR's low word (vector and delivery mode). RAX <- the number of vCPUs the
    /// IPI was delivered to, or -KVM_EINVAL.
    public static let sendIPI = UInt64(KVM_HC_SEND_IPI)
}

/// KVM's steal-time area (`struct kvm_steal_time`, <asm/kvm_para.h>): a guest registers one per
/// vCPU with MSR_KVM_STEAL_TIME; its hypervisor sets `preempted` while the vCPU runs no guest
/// code, and a guest flushing TLBs sets KVM_VCPU_FLUSH_TLB there instead of sending that vCPU
/// an IPI (KVM_FEATURE_PV_TLB_FLUSH): the hypervisor flushes at the vCPU's next entry.
public enum KVMStealTime {
    public static let msr = UInt32(MSR_KVM_STEAL_TIME)
    /// Bit 0 of the MSR value: the area is enabled; the rest is its 64-byte-aligned GPA.
    public static let enable: UInt64 = 1
    public static let size: UInt64 = 64
    /// The u64 at this offset holds `preempted` in its low byte (then padding).
    public static let preemptedOffset: UInt64 = 16
    public static let preempted = UInt64(KVM_VCPU_PREEMPTED)
    public static let flushTLB = UInt64(KVM_VCPU_FLUSH_TLB)
}
