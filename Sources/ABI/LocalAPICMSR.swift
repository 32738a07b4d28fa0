/// The x2APIC registers as MSRs (SDM vol. 3, 11.12.1, table 11-6): what a guest writes to send,
/// end and mask interrupts, and what the hypervisor that runs its local APIC emulates.
public enum LocalAPICMSR {
    public static let id: UInt32 = 0x802
    public static let tpr: UInt32 = 0x808
    public static let eoi: UInt32 = 0x80B
    public static let icr: UInt32 = 0x830
    public static let selfIPI: UInt32 = 0x83F
    /// The whole x2APIC MSR range.
    public static let range: ClosedRange<UInt32> = 0x800...0x8FF
}
