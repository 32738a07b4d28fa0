/// The x2APIC registers as MSRs (SDM vol. 3, 11.12.1, table 11-6): what a guest writes to send,
/// end and mask interrupts, and what the hypervisor that runs its local APIC emulates.
public enum LocalAPICMSR {
    public static let id: UInt32 = 0x802
    public static let tpr: UInt32 = 0x808
    public static let eoi: UInt32 = 0x80B
    public static let icr: UInt32 = 0x830
    /// LVT timer: vector (7:0), mask (16), mode (18:17; `LVTTimer`).
    public static let lvtTimer: UInt32 = 0x832
    public static let selfIPI: UInt32 = 0x83F
    /// The whole x2APIC MSR range.
    public static let range: ClosedRange<UInt32> = 0x800...0x8FF
    /// IA32_TSC_DEADLINE (SDM vol. 4, table 2-2; Linux's MSR_IA32_TSC_DEADLINE): the deadline of
    /// the local APIC's timer in TSC-deadline mode, outside the x2APIC range, in either APIC mode.
    public static let tscDeadline: UInt32 = 0x6E0
}

/// The LVT timer register's fields (SDM vol. 3, 11.5.1 and 11.5.4.1).
public enum LVTTimer {
    public static let vectorMask: UInt32 = 0xFF
    public static let masked: UInt32 = 1 << 16
    public static let modeShift: UInt32 = 17
    public static let modeMask: UInt32 = 3 << 17
    /// Mode 10b: the timer fires when the TSC reaches IA32_TSC_DEADLINE.
    public static let tscDeadlineMode: UInt32 = 2 << 17
}

/// The xAPIC registers as memory (SDM vol. 3, 11.4.1, table 11-1): the 4 KiB page at the
/// APIC's default base, each register a 32-bit word on a 16-byte boundary. The same registers
/// as `LocalAPICMSR`, reached by MOVs to memory no RAM backs (an MMIO exit) instead of WRMSR.
public enum XAPIC {
    /// IA32_APIC_BASE's default: where every vCPU's APIC page sits.
    public static let base: UInt64 = 0xFEE0_0000
    public static let id: UInt64 = 0x20
    public static let tpr: UInt64 = 0x80
    public static let eoi: UInt64 = 0xB0
    /// ICR bits 31:0: writing it sends.
    public static let icrLow: UInt64 = 0x300
    /// ICR bits 63:32: the destination in bits 31:24.
    public static let icrHigh: UInt64 = 0x310
    public static let lvtTimer: UInt64 = 0x320
    /// The APIC page's offset of `gpa` (a guest-physical address of the guest whose APIC it
    /// is), or nil if `gpa` is not in the page.
    public static func offset<A: AddressSpaceValue>(of gpa: A) -> UInt64? {
        gpa.raw >= base && gpa.raw - base < pageSize ? gpa.raw - base : nil
    }
}
