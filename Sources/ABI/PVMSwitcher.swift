/// The pvm-rfc path's switcher area, in L1's memory: what the PVM RFC's switcher and its shared
/// per-vCPU page (pvm_para.h's PVCS: event vector and error code, CR2, RIP...) are to a real PVM
/// guest. L1 and L2 hand the vCPU to each other here with no L0 transition: a handoff lane of
/// their own, the run page L2's exits are written into, the shadow root the L2 CPU's MMU walks,
/// and L1's counters of what the switcher and its shadow MMU did (L0 reads them at the
/// harness's windows; they are L1's claims, reported as such).
public enum SwitcherLayout {
    /// Three pages at L1 GPA `base`: the lane and state, the run page, the counters.
    public static let base = L1GPA(0x0012_0000)
    public static let bytes: UInt64 = 3 * pageSize
    /// With several vCPUs, vCPU i's area is `bytes * i` past vCPU 0's (the addresses below are
    /// vCPU 0's): at most this many, in L1 GPA [0x12_0000, 0x15_0000).
    public static let maxVCPUs = 16
    public static func area(of vcpu: Int) -> AddressRange<L1GPA> {
        AddressRange(start: base + UInt64(vcpu) * bytes, length: bytes)!
    }
    /// The L1 <-> L2 handoff lane (HandoffLayout inside).
    public static let lane = base
    /// u64: the L1 GPA of the shadow PML4 the L2 CPU walks (hardware CR3 while L2 runs).
    public static let shadowRoot = base + 0x200
    /// u64: bumped by L1 whenever a shadow entry lost rights or went away; the L2 CPU flushes its
    /// TLB when it sees a new value on entry (KVM's remote TLB flush after zapping).
    public static let flushGeneration = base + 0x208
    /// u64: CR2 for a #PF L1 injects (the PVCS's cr2).
    public static let injectedCR2 = base + 0x210
    /// L2's exits to L1 and L1's entries back: a RunPage.
    public static let runPage = base + pageSize
    /// u64 counters: exits by basic reason (`reasonSlots`), then `SwitcherCounter`s.
    public static let counters = base + 2 * pageSize
    public static let reasonSlots = ExitReason.countedSlots
    public static func exitCounter(_ r: ExitReason) -> L1GPA {
        counters + UInt64(min(Int(r.basic.rawValue), reasonSlots - 1)) * 8
    }
    public static func counter(_ c: SwitcherCounter) -> L1GPA {
        counters + UInt64(reasonSlots + c.rawValue) * 8
    }
    public static var counterWords: Int { reasonSlots + SwitcherCounter.allCases.count }
}

/// What the switcher and L1's shadow MMU count on pvm-rfc (each priced by the cost model).
public enum SwitcherCounter: Int, CaseIterable, Sendable {
    /// L1 -> L2 entries through the switcher (after an exit L1 handled).
    case entries
    /// SYSCALL, SYSRET and IRET crossings the switcher did itself ("direct switching"), no L1.
    case directSwitches
    /// Exceptions L1 delivered into L2 (its #PFs, a #BP...): the switcher's event delivery.
    case injectedEvents
    /// Shadow entries L1 filled after a walk of L2's tables.
    case shadowFills
    /// Guest page-table entries L1 read (its walks, syncs).
    case guestPTEReads
    /// Accessed/dirty flags L1 set in L2's page-table entries.
    case guestADUpdates
    /// Writes to a write-protected L2 page table that L1 emulated.
    case emulatedPTEWrites
    /// Leaf shadow pages that went unsync (writable to L2) on a write fault.
    case unsyncs
    /// Unsync shadow pages synced again (at a CR3 load), and single entries synced at INVLPG.
    case resyncs
    /// CR3 loads: the new root from L1's cache of roots, or built anew.
    case rootCacheHits
    case rootBuilds
    /// INVLPGs L1 handled.
    case invlpgs
    /// Shadow pages zapped (write flooding, a full pool) and pages write-protected for shadowing.
    case shadowPageZaps
    case writeProtects
    /// TLB flushes L1 asked of L2's CPU.
    case tlbFlushes
    /// MMIO accesses L1 emulated after a shadow fault.
    case mmioEmulations
    /// L2 exits L1's VMM userspace completed (ports and MMIO of L1's device model), and port
    /// accesses L1's in-kernel device completed (0x4d0).
    case vmmUserspaceExits
    case kernelDeviceAccesses

    public var key: String {
        switch self {
        case .entries: "switcher_entries"
        case .directSwitches: "direct_switches"
        case .injectedEvents: "injected_events"
        case .shadowFills: "shadow_fills"
        case .guestPTEReads: "guest_pte_reads"
        case .guestADUpdates: "guest_ad_updates"
        case .emulatedPTEWrites: "emulated_pte_writes"
        case .unsyncs: "shadow_unsyncs"
        case .resyncs: "shadow_resyncs"
        case .rootCacheHits: "root_cache_hits"
        case .rootBuilds: "root_builds"
        case .invlpgs: "invlpgs"
        case .shadowPageZaps: "shadow_page_zaps"
        case .writeProtects: "write_protects"
        case .tlbFlushes: "switcher_tlb_flushes"
        case .mmioEmulations: "mmio_emulations"
        case .vmmUserspaceExits: "l1_vmm_userspace_exits"
        case .kernelDeviceAccesses: "l1_kernel_device_accesses"
        }
    }
}
