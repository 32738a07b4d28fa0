// One distinct type per address space, as rust-vmm's vm-memory does. There is deliberately no
// arithmetic between spaces: getting from one to another is a translation that can fail
// (a memslot lookup for L1 GPA -> host offset, EPT12 or the PV map for L2 GPA -> L1 GPA).

public let pageSize: UInt64 = 4096
public let pageShift: UInt64 = 12

/// Common behaviour of an address in one space. The associated values stay inside the space.
public protocol AddressSpaceValue: Hashable, Comparable, Sendable, CustomStringConvertible {
    var raw: UInt64 { get }
    init(_ raw: UInt64)
}

extension AddressSpaceValue {
    public static func < (a: Self, b: Self) -> Bool { a.raw < b.raw }
    public var isPageAligned: Bool { raw & (pageSize - 1) == 0 }
    public var pageBase: Self { Self(raw & ~(pageSize - 1)) }
    public var offsetInPage: UInt64 { raw & (pageSize - 1) }
    public var pageNumber: UInt64 { raw >> pageShift }
    /// The address `bytes` further on, or nil when that would wrap past 2^64.
    public func adding(_ bytes: UInt64) -> Self? {
        let (sum, overflow) = raw.addingReportingOverflow(bytes)
        return overflow ? nil : Self(sum)
    }
    /// Distance from `base` to self, within the same space; nil if self is below base.
    public func offset(from base: Self) -> UInt64? { raw >= base.raw ? raw - base.raw : nil }
    /// The first byte of page `n` of this space, or nil when no such page exists.
    public init?(pageNumber n: UInt64) {
        guard n <= UInt64.max >> pageShift else { return nil }
        self.init(n << pageShift)
    }
    /// The address `bytes` further on, for offsets L0 or a layout computed itself (a page of
    /// a range already checked, a field inside a page): wrapping past 2^64 is a bug and traps.
    /// A guest-given offset goes through `adding`, which fails instead.
    public static func + (a: Self, bytes: UInt64) -> Self {
        let (sum, overflow) = a.raw.addingReportingOverflow(bytes)
        precondition(!overflow, "\(a) + 0x\(String(bytes, radix: 16)) wraps past 2^64")
        return Self(sum)
    }
}

/// A guest-physical address as L1 sees its own memory.
public struct L1GPA: AddressSpaceValue {
    public let raw: UInt64
    public init(_ raw: UInt64) { self.raw = raw }
    public var description: String { "L1GPA(0x\(String(raw, radix: 16)))" }
}

/// A guest-virtual (linear) address of the nested guest L2: what its programs use once it has
/// page tables; L2's own 4-level tables translate it to an `L2GPA` (`PageWalk`).
public struct L2GVA: AddressSpaceValue {
    public let raw: UInt64
    public init(_ raw: UInt64) { self.raw = raw }
    public var description: String { "L2GVA(0x\(String(raw, radix: 16)))" }
    /// Bits 63:47 all equal (x86-64 with 4-level paging): otherwise any access is #GP.
    public var isCanonical: Bool { let top = raw >> 47; return top == 0 || top == 0x1_FFFF }
    /// Where L2's kernel reaches guest-physical `gpa`: its direct map is the identity (the
    /// guest programs' page tables build it so), the one place an L2 GPA becomes an L2 GVA.
    public init(directMap gpa: L2GPA) { self.raw = gpa.raw }
}

/// A guest-physical address of the nested guest L2.
public struct L2GPA: AddressSpaceValue {
    public let raw: UInt64
    public init(_ raw: UInt64) { self.raw = raw }
    public var description: String { "L2GPA(0x\(String(raw, radix: 16)))" }
}

/// A byte offset into L0's "host physical" memory (the memfd every tier maps).
public struct HostOffset: AddressSpaceValue {
    public let raw: UInt64
    public init(_ raw: UInt64) { self.raw = raw }
    public var description: String { "Host(0x\(String(raw, radix: 16)))" }
}

/// A byte offset into one of L0's control regions (`ControlLayout`, `ControlRegion`): L0's own
/// memory for run pages, handoff lanes, bitmaps and EPT02. Never a guest address.
public struct ControlOffset: AddressSpaceValue {
    public let raw: UInt64
    public init(_ raw: UInt64) { self.raw = raw }
    public var description: String { "Control(0x\(String(raw, radix: 16)))" }
}

/// A half-open range [start, start+length) inside one address space.
public struct AddressRange<Space: AddressSpaceValue>: Hashable, Sendable, CustomStringConvertible {
    public let start: Space
    public let length: UInt64
    /// nil when the range would wrap past 2^64.
    public init?(start: Space, length: UInt64) {
        guard start.adding(length) != nil else { return nil }
        self.start = start
        self.length = length
    }
    public var end: Space { Space(start.raw + length) }   // cannot overflow: checked at init
    public func contains(_ a: Space) -> Bool { a >= start && a.raw - start.raw < length }
    public func contains(_ r: AddressRange<Space>) -> Bool {
        r.start >= start && r.end <= end
    }
    public func overlaps(_ r: AddressRange<Space>) -> Bool {
        length > 0 && r.length > 0 && start < r.end && r.start < end
    }
    public var description: String { "[\(start), +0x\(String(length, radix: 16)))" }

    /// The part of self inside `r`, or nil when they do not overlap.
    public func intersection(_ r: AddressRange<Space>) -> AddressRange<Space>? {
        guard overlaps(r) else { return nil }
        let s = Swift.max(start, r.start), e = Swift.min(end, r.end)
        return AddressRange(start: s, length: e.raw - s.raw)
    }

    /// The start of every page the range touches, in order, produced one at a time: a range a
    /// guest made up may cover 2^52 pages, and a caller that refuses at the first bad one must
    /// not pay for the rest.
    public var pages: Pages { Pages(range: self) }

    public struct Pages: Sequence, Sendable {
        let range: AddressRange<Space>
        public struct Iterator: IteratorProtocol {
            var upcoming: Space?
            let end: Space
            public mutating func next() -> Space? {
                guard let p = upcoming, p < end else { return nil }
                upcoming = p.adding(pageSize)
                return p
            }
        }
        public func makeIterator() -> Iterator {
            Iterator(upcoming: range.length > 0 ? range.start.pageBase : nil, end: range.end)
        }
    }
}

extension UInt64 {
    /// self - x, or 0 (counts that a guest reports, or that must not wrap).
    public func subtractingClamped(_ x: UInt64) -> UInt64 { self > x ? self - x : 0 }
}
