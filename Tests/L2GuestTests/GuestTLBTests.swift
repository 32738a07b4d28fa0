@testable import L2Guest
import ABI
import Testing

/// The TLB grants only what the walk that filled it checked, and forgets as INVLPG and CR3 say.
@Suite struct GuestTLBTests {
    let va = L2GVA(0x80_0000_3123)

    @Test func aReadFillDoesNotServeAWriteAndAWriteFillServesBoth() {
        var tlb = GuestTLB<L2GPA>()
        tlb.insert(va, .init(frame: L2GPA(0x5000), writable: false, user: false, executable: false, dirty: false))
        #expect(tlb.lookup(va, [])?.frame == L2GPA(0x5000))
        #expect(tlb.lookup(va, [.write]) == nil)          // walk again: sets D, checks R/W
        #expect(tlb.lookup(va, [.user]) == nil)           // walked as supervisor only
        tlb.insert(va, .init(frame: L2GPA(0x5000), writable: true, user: true, executable: false, dirty: true))
        #expect(tlb.lookup(va, [.write, .user]) != nil)
        #expect(tlb.lookup(va, [.fetch]) == nil)
    }

    @Test func invlpgDropsOnePageAndACR3WriteDropsAll() {
        var tlb = GuestTLB<L2GPA>()
        let other = L2GVA(va.raw + pageSize)
        for v in [va, other] { tlb.insert(v, .init(frame: L2GPA(0x5000), writable: true, user: true, executable: true, dirty: true)) }
        tlb.flush(va)
        #expect(tlb.lookup(va, []) == nil)
        #expect(tlb.lookup(other, []) != nil)
        tlb.flushAll()
        #expect(tlb.lookup(other, []) == nil)
    }

    @Test func anAliasInTheSameSlotIsAMissNotAWrongFrame() {
        var tlb = GuestTLB<L2GPA>()
        let alias = L2GVA(va.raw + 64 * pageSize)          // same slot, other page
        tlb.insert(va, .init(frame: L2GPA(0x5000), writable: true, user: true, executable: true, dirty: true))
        #expect(tlb.lookup(alias, []) == nil)
    }
}
