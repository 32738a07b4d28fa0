import ABI

/// L0's control memory (`ControlLayout`): one region per set of tiers that may touch it, each
/// its own memfd, seen through typed views. Every page and table of the layout has an accessor
/// here, addressed by `ControlOffset` within its region and bounds-checked once when the view is
/// made and again (a `precondition`, kept in release builds) on every indexed access. Nothing
/// above Transport computes a byte offset into control memory.
///
/// L0 holds all of it (this type); a child tier holds only its exchange and tables regions,
/// through `L1ControlView` or `L2ControlView`.
public struct ControlMemory: @unchecked Sendable {
    public let layout: ControlLayout
    public let l1Exchange: SharedRegion, l2Exchange: SharedRegion
    public let l1Tables: SharedRegion, l2Tables: SharedRegion
    public let l0Private: SharedRegion

    public init(layout: ControlLayout, l1Exchange: SharedRegion, l2Exchange: SharedRegion,
                l1Tables: SharedRegion, l2Tables: SharedRegion, l0Private: SharedRegion) {
        for (region, r) in [(ControlRegion.l1Exchange, l1Exchange), (.l2Exchange, l2Exchange), (.l1Tables, l1Tables),
                            (.l2Tables, l2Tables), (.l0Private, l0Private)] {
            precondition(r.size >= layout.size(of: region), "\(region) of \(r.size) bytes is smaller than its layout (\(layout.size(of: region)))")
        }
        self.layout = layout
        self.l1Exchange = l1Exchange
        self.l2Exchange = l2Exchange
        self.l1Tables = l1Tables
        self.l2Tables = l2Tables
        self.l0Private = l0Private
    }

    /// The memfds a stack shares with its children (the private region is anonymous memory),
    /// with the tables' headers written. Call `sealForChildren` once L0 has mapped and filled them.
    public static func create(layout: ControlLayout) throws -> ControlMemory {
        func memfd(_ r: ControlRegion) throws -> SharedRegion {
            try SharedRegion(create: "pvm-\(r.rawValue)", size: layout.size(of: r))
        }
        let memory = ControlMemory(layout: layout, l1Exchange: try memfd(.l1Exchange), l2Exchange: try memfd(.l2Exchange),
                                   l1Tables: try memfd(.l1Tables), l2Tables: try memfd(.l2Tables),
                                   l0Private: try SharedRegion(anonymous: layout.l0PrivateSize))
        try memory.writeHeaders()
        return memory
    }

    /// The same layout in private anonymous memory: for in-process handler tests and tools
    /// (fuzzing, the memslot suite) that need L0's control state without sharing it.
    public static func anonymous(layout: ControlLayout) throws -> ControlMemory {
        func anon(_ r: ControlRegion) throws -> SharedRegion { try SharedRegion(anonymous: layout.size(of: r)) }
        let memory = ControlMemory(layout: layout, l1Exchange: try anon(.l1Exchange), l2Exchange: try anon(.l2Exchange),
                                   l1Tables: try anon(.l1Tables), l2Tables: try anon(.l2Tables), l0Private: try anon(.l0Private))
        try memory.writeHeaders()
        return memory
    }

    private func writeHeaders() throws {
        for tables in [l1Tables, l2Tables] {
            try tables.store(ControlLayout.magic, at: ControlLayout.magicOffset.raw)
            try tables.store(LaunchABI.version, at: ControlLayout.launchABIOffset.raw)
        }
    }

    /// Seals every shared region against shrinking (a child truncating a memfd would make L0's
    /// next access a SIGBUS), and the tables regions against any new writable mapping: from now
    /// on only L0's own mapping can write them.
    public func sealForChildren() throws {
        for r in [ControlRegion.l1Exchange, .l2Exchange, .l1Tables, .l2Tables] {
            try region(r).seal(name: "pvm-\(r.rawValue)", futureWrite: r.mappedBy?.writable == false)
        }
    }

    public func region(_ r: ControlRegion) -> SharedRegion {
        switch r {
        case .l1Exchange: l1Exchange
        case .l2Exchange: l2Exchange
        case .l1Tables: l1Tables
        case .l2Tables: l2Tables
        case .l0Private: l0Private
        }
    }

    /// The memfds a child tier is handed, in `TierLaunch`'s descriptor order: its exchange
    /// region, then its tables region.
    public func descriptors(for tier: Tier) -> [Int32] {
        [region(.exchange(of: tier)).fd, region(.tables(of: tier)).fd]
    }

    public func l1View(vcpu: Int) -> L1ControlView { L1ControlView(exchange: l1Exchange, tables: l1Tables, layout: layout, vcpu: vcpu) }
    public func l2View(vcpu: Int) -> L2ControlView { L2ControlView(exchange: l2Exchange, tables: l2Tables, layout: layout, vcpu: vcpu) }

    /// The run page between `tier` (L1 or L2) and L0 on vCPU `vcpu`.
    public func runPage(_ tier: Tier, vcpu: Int) -> RunPageView {
        precondition(tier != .l0, "L0 has no run page of its own")
        return tier == .l1 ? l1View(vcpu: vcpu).runPage : l2View(vcpu: vcpu).runPage
    }

    /// The handoff lane between L0 and `tier` (L1 or L2) on vCPU `vcpu`.
    public func handoff(_ tier: Tier, vcpu: Int) -> Handoff {
        precondition(tier != .l0, "L0 has no lane of its own")
        return tier == .l1 ? l1View(vcpu: vcpu).handoff : l2View(vcpu: vcpu).handoff
    }

    public func shadowVMCS(vcpu: Int) -> VMCSImage { l1View(vcpu: vcpu).shadowVMCS }
    /// L0's private vmcs12 copy when L1 uses an enlightened VMCS (no tier can see it).
    public func cachedVMCS12(vcpu: Int) -> VMCSImage { VMCSImage(fixed: l0Private, base: layout.cachedVMCS12(vcpu).raw) }
    public func shadowVMCSActive(vcpu: Int) -> SharedFlag { l1View(vcpu: vcpu).shadowVMCSActive }
    public var vmreadBitmap: BitmapView { l1View(vcpu: 0).vmreadBitmap }
    public var vmwriteBitmap: BitmapView { l1View(vcpu: 0).vmwriteBitmap }
    public var l1WriteProtect: BitmapView { l1View(vcpu: 0).l1WriteProtect }

    public func l2MSRBitmap(vcpu: Int) -> MSRBitmapView { l2View(vcpu: vcpu).msrBitmap }
    public func l2PassthroughMSRs(vcpu: Int) -> PassthroughMSRValues { l2View(vcpu: vcpu).passthroughMSRs }
    public func l2CRGuestHostMasks(vcpu: Int) -> U64TableView { l2View(vcpu: vcpu).crGuestHostMasks }
    public func l2EventCounters(vcpu: Int) -> U64TableView { l2View(vcpu: vcpu).events }
    public var ept02: EPT02TableView { l2View(vcpu: 0).ept02 }
}

/// What L1's CPU sees of L0's control memory on one vCPU: its lane and run page and the shadow
/// VMCS (read-write), and L0's tables for it (read-only in the L1 process).
public struct L1ControlView: @unchecked Sendable {
    public let handoff: Handoff
    public let runPage: RunPageView
    public let shadowVMCS: VMCSImage
    /// Nonzero while L1's current VMCS has a shadow VMCS linked.
    public let shadowVMCSActive: SharedFlag
    /// KVM's VMREAD / VMWRITE bitmaps: bit = field encoding bits 14:0, set = the access exits.
    public let vmreadBitmap: BitmapView, vmwriteBitmap: BitmapView
    /// One bit per L1 page below `ControlLayout.l1WriteProtectLimit`: set = L1's stores exit.
    public let l1WriteProtect: BitmapView
    /// The tables region (for the probes of the programs that test L0's defences).
    public let tables: SharedRegion

    init(exchange: SharedRegion, tables: SharedRegion, layout: ControlLayout, vcpu: Int) {
        handoff = Handoff(region: exchange, base: layout.handoff(vcpu))
        runPage = RunPageView(fixed: exchange, base: layout.runPage(vcpu))
        shadowVMCS = VMCSImage(fixed: exchange, base: layout.shadowVMCS(vcpu).raw)
        shadowVMCSActive = SharedFlag(region: tables, at: layout.shadowVMCSActive(vcpu))
        vmreadBitmap = BitmapView(region: tables, base: layout.vmreadBitmap, byteCount: pageSize)
        vmwriteBitmap = BitmapView(region: tables, base: layout.vmwriteBitmap, byteCount: pageSize)
        l1WriteProtect = BitmapView(region: tables, base: layout.l1WriteProtectBitmap,
                                    byteCount: ControlLayout.l1WriteProtectLimit / pageSize / 8)
        self.tables = tables
    }
}

/// What L2's CPU sees of L0's control memory on one vCPU: its lane, run page and pass-through
/// MSR values (read-write), and vmcs02's bitmap, masks and EPT02 (read-only in the L2 process).
public struct L2ControlView: @unchecked Sendable {
    public let handoff: Handoff
    public let runPage: RunPageView
    /// The pass-through MSR values L2 reaches without an exit (`PassthroughMSRs`).
    public let passthroughMSRs: PassthroughMSRValues
    /// vmcs02's MSR bitmap for L2: L0 writes it, L2's CPU reads it.
    public let msrBitmap: MSRBitmapView
    /// The CR0 and CR4 guest/host masks L2 runs with: index 0 CR0, 1 CR4.
    public let crGuestHostMasks: U64TableView
    /// L2's event counters (`L2EventCounter`), which L2's CPU writes.
    public let events: U64TableView
    public let ept02: EPT02TableView
    /// The tables region (for the probes of the programs that test L0's defences).
    public let tables: SharedRegion

    init(exchange: SharedRegion, tables: SharedRegion, layout: ControlLayout, vcpu: Int) {
        handoff = Handoff(region: exchange, base: layout.handoff(vcpu))
        runPage = RunPageView(fixed: exchange, base: layout.runPage(vcpu))
        passthroughMSRs = PassthroughMSRValues(table: U64TableView(region: exchange, base: layout.l2MSRValues(vcpu),
                                                                   count: UInt64(PassthroughMSRs.all.count)))
        msrBitmap = MSRBitmapView(bits: BitmapView(region: tables, base: layout.l2MSRBitmap(vcpu), byteCount: pageSize))
        crGuestHostMasks = U64TableView(region: tables, base: layout.l2CRGuestHostMasks(vcpu), count: 2)
        events = U64TableView(region: exchange, base: layout.l2EventCounters(vcpu), count: UInt64(L2EventCounter.allCases.count))
        ept02 = EPT02TableView(entries: U64TableView(region: tables, base: layout.ept02, count: layout.ept02Entries),
                               generation: SharedU64(region: tables, at: ControlLayout.ept02GenerationOffset))
        self.tables = tables
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
