import ABI
import Testing
import TestSupport

@Suite struct AddressSpaceTests {
    @Test func addingThatWouldWrapReturnsNil() {
        #expect(L1GPA(.max - 1).adding(2) == nil)
        #expect(L2GPA(0x1000).adding(0x1000) == L2GPA(0x2000))
    }

    @Test func rangeRefusesToWrapPast2To64() {
        #expect(AddressRange(start: HostOffset(.max - 0xFFF), length: 0x2000) == nil)
        #expect(AddressRange(start: HostOffset(.max - 0xFFF), length: 0x1000) == nil)   // its end, 2^64, is not an address
        #expect(AddressRange(start: HostOffset(.max - 0xFFF), length: 0xFFF) != nil)
    }

    @Test func pageHelpersStayInTheirSpace() {
        let a = L2GPA(0x12_3456)
        #expect(a.pageBase == L2GPA(0x12_3000))
        #expect(a.offsetInPage == 0x456)
        #expect(a.pageNumber == 0x123)
        #expect(!a.isPageAligned && a.pageBase.isPageAligned)
        #expect(L1GPA(0x5000).offset(from: L1GPA(0x4000)) == 0x1000)
        #expect(L1GPA(0x3000).offset(from: L1GPA(0x4000)) == nil)
    }

    @Test func overlapIsHalfOpenAndEmptyRangesOverlapNothing() {
        let r = AddressRange(start: L2GPA(0x1000), length: 0x1000)!
        #expect(!r.overlaps(AddressRange(start: L2GPA(0x2000), length: 0x1000)!))
        #expect(r.overlaps(AddressRange(start: L2GPA(0x1FFF), length: 1)!))
        #expect(!r.overlaps(AddressRange(start: L2GPA(0x1800), length: 0)!))
        #expect(r.contains(L2GPA(0x1FFF)) && !r.contains(L2GPA(0x2000)))
    }

    /// A range near one of the places arithmetic breaks (0, 2^32, 2^63, 2^64) with a small or
    /// edge length; nil (and counted) when it would wrap past 2^64.
    static func drawRange(_ g: inout SplitMix64, near base: UInt64) -> (start: UInt64, length: UInt64) {
        let start = base &+ g.below(48)
        let length = g.chance(0.85) ? g.below(17) : g.pick([UInt64.max, UInt64.max - start, (UInt64.max - start) &+ 1, 1 << 63])
        return (start, length)
    }

    /// Seeded (Seeded.swift): ranges at 0, 2^32, 2^63 and the top of the address space, lengths
    /// from 0 to all ones. `AddressRange` exists exactly when start + length does not reach
    /// 2^64; overlap is symmetric and matches the pointwise definition.
    @Test func overlapIsSymmetricAndMatchesPointwiseDefinition() async {
        let coverage = Coverage()
        let passed = await seededCheck(count: 2_000) { g in
            let bases: [UInt64] = [0, 1 << 32, 1 << 63, UInt64.max - 40]
            let base = g.pick(bases)
            let (s1, l1) = Self.drawRange(&g, near: base)
            let (s2, l2) = Self.drawRange(&g, near: g.chance(0.85) ? base : g.pick(bases))
            let what = "a = 0x\(String(s1, radix: 16)) +0x\(String(l1, radix: 16)), b = 0x\(String(s2, radix: 16)) +0x\(String(l2, radix: 16))"
            let a = AddressRange(start: L1GPA(s1), length: l1)
            let b = AddressRange(start: L1GPA(s2), length: l2)
            #expect((a == nil) == s1.addingReportingOverflow(l1).overflow, "\(what)")
            #expect((b == nil) == s2.addingReportingOverflow(l2).overflow, "\(what)")
            guard let a, let b else { coverage.hit("wraps"); return }
            if s1 > UInt64.max - 64 || s2 > UInt64.max - 64 { coverage.hit("nearTop") }
            // Pointwise over the smaller range (at most 2^63 points would be too many: sample
            // its ends and a few points in between when it is long).
            let (small, other) = l1 <= l2 ? (a, b) : (b, a)
            let points: [UInt64] = small.length <= 64
                ? (0..<small.length).map { small.start.raw + $0 }
                : [0, 1, small.length / 2, small.length - 1].map { small.start.raw + $0 }
            let pointwise = points.contains { other.contains(L1GPA($0)) }
            #expect(a.overlaps(b) == b.overlaps(a), "\(what)")
            if small.length <= 64 || pointwise {
                #expect(a.overlaps(b) == pointwise, "\(what)")
                coverage.hit(pointwise ? "overlapping" : "disjoint")
            }
            if l1 == 0 || l2 == 0 { coverage.hit("empty") }
        }
        guard passed else { return }
        coverage.expectAtLeast(["wraps": 50, "nearTop": 100, "overlapping": 300, "disjoint": 300, "empty": 100])
    }

    @Test func pagesOfAHugeRangeComeOneAtATime() {
        // 2^51 pages: building them all would never finish; the first few come at once.
        let r = AddressRange(start: L2GPA(0x1800), length: UInt64(1) << 63)!
        #expect(Array(r.pages.prefix(3)) == [L2GPA(0x1000), L2GPA(0x2000), L2GPA(0x3000)])
        let top = AddressRange(start: L1GPA(UInt64.max - 0x1FFF), length: 0x1000)!
        #expect(Array(top.pages) == [L1GPA(UInt64.max - 0x1FFF).pageBase])
        #expect(Array(AddressRange(start: L1GPA(0x5000), length: 0)!.pages).isEmpty)
    }
}
