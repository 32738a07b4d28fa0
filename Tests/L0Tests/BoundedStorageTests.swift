import ABI
import Testing
@testable import L0

/// The two shapes every guest-driven table in L0 takes (Core/Bounded.swift), and the L1 MSRs L0
/// keeps for L1.
@Suite struct BoundedStorageTests {
    @Test func countsPastTheCapacityGoToOthersAndSinceSubtractsBoth() {
        var c = BoundedCounts<UInt64>(capacity: 2)
        c.record(7); c.record(8); c.record(7)
        let snapshot = c
        c.record(9); c.record(10, count: 4); c.record(8)
        #expect(c[7] == 2 && c[8] == 2 && c[9] == nil && c.others == 5 && c.total == 9)
        let d = c.since(snapshot)
        #expect(d[7] == 0 && d[8] == 1 && d.others == 5 && d.total == 6)
    }

    @Test func aLogKeepsTheLastItemsInOrderAndCountsTheDropped() {
        var log = BoundedLog<Int>(capacity: 3)
        for i in 0..<2 { log.append(i) }
        #expect(Array(log) == [0, 1] && log.dropped == 0)
        for i in 2..<8 { log.append(i) }
        #expect(Array(log) == [5, 6, 7] && log.dropped == 5)
        #expect(log.first == 5 && log.last == 7 && log.count == 3)
    }

    /// L1 writes MSRs L0 keeps for it; a write to one more MSR than L0 keeps is #GP, as KVM answers
    /// an MSR it does not know, and known MSRs stay writable.
    @Test func l1sMSRsAreBoundedAndOneMoreIsAGeneralProtectionFault() throws {
        let f = try Fixture(.nvmx)
        func wrmsr(_ msr: UInt32, _ v: UInt64) -> UInt64 {
            f.l1Run[RunPage.eventInjection] = 0
            f.l1Run[register: .rcx] = UInt64(msr)
            f.l1Run[register: .rax] = v & 0xFFFF_FFFF
            f.l1Run[register: .rdx] = v >> 32
            #expect(f.vcpu.handleL1Exit(L1ExitInfo(reason: .msrWrite, instructionLength: 2)) == .resume(.l1))
            return f.l1Run[RunPage.eventInjection]
        }
        for i in 0..<UInt32(L0VCPU.l1MSRCapacity) { #expect(wrmsr(0xC000_1000 + i, UInt64(i)) == 0) }
        #expect(wrmsr(0xC000_1000 + UInt32(L0VCPU.l1MSRCapacity), 1) & 0x8000_00FF == 0x8000_000D)
        #expect(f.vcpu.l1MSRs.count == L0VCPU.l1MSRCapacity)
        #expect(wrmsr(0xC000_1000, 0xAB) == 0 && f.vcpu.l1MSRs[0xC000_1000] == 0xAB)
    }
}
