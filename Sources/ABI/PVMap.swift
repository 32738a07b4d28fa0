/// One L2 -> L1 mapping of the PV map: L2 GPAs `l2` land on L1 GPAs from `l1`, with EPT R/W/X
/// `permissions`.
public struct PVMapping: Equatable, Sendable {
    public var l2: AddressRange<L2GPA>
    public var l1: L1GPA
    public var permissions: UInt64

    public init(l2: AddressRange<L2GPA>, l1: L1GPA, permissions: UInt64) {
        self.l2 = l2
        self.l1 = l1
        self.permissions = permissions
    }

    /// The L1 GPA an L2 GPA inside this mapping lands on.
    public func l1Address(for gpa: L2GPA) -> L1GPA? {
        guard let off = gpa.offset(from: l2.start), off < l2.length else { return nil }
        return l1.adding(off)
    }
    /// The L1 memory the mapping points at (validated not to wrap when it was made).
    public var l1Range: AddressRange<L1GPA> { AddressRange(start: l1, length: l2.length)! }
    /// The L2 GPA that lands on `gpa`, if `gpa` is inside the mapping's L1 memory.
    public func l2Address(for gpa: L1GPA) -> L2GPA? {
        guard let off = gpa.offset(from: l1), off < l2.length else { return nil }
        return l2.start.adding(off)
    }
}

/// The PV map, one interval map for both sides of the ABI: L0's record of what L1 mapped (it
/// never reads L1's page tables on this path; this and the EPT02 it installs from it is all
/// there is) and the PV L1's own record of what it asked for. Non-overlapping L2 ranges, sorted
/// by start, adjacent compatible ranges merged (so mapping a region page by page still costs
/// one entry).
public struct PVMap: Sendable, Equatable {
    public private(set) var mappings: [PVMapping] = []
    /// L0 keeps at most this many ranges for one L1 (KVM bounds memslots the same way, at 32,767
    /// per address space). A map adds at most one range, plus one if it replaces the middle of a
    /// range (a split); an unmap adds one only if it punches a hole in a range. L0 refuses with
    /// E2BIG a call whose worst case passes the bound, so a full map can still shrink.
    public static let maxMappings = 65_536

    /// How many ranges the map gains when `r` is cleared: +1 for a hole strictly inside one
    /// range, -1 for each range `r` covers whole (ranges it only trims stay).
    public func change(clearing r: AddressRange<L2GPA>) -> Int {
        let touched = overlapping(r)
        if touched.count == 1, touched[0].l2.start < r.start, r.end < touched[0].l2.end { return 1 }
        return -touched.filter { r.start <= $0.l2.start && $0.l2.end <= r.end }.count
    }

    /// Whether the map can take `added` more ranges.
    public func hasRoom(for added: Int) -> Bool { added <= Self.maxMappings - mappings.count }
    public init() {}

    /// Index of the first mapping that ends after `gpa` (binary search).
    func firstEndingAfter(_ gpa: L2GPA) -> Int {
        var lo = 0, hi = mappings.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if mappings[mid].l2.end <= gpa { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    public func overlapping(_ r: AddressRange<L2GPA>) -> [PVMapping] {
        var out: [PVMapping] = []
        var i = firstEndingAfter(r.start)
        while i < mappings.count, mappings[i].l2.start < r.end {
            if mappings[i].l2.overlaps(r) { out.append(mappings[i]) }
            i += 1
        }
        return out
    }

    public func lookup(_ gpa: L2GPA) -> PVMapping? {
        let i = firstEndingAfter(gpa)
        return i < mappings.count && mappings[i].l2.contains(gpa) ? mappings[i] : nil
    }

    /// `b` continues `a` in both address spaces with the same rights.
    static func continues(_ a: PVMapping, _ b: PVMapping) -> Bool {
        a.l2.end == b.l2.start && a.permissions == b.permissions && a.l1.adding(a.l2.length) == b.l1
    }

    /// Records a mapping, cutting whatever it overlaps (the hypercall's `replace` flag) and
    /// merging it with the neighbours it continues.
    public mutating func record(_ m: PVMapping) {
        remove(m.l2)
        insert(m)
    }

    /// Inserts a mapping known not to overlap any other, merging with its neighbours.
    public mutating func insert(_ m: PVMapping) {
        var m = m
        var i = firstEndingAfter(m.l2.start)
        if i > 0, Self.continues(mappings[i - 1], m) {
            let prev = mappings.remove(at: i - 1)
            m = PVMapping(l2: AddressRange(start: prev.l2.start, length: prev.l2.length + m.l2.length)!, l1: prev.l1,
                          permissions: m.permissions)
            i -= 1
        }
        if i < mappings.count, Self.continues(m, mappings[i]) {
            let next = mappings.remove(at: i)
            m = PVMapping(l2: AddressRange(start: m.l2.start, length: m.l2.length + next.l2.length)!, l1: m.l1,
                          permissions: m.permissions)
        }
        mappings.insert(m, at: i)
    }

    /// Removes [r.start, r.end) from every mapping, splitting the ones it cuts.
    /// Returns the number of bytes that were mapped.
    @discardableResult
    public mutating func remove(_ r: AddressRange<L2GPA>) -> UInt64 {
        let first = firstEndingAfter(r.start)
        var last = first
        while last < mappings.count, mappings[last].l2.start < r.end { last += 1 }
        guard first < last else { return 0 }
        var replacement: [PVMapping] = []
        var removed: UInt64 = 0
        for m in mappings[first..<last] {
            guard let cut = m.l2.intersection(r) else { continue }
            removed += cut.length
            if let before = cut.start.offset(from: m.l2.start), before > 0 {
                replacement.append(PVMapping(l2: AddressRange(start: m.l2.start, length: before)!, l1: m.l1, permissions: m.permissions))
            }
            if let after = m.l2.end.offset(from: cut.end), after > 0 {
                replacement.append(PVMapping(l2: AddressRange(start: cut.end, length: after)!,
                                             l1: m.l1Address(for: cut.end)!, permissions: m.permissions))
            }
        }
        mappings.replaceSubrange(first..<last, with: replacement)
        return removed
    }
}
