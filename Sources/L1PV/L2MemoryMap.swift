import ABI

/// The PV L1's own record of how L2's memory is mapped: a sorted list of ranges. It is all L1
/// keeps; no EPT tables are built on this path.
public struct L2MemoryMap: Sendable {
    public struct Range: Equatable, Sendable {
        public var l2: L2GPA
        public var length: UInt64
        public var l1: L1GPA
        public var permissions: UInt64
        public func contains(_ gpa: L2GPA) -> Bool { gpa >= l2 && gpa.raw - l2.raw < length }
    }
    public private(set) var ranges: [Range] = []
    public init() {}

    /// Index of the first range that ends after `gpa` (binary search).
    func firstEndingAfter(_ gpa: L2GPA) -> Int {
        var lo = 0, hi = ranges.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if ranges[mid].l2.raw + ranges[mid].length <= gpa.raw { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    public func lookup(_ gpa: L2GPA) -> Range? {
        let i = firstEndingAfter(gpa)
        return i < ranges.count && ranges[i].contains(gpa) ? ranges[i] : nil
    }

    /// Forgets [gpa, +length).
    public mutating func remove(_ gpa: L2GPA, length: UInt64) {
        guard let i = ranges.firstIndex(where: { $0.contains(gpa) }) else { return }
        let m = ranges.remove(at: i)
        var pieces: [Range] = []
        if m.l2 < gpa { pieces.append(Range(l2: m.l2, length: gpa.raw - m.l2.raw, l1: m.l1, permissions: m.permissions)) }
        let end = gpa.raw + length, mEnd = m.l2.raw + m.length
        if end < mEnd { pieces.append(Range(l2: L2GPA(end), length: mEnd - end, l1: L1GPA(m.l1.raw + (end - m.l2.raw)), permissions: m.permissions)) }
        ranges.insert(contentsOf: pieces, at: i)
    }

    static func continues(_ a: Range, _ b: Range) -> Bool {
        a.l2.raw + a.length == b.l2.raw && a.l1.raw + a.length == b.l1.raw && a.permissions == b.permissions
    }

    /// Records a mapping, cutting whatever it overlaps (as L0 does with the replace flag) and
    /// merging it with neighbours it continues.
    public mutating func record(_ r: Range) {
        let end = r.l2.raw + r.length
        let first = firstEndingAfter(r.l2)
        var last = first
        while last < ranges.count, ranges[last].l2.raw < end { last += 1 }
        var middle: [Range] = []
        for m in ranges[first..<last] {
            let mEnd = m.l2.raw + m.length
            if m.l2.raw < r.l2.raw {
                middle.append(Range(l2: m.l2, length: r.l2.raw - m.l2.raw, l1: m.l1, permissions: m.permissions))
            }
            if end < mEnd {
                middle.append(Range(l2: L2GPA(end), length: mEnd - end, l1: L1GPA(m.l1.raw + (end - m.l2.raw)), permissions: m.permissions))
            }
        }
        var merged = r
        var at = middle.firstIndex { $0.l2.raw > r.l2.raw } ?? middle.count
        middle.insert(merged, at: at)
        ranges.replaceSubrange(first..<last, with: middle)
        at += first
        if at > 0, Self.continues(ranges[at - 1], merged) {
            merged = Range(l2: ranges[at - 1].l2, length: ranges[at - 1].length + merged.length, l1: ranges[at - 1].l1,
                           permissions: merged.permissions)
            ranges.remove(at: at)
            at -= 1
            ranges[at] = merged
        }
        if at + 1 < ranges.count, Self.continues(merged, ranges[at + 1]) {
            ranges[at] = Range(l2: merged.l2, length: merged.length + ranges[at + 1].length, l1: merged.l1,
                               permissions: merged.permissions)
            ranges.remove(at: at + 1)
        }
    }
}
