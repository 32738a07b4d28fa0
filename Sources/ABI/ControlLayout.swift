// Layout of L0's control memory: L0's own memory, never part of any guest's RAM, split by who
// may write it (docs/architecture.md, "Least privilege"). Each region is its own memfd (the
// private one is anonymous memory), so a child is handed only the regions its tier needs and
// cannot map the rest:
//
//   region       L0   L1   L2   per vCPU i                          then
//   l1Exchange   rw   rw   -    handoff lane | L1 run page |         -
//                               shadow VMCS
//   l2Exchange   rw   -    rw   handoff lane | L2 run page |         -
//                               pass-through MSR values, L2's event counters
//   l1Tables     rw   r    -    (page 0: header) shadow-VMCS-active  VMREAD bitmap | VMWRITE bitmap |
//                               flag                                 L1 write-protect bitmap (32 pages)
//   l2Tables     rw   -    r    (page 0: header) L2 MSR bitmap |     EPT02 (one u64 per L2 page frame)
//                               CR0/CR4 guest/host masks
//   l0Private    rw   -    -    cached vmcs12 (eVMCS path)           -
//
// The tables regions are sealed F_SEAL_FUTURE_WRITE once L0 has mapped them: a child can map
// them only read-only and never make that mapping writable. Every region is sealed against
// shrinking, so no child can truncate memory under L0 (a SIGBUS in L0).

/// Which of L0's control regions a piece of state lives in.
public enum ControlRegion: String, CaseIterable, Sendable {
    case l1Exchange, l2Exchange, l1Tables, l2Tables, l0Private

    /// The exchange region a child tier writes with L0, and the tables region it reads.
    public static func exchange(of tier: Tier) -> ControlRegion {
        precondition(tier != .l0, "L0 has no exchange region of its own")
        return tier == .l1 ? .l1Exchange : .l2Exchange
    }
    public static func tables(of tier: Tier) -> ControlRegion {
        precondition(tier != .l0, "L0 has no tables region of its own")
        return tier == .l1 ? .l1Tables : .l2Tables
    }

    /// The child tier that maps this region, and whether it may write it (nil: L0 only).
    public var mappedBy: (tier: Tier, writable: Bool)? {
        switch self {
        case .l1Exchange: (.l1, true)
        case .l2Exchange: (.l2, true)
        case .l1Tables: (.l1, false)
        case .l2Tables: (.l2, false)
        case .l0Private: nil
        }
    }
}

public struct ControlLayout: Sendable, Equatable {
    public let vcpuCount: Int
    /// L2 GPAs below this can be mapped (the EPT02 table covers them).
    public let l2AddressLimit: UInt64

    public init(vcpuCount: Int, l2AddressLimit: UInt64) {
        self.vcpuCount = vcpuCount
        self.l2AddressLimit = l2AddressLimit
    }

    // MARK: the tables header (page 0 of l1Tables and of l2Tables)

    public static let magic: UInt64 = 0x3130_4C5F_4D56_5000  // "\0PVM_L01"
    public static let magicOffset = ControlOffset(0)
    /// u64, l2Tables: the EPT02 generation. An entry tagged with another generation is not
    /// present: a memslot "fast zap" bumps it to invalidate every entry at once (KVM's mmu_valid_gen).
    public static let ept02GenerationOffset = ControlOffset(8)
    /// u64: `LaunchABI.version` of the L0 that made this memory; a child checks it with the magic.
    public static let launchABIOffset = ControlOffset(16)

    // MARK: l1Exchange and l2Exchange: three pages per vCPU

    static let exchangePagesPerVCPU: UInt64 = 3
    func exchangeBase(_ i: Int) -> ControlOffset {
        precondition(i >= 0 && i < vcpuCount, "vCPU \(i) of \(vcpuCount)")
        return ControlOffset(pageSize * UInt64(i) * Self.exchangePagesPerVCPU)
    }
    /// The handoff lane of vCPU `i` between L0 and the exchange region's tier.
    public func handoff(_ i: Int) -> ControlOffset { exchangeBase(i) }
    /// The run page of vCPU `i` between L0 and the exchange region's tier.
    public func runPage(_ i: Int) -> ControlOffset { exchangeBase(i) + pageSize }
    /// l1Exchange: the shadow VMCS L1's VMREAD/VMWRITE reach without an exit.
    public func shadowVMCS(_ i: Int) -> ControlOffset { exchangeBase(i) + 2 * pageSize }
    /// l2Exchange: L2's pass-through MSR values (what the hardware MSRs hold for L2).
    public func l2MSRValues(_ i: Int) -> ControlOffset { exchangeBase(i) + 2 * pageSize }
    /// l2Exchange: what L2's CPU counts of its own work that no exit shows (`L2EventCounter`),
    /// as a PMU would; in the second half of the MSR-values page.
    public func l2EventCounters(_ i: Int) -> ControlOffset { l2MSRValues(i) + pageSize / 2 }
    public var exchangeSize: UInt64 { pageSize * UInt64(vcpuCount) * Self.exchangePagesPerVCPU }

    // MARK: l1Tables

    /// u32: nonzero while L1's current VMCS has a shadow VMCS linked (vmcs01's VMCS link
    /// pointer valid and "VMCS shadowing" on): L1's VMREAD/VMWRITE then consult the bitmaps.
    public func shadowVMCSActive(_ i: Int) -> ControlOffset {
        precondition(i >= 0 && i < vcpuCount, "vCPU \(i) of \(vcpuCount)")
        return ControlOffset(pageSize * (1 + UInt64(i)))
    }
    public var vmreadBitmap: ControlOffset { ControlOffset(pageSize * (1 + UInt64(vcpuCount))) }
    public var vmwriteBitmap: ControlOffset { vmreadBitmap + pageSize }
    /// L1 GPAs below this can be write-protected (one bit per page).
    public static let l1WriteProtectLimit: UInt64 = 4 << 30
    public var l1WriteProtectBitmap: ControlOffset { vmwriteBitmap + pageSize }
    public var l1TablesSize: UInt64 { (l1WriteProtectBitmap + Self.l1WriteProtectLimit / pageSize / 8).raw }

    // MARK: l2Tables

    static let l2TablePagesPerVCPU: UInt64 = 2
    func l2TablesBase(_ i: Int) -> ControlOffset {
        precondition(i >= 0 && i < vcpuCount, "vCPU \(i) of \(vcpuCount)")
        return ControlOffset(pageSize * (1 + UInt64(i) * Self.l2TablePagesPerVCPU))
    }
    /// L2's MSR bitmap (vmcs02's: L0 writes it, L2's CPU reads it).
    public func l2MSRBitmap(_ i: Int) -> ControlOffset { l2TablesBase(i) }
    /// u64 x 2: the CR0 and CR4 guest/host masks L2 runs with (vmcs02's, or a one-level
    /// VMCS's): L2's CPU exits on a MOV to CR0/CR4 only for bits set here.
    public func l2CRGuestHostMasks(_ i: Int) -> ControlOffset { l2TablesBase(i) + pageSize }
    public var ept02: ControlOffset { ControlOffset(pageSize * (1 + UInt64(vcpuCount) * Self.l2TablePagesPerVCPU)) }
    public var ept02Entries: UInt64 { l2AddressLimit >> pageShift }
    public var l2TablesSize: UInt64 { (ept02 + ept02Entries * 8).raw }

    // MARK: l0Private

    /// L0's private vmcs12 copy when L1 uses an enlightened VMCS.
    public func cachedVMCS12(_ i: Int) -> ControlOffset {
        precondition(i >= 0 && i < vcpuCount, "vCPU \(i) of \(vcpuCount)")
        return ControlOffset(pageSize * UInt64(i))
    }
    public var l0PrivateSize: UInt64 { pageSize * UInt64(vcpuCount) }

    /// The bytes `region` needs.
    public func size(of region: ControlRegion) -> UInt64 {
        switch region {
        case .l1Exchange, .l2Exchange: exchangeSize
        case .l1Tables: l1TablesSize
        case .l2Tables: l2TablesSize
        case .l0Private: l0PrivateSize
        }
    }
}

/// A handoff lane (the first page of a vCPU in an exchange region): whose turn it is between L0
/// and that region's tier, and who sleeps waiting for it. Each child tier has its own lane, so
/// L2 cannot hand L1 a turn or stop it: only L0 and the lane's tier ever write a lane.
public enum HandoffLayout {
    /// u32: the `Tier` raw value that may run (L0 or the lane's tier), or `stopValue`.
    public static let turn: UInt64 = 0
    /// u32 per tier, each on its own cache line: nonzero while that tier sleeps in futex_wait.
    public static func sleeping(_ t: Tier) -> UInt64 { 64 * (1 + UInt64(t.rawValue)) }
    /// Turn value that tells the lane's tier to stop.
    public static let stopValue: UInt32 = 0xDEAD
}

/// An EPT02 entry as L2's MMU reads it: EPT R/W/X in bits 2:0, host page offset in 51:12, and
/// the generation it was made in, in bits 62:52 (bits EPT ignores). Present means R/W/X set and
/// the current generation.
public enum EPT02Entry {
    public static let generationShift: UInt64 = 52
    public static let generationMask: UInt64 = 0x7FF
    public static func make(host: HostOffset, permissions: UInt64, generation: UInt64) -> UInt64 {
        (host.raw & EPT.addressMask) | (permissions & EPT.rwxMask) | (generation & generationMask) << generationShift
    }
    public static func isPresent(_ e: UInt64, generation: UInt64) -> Bool {
        e & EPT.rwxMask != 0 && (e >> generationShift) & generationMask == generation & generationMask
    }
    public static func host(_ e: UInt64) -> HostOffset { HostOffset(e & EPT.addressMask) }
}

/// The MSRs L0 can let L2 access without an exit (KVM passes these through to its guests), and
/// where their values live in the pass-through MSR page. L2 accesses one without exiting only
/// where L2's MSR bitmap has the bit clear: on nvmx where L1's bitmap passes it through too, on
/// pv where L1's MSR policy says `passthrough`.
public enum PassthroughMSRs {
    public static let all: [UInt32] = [0xC000_0100, 0xC000_0101, 0xC000_0102]   // FS_BASE, GS_BASE, KERNEL_GS_BASE
    /// The MSR's slot in the pass-through value table, or nil when L0 never passes it through.
    public static func index(of msr: UInt32) -> UInt64? { all.firstIndex(of: msr).map { UInt64($0) } }
    public static func contains(_ msr: UInt32) -> Bool { all.contains(msr) }
}

/// A VMX MSR bitmap (SDM 25.6.9): 4 KiB, read-low at 0x000, read-high 0x400, write-low 0x800,
/// write-high 0xC00, covering MSRs 0..0x1FFF and 0xC0000000..0xC0001FFF. A set bit exits.
public enum MSRBitmap {
    /// Byte offset and bit of an MSR access in the bitmap; nil for MSRs outside both ranges.
    public static func position(of msr: UInt32, write: Bool) -> (byte: UInt64, bit: UInt8)? {
        var base: UInt64 = write ? 0x800 : 0
        let index: UInt64
        if msr <= 0x1FFF { index = UInt64(msr) }
        else if msr >= 0xC000_0000 && msr <= 0xC000_1FFF { index = UInt64(msr - 0xC000_0000); base += 0x400 }
        else { return nil }
        return (base + index / 8, UInt8(index % 8))
    }
}

/// The version of everything L0 and its child tiers must agree on: the launch spec's keys, this
/// control layout, the run page and handoff. Bump it with any change to them; a child whose
/// version (or build) differs from L0's refuses to start.
public enum LaunchABI {
    public static let version: UInt64 = 5
}

/// What L2's CPU counts of its own work, on every path, as a PMU counts events: the cost model
/// prices it (the same work costs the same natively; what differs by path is what else it
/// takes). L0 reads the counters at the harness's window edges; L2 writes them, so they are L2's
/// claims, clamped on use.
public enum L2EventCounter: Int, CaseIterable, Sendable {
    /// SYSCALL/SYSRET round trips.
    case syscalls
    /// Exceptions delivered to L2's handlers (#PF, #BP...) and returned from (IRET).
    case exceptions
    /// TLB misses while L2's paging is on: a walk of L2's tables through EPT02 (two
    /// dimensions) on the EPT paths, a walk of L1's shadow tables (one dimension) on pvm-rfc.
    case tlbMisses
    /// INVLPGs and CR3 loads L2 executed (on pvm-rfc they also exit to L1).
    case invlpgs
    case cr3Loads

    public var key: String {
        switch self {
        case .syscalls: "l2_syscalls"
        case .exceptions: "l2_exceptions"
        case .tlbMisses: "l2_tlb_misses"
        case .invlpgs: "l2_invlpgs"
        case .cr3Loads: "l2_cr3_loads"
        }
    }
}
