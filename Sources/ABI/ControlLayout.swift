// Layout of the control memfd: L0's own memory that the tiers share for control, never part
// of any guest's RAM. Every tier maps it; each only touches what its "hardware" would.
//
//   page 0                 header (magic, EPT02 generation, launch ABI version)
//   per vCPU i, 7 pages:   handoff word | L2<->L0 run page | L1<->L0 run page | shadow VMCS |
//                          cached vmcs12 (L0's private copy when L1 uses an eVMCS) |
//                          L2's MSR bitmap (vmcs02's: L0 writes it, L2's CPU reads it) |
//                          L2's pass-through MSR values (what the hardware MSRs hold for L2)
//   2 pages                VMREAD bitmap | VMWRITE bitmap   (VMCS shadowing, set by L0)
//   32 pages               L1 write-protect bitmap: one bit per L1 page below 4 GiB; a set bit
//                          makes L1's stores to that page exit to L0 (EPT12 pages L0 shadows)
//   EPT02                  one u64 per L2 page frame (L0 writes, L2's MMU reads)

public struct ControlLayout: Sendable, Equatable {
    public let vcpuCount: Int
    /// L2 GPAs below this can be mapped (the EPT02 table covers them).
    public let l2AddressLimit: UInt64

    public init(vcpuCount: Int, l2AddressLimit: UInt64) {
        self.vcpuCount = vcpuCount
        self.l2AddressLimit = l2AddressLimit
    }

    public static let magic: UInt64 = 0x3130_4C5F_4D56_5000  // "\0PVM_L01"
    public static let magicOffset = ControlOffset(0)
    /// u64: the EPT02 generation. An entry tagged with another generation is not present: a
    /// memslot "fast zap" bumps it to invalidate every entry at once (KVM's mmu_valid_gen).
    public static let ept02GenerationOffset = ControlOffset(8)
    /// u64: `LaunchABI.version` of the L0 that made this memory; a child checks it with the magic.
    public static let launchABIOffset = ControlOffset(16)

    static let pagesPerVCPU: UInt64 = 7
    public func vcpuBase(_ i: Int) -> ControlOffset { ControlOffset(pageSize * (1 + UInt64(i) * Self.pagesPerVCPU)) }
    public func handoff(_ i: Int) -> ControlOffset { vcpuBase(i) }
    public func l2RunPage(_ i: Int) -> ControlOffset { vcpuBase(i) + pageSize }
    public func l1RunPage(_ i: Int) -> ControlOffset { vcpuBase(i) + 2 * pageSize }
    public func shadowVMCS(_ i: Int) -> ControlOffset { vcpuBase(i) + 3 * pageSize }
    public func cachedVMCS12(_ i: Int) -> ControlOffset { vcpuBase(i) + 4 * pageSize }
    public func l2MSRBitmap(_ i: Int) -> ControlOffset { vcpuBase(i) + 5 * pageSize }
    public func l2MSRValues(_ i: Int) -> ControlOffset { vcpuBase(i) + 6 * pageSize }
    /// u64 x 2 in the same page: the CR0 and CR4 guest/host masks L2 runs with (vmcs02's, or a
    /// one-level VMCS's): L2's CPU exits on a MOV to CR0/CR4 only for bits set here.
    public func l2CRGuestHostMasks(_ i: Int) -> ControlOffset { vcpuBase(i) + 6 * pageSize + 0x800 }
    public var vmreadBitmap: ControlOffset { vcpuBase(vcpuCount) }
    public var vmwriteBitmap: ControlOffset { vmreadBitmap + pageSize }
    /// L1 GPAs below this can be write-protected (one bit per page).
    public static let l1WriteProtectLimit: UInt64 = 4 << 30
    public var l1WriteProtectBitmap: ControlOffset { vmwriteBitmap + pageSize }
    public var ept02: ControlOffset { l1WriteProtectBitmap + Self.l1WriteProtectLimit / pageSize / 8 }
    public var ept02Entries: UInt64 { l2AddressLimit >> pageShift }
    public var totalSize: UInt64 { (ept02 + ept02Entries * 8).raw }
}

/// The handoff page: whose turn it is on this vCPU, and who sleeps waiting for it.
public enum HandoffLayout {
    /// u32: the `Tier` raw value that may run, or `stopValue`.
    public static let turn: UInt64 = 0
    /// u32 per tier, each on its own cache line: nonzero while that tier sleeps in futex_wait.
    public static func sleeping(_ t: Tier) -> UInt64 { 64 * (1 + UInt64(t.rawValue)) }
    /// Turn value that tells every tier of this vCPU to stop.
    public static let stopValue: UInt32 = 0xDEAD
    /// u32: nonzero while L1's current VMCS has a shadow VMCS linked (vmcs01's VMCS link
    /// pointer valid and "VMCS shadowing" on): L1's VMREAD/VMWRITE then consult the bitmaps.
    public static let shadowVMCSActive: UInt64 = 0x100
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
    public static let version: UInt64 = 2
}
