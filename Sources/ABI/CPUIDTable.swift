/// A CPUID table with KVM_SET_CPUID2 semantics (kvm_find_cpuid_entry / kvm_cpuid). The rule is
/// part of the contract, not a mechanism: L0 on the PV path and a KVM-like L1 on the nVMX path
/// must answer every leaf identically from the same entries.
public struct CPUIDTable: Sendable, Equatable {
    public let entries: [CPUIDEntry]
    public init(_ entries: [CPUIDEntry]) { self.entries = entries }

    public func exactEntry(function: UInt32, index: UInt32) -> CPUIDEntry? {
        entries.first { $0.function == function && (!$0.matchesIndex || $0.index == index) }
    }

    /// (eax, ebx, ecx, edx) for CPUID.function.index. A leaf without an entry: above the maximum
    /// basic leaf, Intel CPUs (and KVM for an Intel guest) answer with the maximum basic leaf;
    /// anything else reads as zeros.
    public func lookup(function: UInt32, index: UInt32) -> (UInt32, UInt32, UInt32, UInt32) {
        if let e = exactEntry(function: function, index: index) { return (e.eax, e.ebx, e.ecx, e.edx) }
        let isBasic = function < 0x4000_0000
        if isBasic, let max = exactEntry(function: 0, index: 0)?.eax, function > max,
           let e = exactEntry(function: max, index: index) {
            return (e.eax, e.ebx, e.ecx, e.edx)
        }
        return (0, 0, 0, 0)
    }
}
