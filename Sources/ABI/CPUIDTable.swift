/// A CPUID table with KVM_SET_CPUID2 semantics (kvm_find_cpuid_entry / kvm_cpuid). The rule is
/// part of the contract, not a mechanism: L0 on the PV path and a KVM-like L1 on the nVMX path
/// must answer every leaf identically from the same entries.
public struct CPUIDTable: Sendable, Equatable {
    public let entries: [CPUIDEntry]
    public init(_ entries: [CPUIDEntry]) { self.entries = entries }

    public func exactEntry(function: UInt32, index: UInt32) -> CPUIDEntry? {
        entries.first { $0.function == function && (!$0.matchesIndex || $0.index == index) }
    }

    /// (eax, ebx, ecx, edx) for CPUID.function.index, as KVM's kvm_cpuid() answers it. A leaf
    /// with no entry reads as zeros if it is within its class's range (the class's first leaf
    /// says how far it goes: 0, 0x4000_0000-style hypervisor ranges, 0x8000_0000, 0xC000_0000);
    /// beyond it, or in a class with no entry at all, Intel CPUs answer with the maximum basic
    /// leaf (get_out_of_range_cpuid_entry). AMD and Hygon vendors read zeros instead.
    public func lookup(function: UInt32, index: UInt32) -> (UInt32, UInt32, UInt32, UInt32) {
        if let e = exactEntry(function: function, index: index) { return (e.eax, e.ebx, e.ecx, e.edx) }
        guard let basic = exactEntry(function: 0, index: 0), !Self.isAMDLike(basic) else { return (0, 0, 0, 0) }
        let classLeaf: UInt32
        if function >= 0x4000_0000 && function <= 0x4FFF_FFFF { classLeaf = function & 0xFFFF_FF00 }
        else if function >= 0xC000_0000 { classLeaf = 0xC000_0000 }
        else { classLeaf = function & 0x8000_0000 }
        if let c = exactEntry(function: classLeaf, index: 0), function <= c.eax { return (0, 0, 0, 0) }
        guard let e = exactEntry(function: basic.eax, index: index) else { return (0, 0, 0, 0) }
        return (e.eax, e.ebx, e.ecx, e.edx)
    }

    /// "AuthenticAMD" / "HygonGenuine": EBX of leaf 0.
    static func isAMDLike(_ leaf0: CPUIDEntry) -> Bool { leaf0.ebx == 0x6874_7541 || leaf0.ebx == 0x6F67_7948 }
}
