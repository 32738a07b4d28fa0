import ABI
@testable import L0
import Testing
import Transport

/// EPT12Walker over tables crafted in L1 memory (Plan.ept12Tables: PML4, PDPT, PD, PT).
@Suite struct EPT12WalkerTests {
    // idx4 0, idx3 1, idx2 3, idx1 3, offset 0xABC.
    static let gpa: UInt64 = 0x4060_3ABC
    let f: Fixture
    init() throws { f = try Fixture(.nvmx) }

    func walk(_ gpa: UInt64 = Self.gpa, eptp: UInt64 = Plan.eptp) -> EPT12Walker.Walk {
        EPT12Walker(memory: f.vcpu.l1Memory).walk(eptp: eptp, gpa: L2GPA(gpa))
    }

    func entryAddress(level: Int, gpa: UInt64 = Self.gpa) -> L1GPA {
        L1GPA(Plan.ept12Tables[4 - level].raw + Fixture.eptIndex(gpa, level: level) * 8)
    }

    @Test func aFourKiBLeafTranslatesAndKeepsThePageOffset() throws {
        #expect(Fixture.eptIndex(Self.gpa, level: 4) == 0 && Fixture.eptIndex(Self.gpa, level: 3) == 1)
        try f.writeEPT12Path(gpa: Self.gpa, leafLevel: 1, leaf: Fixture.eptLeaf(0x45_6000))
        let w = walk()
        #expect(w.result == .mapped(L1GPA(0x45_6ABC), permissions: 7, pageSize: 4096))
        #expect(w.entriesRead == 4)
        // Bits of a 4 KiB leaf above the address (ignored bits 63:52, A/D) do not matter.
        try f.store64(Fixture.eptLeaf(0x45_6000) | EPT.accessed | EPT.dirty | 1 << 62, entryAddress(level: 1))
        #expect(walk().result == .mapped(L1GPA(0x45_6ABC), permissions: 7, pageSize: 4096))
    }

    @Test func aTwoMiBLeafKeepsTheLow21Bits() throws {
        try f.writeEPT12Path(gpa: Self.gpa, leafLevel: 2, leaf: Fixture.eptLeaf(0x60_0000, large: true))
        let w = walk()
        #expect(w.result == .mapped(L1GPA(0x60_0000 | (Self.gpa & 0x1F_FFFF)), permissions: 7, pageSize: 2 << 20))
        #expect(w.entriesRead == 3)
    }

    @Test func aOneGiBLeafKeepsTheLow30Bits() throws {
        try f.writeEPT12Path(gpa: Self.gpa, leafLevel: 3, leaf: Fixture.eptLeaf(0x1_4000_0000, large: true))
        let w = walk()
        #expect(w.result == .mapped(L1GPA(0x1_4000_0000 | (Self.gpa & 0x3FFF_FFFF)), permissions: 7, pageSize: 1 << 30))
        #expect(w.entriesRead == 2)
    }

    @Test(arguments: [4, 3, 2, 1])
    func aNotPresentEntryAtAnyLevelStopsTheWalk(level: Int) throws {
        try f.writeEPT12Path(gpa: Self.gpa, leafLevel: 1, leaf: Fixture.eptLeaf(0x45_6000))
        // Not present: R=W=X=0, whatever else the entry holds.
        try f.store64(0x45_6000 | EPT.memoryTypeWB << EPT.memoryTypeShift, entryAddress(level: level))
        let w = walk()
        #expect(w.result == .notPresent(permissions: 0))
        #expect(w.entriesRead == 5 - level)
    }

    @Test func aWriteOnlyOrWriteExecuteEntryIsMisconfigured() throws {
        for (level, rwx) in [(1, EPT.write), (1, EPT.write | EPT.execute), (3, EPT.write), (4, EPT.write | EPT.execute)] {
            let g = try Fixture(.nvmx)
            try g.writeEPT12Path(gpa: Self.gpa, leafLevel: 1, leaf: Fixture.eptLeaf(0x45_6000))
            let at = L1GPA(Plan.ept12Tables[4 - level].raw + Fixture.eptIndex(Self.gpa, level: level) * 8)
            let old = try g.vcpu.l1Memory.load64(at)
            try g.store64(old & ~EPT.rwxMask | rwx, at)
            let w = EPT12Walker(memory: g.vcpu.l1Memory).walk(eptp: Plan.eptp, gpa: L2GPA(Self.gpa))
            #expect(w.result == .misconfigured(level: level), "level \(level) rwx \(rwx)")
            #expect(w.entriesRead == 5 - level)
        }
    }

    @Test(arguments: [UInt64(2), 3, 7])
    func aLeafWithAReservedMemoryTypeIsMisconfigured(memoryType: UInt64) throws {
        try f.writeEPT12Path(gpa: Self.gpa, leafLevel: 1, leaf: 0x45_6000 | 7 | memoryType << EPT.memoryTypeShift)
        #expect(walk().result == .misconfigured(level: 1))
        // The same in a 2 MiB leaf.
        try f.writeEPT12Path(gpa: Self.gpa, leafLevel: 2, leaf: 0x60_0000 | 7 | EPT.largePage | memoryType << EPT.memoryTypeShift)
        #expect(walk().result == .misconfigured(level: 2))
    }

    @Test func validMemoryTypesInALeafAreFine() throws {
        for memoryType: UInt64 in [0, 1, 4, 5, 6] {
            try f.writeEPT12Path(gpa: Self.gpa, leafLevel: 1, leaf: 0x45_6000 | 7 | memoryType << EPT.memoryTypeShift | EPT.ignorePAT)
            #expect(walk().result == .mapped(L1GPA(0x45_6ABC), permissions: 7, pageSize: 4096), "type \(memoryType)")
        }
    }

    @Test func reservedAddressBitsInALargeLeafAreMisconfigured() throws {
        try f.writeEPT12Path(gpa: Self.gpa, leafLevel: 2, leaf: Fixture.eptLeaf(0x60_1000, large: true))   // bit 12
        #expect(walk().result == .misconfigured(level: 2))
        try f.writeEPT12Path(gpa: Self.gpa, leafLevel: 2, leaf: Fixture.eptLeaf(0x70_0000, large: true))   // bit 20
        #expect(walk().result == .misconfigured(level: 2))
        try f.writeEPT12Path(gpa: Self.gpa, leafLevel: 3, leaf: Fixture.eptLeaf(0x4020_0000, large: true)) // bit 21
        #expect(walk().result == .misconfigured(level: 3))
        try f.writeEPT12Path(gpa: Self.gpa, leafLevel: 3, leaf: Fixture.eptLeaf(0x4000_1000, large: true)) // bit 12
        #expect(walk().result == .misconfigured(level: 3))
    }

    @Test func theLargePageBitInAPML4EntryIsMisconfigured() throws {
        try f.writeEPT12Path(gpa: Self.gpa, leafLevel: 1, leaf: Fixture.eptLeaf(0x45_6000))
        try f.store64(Plan.ept12Tables[1].raw | 7 | EPT.largePage, entryAddress(level: 4))
        let w = walk()
        #expect(w.result == .misconfigured(level: 4))
        #expect(w.entriesRead == 1)
    }

    @Test func reservedBitsInANonLeafEntryAreMisconfigured() throws {
        try f.writeEPT12Path(gpa: Self.gpa, leafLevel: 1, leaf: Fixture.eptLeaf(0x45_6000))
        try f.store64(Plan.ept12Tables[2].raw | 7 | EPT.memoryTypeWB << EPT.memoryTypeShift, entryAddress(level: 3))
        #expect(walk().result == .misconfigured(level: 3))
    }

    @Test func aTablePointerOutsideL1MemoryIsNotPresent() throws {
        try f.writeEPT12Path(gpa: Self.gpa, leafLevel: 1, leaf: Fixture.eptLeaf(0x45_6000))
        try f.store64(Plan.slotSize | 7, entryAddress(level: 3))      // PD outside L1 memory
        let w = walk()
        #expect(w.result == .notPresent(permissions: 0))
        #expect(w.entriesRead == 2)
        // A root outside L1 memory: nothing can be read.
        let root = walk(eptp: (1 << 40) | 6 | EPT.eptpWalkLength4)
        #expect(root.result == .notPresent(permissions: 0))
        #expect(root.entriesRead == 0)
    }

    @Test func permissionsAreTheANDAlongTheWalk() throws {
        let cases: [([UInt64], UInt64, UInt64)] = [
            ([7, 7, 7], 7, 7),
            ([7, 5, 7], 3, EPT.read),                         // RX, then RW: R
            ([3, 7, 7], 5, EPT.read),                         // RW ... RX
            ([7, 7, 1], 7, EPT.read),
            ([4, 7, 7], 5, EPT.execute),                      // execute-only PML4E
            ([7, 7, 7], 4, EPT.execute),
        ]
        for (nonLeaf, leafPerms, expected) in cases {
            try f.writeEPT12Path(gpa: Self.gpa, leafLevel: 1, leaf: Fixture.eptLeaf(0x45_6000, permissions: leafPerms),
                                 nonLeafPermissions: nonLeaf)
            #expect(walk().result == .mapped(L1GPA(0x45_6ABC), permissions: expected, pageSize: 4096), "\(nonLeaf) \(leafPerms)")
        }
        // Through a 2 MiB leaf too.
        try f.writeEPT12Path(gpa: Self.gpa, leafLevel: 2, leaf: Fixture.eptLeaf(0x60_0000, permissions: 3, large: true),
                             nonLeafPermissions: [5, 7, 7])
        if case let .mapped(_, perms, size) = walk().result {
            #expect(perms == EPT.read && size == 2 << 20)
        } else { Issue.record("expected a mapping") }
    }

    @Test func theWalkUsesTheEPTPAddressBitsOnly() throws {
        try f.writeEPT12Path(gpa: Self.gpa, leafLevel: 1, leaf: Fixture.eptLeaf(0x45_6000))
        let eptp = Plan.ept12Root.raw | EPT.memoryTypeWB | EPT.eptpWalkLength4 | EPT.eptpADEnable
        #expect(walk(eptp: eptp).result == .mapped(L1GPA(0x45_6ABC), permissions: 7, pageSize: 4096))
    }
}
