import ABI

/// The control memfd (`ControlLayout`) seen through typed views: every page and table of the
/// layout has an accessor here, addressed by `ControlOffset` and bounds-checked once when the
/// view is made and again (a `precondition`, kept in release builds) on every indexed access.
/// Nothing above Transport computes a byte offset into control memory.
public struct ControlMemory: @unchecked Sendable {
    public let region: SharedRegion
    public let layout: ControlLayout

    /// A control region that holds the whole layout.
    public init(region: SharedRegion, layout: ControlLayout) {
        precondition(region.size >= layout.totalSize, "control region of \(region.size) bytes is smaller than its layout (\(layout.totalSize))")
        self.region = region
        self.layout = layout
    }

    /// A new control memfd for `layout`, with the magic written.
    public static func create(name: String, layout: ControlLayout) throws -> ControlMemory {
        let region = try SharedRegion(create: name, size: layout.totalSize)
        try region.store(ControlLayout.magic, at: ControlLayout.magicOffset.raw)
        try region.store(LaunchABI.version, at: ControlLayout.launchABIOffset.raw)
        return ControlMemory(region: region, layout: layout)
    }

    /// The run page between `tier` (L1 or L2) and L0 on vCPU `vcpu`.
    public func runPage(_ tier: Tier, vcpu: Int) -> RunPageView {
        precondition(tier != .l0, "L0 has no run page of its own")
        return RunPageView(fixed: region, base: tier == .l1 ? layout.l1RunPage(vcpu) : layout.l2RunPage(vcpu))
    }

    public func handoff(vcpu: Int) -> Handoff { Handoff(region: region, base: layout.handoff(vcpu)) }

    public func shadowVMCS(vcpu: Int) -> VMCSImage { VMCSImage(fixed: region, base: layout.shadowVMCS(vcpu).raw) }
    /// L0's private vmcs12 copy when L1 uses an enlightened VMCS.
    public func cachedVMCS12(vcpu: Int) -> VMCSImage { VMCSImage(fixed: region, base: layout.cachedVMCS12(vcpu).raw) }

    /// Nonzero while L1's current VMCS has a shadow VMCS linked (`HandoffLayout.shadowVMCSActive`).
    public func shadowVMCSActive(vcpu: Int) -> SharedFlag {
        SharedFlag(region: region, at: layout.handoff(vcpu) + HandoffLayout.shadowVMCSActive)
    }

    /// vmcs02's MSR bitmap for L2 on vCPU `vcpu`: L0 writes it, L2's CPU reads it.
    public func l2MSRBitmap(vcpu: Int) -> MSRBitmapView {
        MSRBitmapView(bits: BitmapView(region: region, base: layout.l2MSRBitmap(vcpu), byteCount: pageSize))
    }

    /// The pass-through MSR values L2 reaches without an exit (`PassthroughMSRs`).
    public func l2PassthroughMSRs(vcpu: Int) -> PassthroughMSRValues {
        PassthroughMSRValues(table: U64TableView(region: region, base: layout.l2MSRValues(vcpu), count: UInt64(PassthroughMSRs.all.count)))
    }

    /// The CR0 and CR4 guest/host masks L2 runs with: index 0 CR0, 1 CR4.
    public func l2CRGuestHostMasks(vcpu: Int) -> U64TableView {
        U64TableView(region: region, base: layout.l2CRGuestHostMasks(vcpu), count: 2)
    }

    /// KVM's VMREAD / VMWRITE bitmaps: bit = field encoding bits 14:0, set = the access exits.
    public var vmreadBitmap: BitmapView { BitmapView(region: region, base: layout.vmreadBitmap, byteCount: pageSize) }
    public var vmwriteBitmap: BitmapView { BitmapView(region: region, base: layout.vmwriteBitmap, byteCount: pageSize) }

    /// One bit per L1 page below `ControlLayout.l1WriteProtectLimit`: set = L1's stores exit.
    public var l1WriteProtect: BitmapView {
        BitmapView(region: region, base: layout.l1WriteProtectBitmap, byteCount: ControlLayout.l1WriteProtectLimit / pageSize / 8)
    }

    public var ept02: EPT02TableView {
        EPT02TableView(entries: U64TableView(region: region, base: layout.ept02, count: layout.ept02Entries),
                       generation: SharedU64(region: region, at: ControlLayout.ept02GenerationOffset))
    }
}

/// A bitmap in shared memory. The range is checked when the view is made; each bit index is
/// checked with a `precondition`.
public struct BitmapView: @unchecked Sendable {
    let region: SharedRegion
    let base: UInt64
    public let byteCount: UInt64

    init(region: SharedRegion, base: ControlOffset, byteCount: UInt64) {
        precondition((try? region.check(base.raw, byteCount)) != nil, "bitmap \(base) +\(byteCount) outside its region")
        self.region = region
        self.base = base.raw
        self.byteCount = byteCount
    }

    public var bitCount: UInt64 { byteCount * 8 }

    public subscript(bit: UInt64) -> Bool {
        get {
            precondition(bit < bitCount, "bit \(bit) of a \(bitCount)-bit map")
            return region.unchecked(load: UInt8.self, at: base + bit / 8) & (1 << UInt8(bit % 8)) != 0
        }
        nonmutating set {
            precondition(bit < bitCount, "bit \(bit) of a \(bitCount)-bit map")
            let at = base + bit / 8
            let old = region.unchecked(load: UInt8.self, at: at)
            let mask = UInt8(1) << UInt8(bit % 8)
            region.unchecked(store: newValue ? old | mask : old & ~mask, at: at)
        }
    }

    /// Every bit set (or clear).
    public func setAll(_ on: Bool) {
        // In bounds: checked when the view was made.
        try! region.fill(on ? 0xFF : 0, at: base, count: byteCount)
    }
}

/// A VMX MSR bitmap (SDM 25.6.9) in shared memory.
public struct MSRBitmapView: @unchecked Sendable {
    public let bits: BitmapView

    /// Whether the access exits: a set bit, or an MSR outside both ranges (always exits).
    public func intercepts(_ msr: UInt32, write: Bool) -> Bool {
        guard let (byte, bit) = MSRBitmap.position(of: msr, write: write) else { return true }
        return bits[byte * 8 + UInt64(bit)]
    }

    /// Sets whether the access exits; MSRs outside both ranges always exit and are left alone.
    public func setIntercept(_ msr: UInt32, write: Bool, _ on: Bool) {
        guard let (byte, bit) = MSRBitmap.position(of: msr, write: write) else { return }
        bits[byte * 8 + UInt64(bit)] = on
    }
}

/// A table of little-endian u64s in shared memory (EPT02, pass-through MSR values).
public struct U64TableView: @unchecked Sendable {
    let region: SharedRegion
    let base: UInt64
    public let count: UInt64

    init(region: SharedRegion, base: ControlOffset, count: UInt64) {
        precondition(count <= UInt64.max / 8 && (try? region.check(base.raw, count * 8)) != nil, "table \(base) x\(count) outside its region")
        self.region = region
        self.base = base.raw
        self.count = count
    }

    public subscript(index: UInt64) -> UInt64 {
        get {
            precondition(index < count, "entry \(index) of a \(count)-entry table")
            return region.unchecked(load: UInt64.self, at: base + index * 8)
        }
        nonmutating set {
            precondition(index < count, "entry \(index) of a \(count)-entry table")
            region.unchecked(store: newValue, at: base + index * 8)
        }
    }

    /// Every entry 0.
    public func zeroAll() {
        // In bounds: checked when the view was made.
        try! region.fill(0, at: base, count: count * 8)
    }
}

/// One u64 word in shared memory at a fixed offset.
public struct SharedU64: @unchecked Sendable {
    let region: SharedRegion
    let offset: UInt64
    init(region: SharedRegion, at offset: ControlOffset) {
        precondition((try? region.check(offset.raw, 8)) != nil, "word \(offset) outside its region")
        self.region = region
        self.offset = offset.raw
    }
    public var value: UInt64 {
        get { region.unchecked(load: UInt64.self, at: offset) }
        nonmutating set { region.unchecked(store: newValue, at: offset) }
    }
}

/// One u32 flag word in shared memory at a fixed offset (nonzero = on).
public struct SharedFlag: @unchecked Sendable {
    let region: SharedRegion
    let offset: UInt64
    init(region: SharedRegion, at offset: ControlOffset) {
        precondition((try? region.check(offset.raw, 4)) != nil, "flag \(offset) outside its region")
        self.region = region
        self.offset = offset.raw
    }
    public var isOn: Bool {
        get { region.unchecked(load: UInt32.self, at: offset) != 0 }
        nonmutating set { region.unchecked(store: UInt32(newValue ? 1 : 0), at: offset) }
    }
}

/// The values of the MSRs L2 may reach without an exit, one u64 slot per `PassthroughMSRs` entry.
public struct PassthroughMSRValues: @unchecked Sendable {
    let table: U64TableView
    /// The MSR's value, or nil when it is not a pass-through-able MSR.
    public subscript(msr: UInt32) -> UInt64? {
        get { PassthroughMSRs.index(of: msr).map { table[$0] } }
        nonmutating set {
            guard let i = PassthroughMSRs.index(of: msr) else { return }
            table[i] = newValue ?? 0
        }
    }
}

/// EPT02 as both L0 and L2's MMU see it: one u64 per L2 page frame and the generation that
/// makes an entry current. `lookup` is the one translation both tiers use.
public struct EPT02TableView: @unchecked Sendable {
    public let entries: U64TableView
    public let generation: SharedU64

    /// Host offset of `gpa` if its entry is present in the current generation with every right
    /// in `access`; nil is an EPT violation.
    @inline(__always)
    public func lookup(_ gpa: L2GPA, access: UInt64) -> HostOffset? {
        let frame = gpa.pageNumber
        guard frame < entries.count else { return nil }
        let e = entries[frame]
        guard e & access == access, EPT02Entry.isPresent(e, generation: generation.value) else { return nil }
        return EPT02Entry.host(e) + gpa.offsetInPage
    }
}
