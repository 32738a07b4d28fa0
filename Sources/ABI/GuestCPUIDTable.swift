
/// The CPUID the guest program sees, in `kvm_cpuid_entry2` form, whoever answers: the PV L1
/// registers it with L0; the nested-VMX L1 emulates CPUID from it itself; on the one-level path
/// L0 answers from it. Same entries, same lookup rule, same answers on every path.
public enum GuestCPUIDTable {
    static func fourCC(_ s: String) -> UInt32 {
        s.utf8.prefix(4).enumerated().reduce(0) { $0 | UInt32($1.element) << (8 * UInt32($1.offset)) }
    }
    static let sig = CPUIDEntry.significantIndex

    public static let entries: [CPUIDEntry] = [
        // Vendor "GenuineIntel", max basic leaf 0xD.
        CPUIDEntry(function: 0, eax: 0xD, ebx: fourCC("Genu"), ecx: fourCC("ntel"), edx: fourCC("ineI")),
        // Family 6; ECX bit 31 = "running under a hypervisor".
        CPUIDEntry(function: 1, eax: 0x0008_06F8, ebx: 0x0001_0800, ecx: 0x80B8_2203, edx: 0x178B_FBFF),
        CPUIDEntry(function: 7, index: 0, flags: sig, eax: 0, ebx: 0x0000_0209, ecx: 0, edx: 0),
        CPUIDEntry(function: 0xD, index: 0, flags: sig, eax: 0x7, ebx: 0x340, ecx: 0x340, edx: 0),
        CPUIDEntry(function: 0xD, index: 1, flags: sig, eax: 0x1, ebx: 0, ecx: 0, edx: 0),
        // Hypervisor leaves: signature "PVMNestedL1 " and the highest hypervisor leaf.
        CPUIDEntry(function: 0x4000_0000, eax: 0x4000_0001, ebx: fourCC("PVMN"), ecx: fourCC("este"), edx: fourCC("dL1 ")),
        CPUIDEntry(function: 0x4000_0001, eax: 0, ebx: 0, ecx: 0, edx: 0),
        CPUIDEntry(function: 0x8000_0000, eax: 0x8000_0008, ebx: 0, ecx: 0, edx: 0),
        CPUIDEntry(function: 0x8000_0001, eax: 0, ebx: 0, ecx: 0x0000_0121, edx: 0x2C10_0800),
        CPUIDEntry(function: 0x8000_0008, eax: 0x0000_3030, ebx: 0, ecx: 0, edx: 0),
    ]

    public static let table = CPUIDTable(entries)
}

/// The hypercalls a guest program makes to the hypervisor right below it (its L1 when nested,
/// L0 on the one-level path): VMCALL, number in RAX, argument in RBX. Anything else gets
/// -KVM_ENOSYS, as from KVM.
public enum L2Hypercall: UInt64, Sendable {
    /// Give the page at RBX back: it is unmapped and never mapped again. Returns 0, or
    /// -KVM_EINVAL for a GPA outside the guest's RAM.
    case balloonPage = 0x4C32_0001
    /// To L0 itself (on one level; on pv when L1 enabled `PVFeatures.directTLBFlush`; delivered
    /// to L1 otherwise): RBX = a bitmap of the vCPUs (by index) whose TLBs to flush, RCX = the
    /// guest-virtual address (~0: everything). Returns once no named vCPU can still use an old
    /// entry: those in guest mode were made to exit. RAX <- 0, or -KVM_EINVAL for a vCPU that
    /// does not exist.
    case flushTLB = 0x5056_1000
}
