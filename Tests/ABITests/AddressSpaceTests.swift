import ABI
import PropertyBased
import Testing

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

    @Test func overlapIsSymmetricAndMatchesPointwiseDefinition() async {
        await propertyCheck(input: Gen.int(in: 0...64), Gen.int(in: 0...16), Gen.int(in: 0...64), Gen.int(in: 0...16)) { s1, l1, s2, l2 in
            let a = AddressRange(start: L1GPA(UInt64(s1)), length: UInt64(l1))!
            let b = AddressRange(start: L1GPA(UInt64(s2)), length: UInt64(l2))!
            let pointwise = (0...80).contains { p in a.contains(L1GPA(UInt64(p))) && b.contains(L1GPA(UInt64(p))) }
            #expect(a.overlaps(b) == b.overlaps(a))
            #expect(a.overlaps(b) == pointwise)
        }
    }
}
