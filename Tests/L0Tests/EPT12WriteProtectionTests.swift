import ABI
import Testing
import Transport
@testable import L0

/// L0 write-protects the EPT12 pages it shadows into EPT02 (KVM: shadow pages), lets 4 KiB leaf
/// tables go unsync, zaps what went through the entry L1 edits in a non-leaf table (which stays
/// tracked), and at INVEPT keeps the shadows, re-syncing the unsync leaves (kvm-nested-work.md
/// section 4).
@Suite struct EPT12WriteProtectionTests {
    static let gpa: UInt64 = 0x20_0000

    /// L2 running, EPT12 mapping `gpa`, and one silent fill done.
    func filled() throws -> Fixture {
        let f = try Fixture(.nvmx)
        try f.launchL2()
        try f.writeEPT12Path(gpa: Self.gpa, leafLevel: 1, leaf: Fixture.eptLeaf(Plan.l2Backing.raw))
        let outcome = f.l2Exit(L2ExitInfo(reason: .eptViolation, qualification: EPTViolationQualification.dataRead,
                                         guestPhysicalAddress: L2GPA(Self.gpa), instructionLength: 3))
        #expect(outcome == .resume(.l2))
        return f
    }

    func isProtected(_ f: Fixture, _ gpa: L1GPA) throws -> Bool {
        let byte: UInt8 = try f.control.l1Tables.load(at: (f.layout.l1WriteProtectBitmap + gpa.pageNumber / 8).raw)
        return byte & (1 << UInt8(gpa.pageNumber % 8)) != 0
    }

    /// L1's store to its own memory that trapped (the L1 CPU exits with EPT_VIOLATION).
    func l1TrappedStore(_ f: Fixture, _ value: UInt64, at gpa: L1GPA) -> NextStep {
        f.l1Run[register: .rax] = value
        return f.vcpu.handleL1Exit(L1ExitInfo(reason: .eptViolation, qualification: EPTViolationQualification.dataWrite,
                                             guestPhysicalAddress: L1GPA(gpa.raw), instructionLength: 3, instructionInfo: 8))
    }

    @Test func everyTableAFillWalkedIsWriteProtected() throws {
        let f = try filled()
        for t in Plan.ept12Tables { #expect(try isProtected(f, t), "\(t)") }
        #expect(try !isProtected(f, Plan.l2Backing))
        #expect(f.nested.shadows.tables[Plan.ept12Tables[3].pageNumber]?.dependents == [Self.gpa >> 12])
    }

    @Test func aTrappedWriteToTheLeafTableLandsAndMakesItUnsyncWithoutZapping() throws {
        let f = try filled()
        let leafTable = Plan.ept12Tables[3]
        let neighbour = L1GPA(leafTable.raw + (Fixture.eptIndex(Self.gpa, level: 1) + 1) * 8)
        #expect(l1TrappedStore(f, Fixture.eptLeaf(Plan.l2Backing.raw + 0x1000), at: neighbour) == .resume(.l1))
        #expect(try f.vcpu.l1Memory.load64(neighbour) == Fixture.eptLeaf(Plan.l2Backing.raw + 0x1000))
        #expect(try !isProtected(f, leafTable) && f.nested.shadows.unsync.contains(leafTable.pageNumber))
        #expect(f.vcpu.ept02.translate(L2GPA(Self.gpa)) != nil)               // nothing zapped
        #expect(f.vcpu.counters.ept12WriteTraps == 1 && f.vcpu.counters.ept12Unsyncs == 1)
    }

    @Test func aTrappedWriteToANonLeafTableZapsWhatWentThroughTheTouchedEntryAndStaysTracked() throws {
        let f = try filled()
        let pdpt = Plan.ept12Tables[1]
        // Another entry of the same table: nothing that went through the touched one is shadowed.
        #expect(l1TrappedStore(f, 0, at: L1GPA(pdpt.raw + (Fixture.eptIndex(Self.gpa, level: 3) + 1) * 8)) == .resume(.l1))
        #expect(f.vcpu.ept02.translate(L2GPA(Self.gpa)) != nil)
        // The entry the walk went through: its EPT02 entries go; the table stays write-tracked.
        #expect(l1TrappedStore(f, 0, at: L1GPA(pdpt.raw + Fixture.eptIndex(Self.gpa, level: 3) * 8)) == .resume(.l1))
        #expect(f.vcpu.ept02.translate(L2GPA(Self.gpa)) == nil)
        #expect(try isProtected(f, pdpt))
        #expect(f.vcpu.counters.ept12WriteTraps == 2 && f.vcpu.counters.ept12Unsyncs == 0)
        // L2 touches it again: the walk now finds nothing, so L1 sees the violation.
        let again = f.l2Exit(L2ExitInfo(reason: .eptViolation, qualification: EPTViolationQualification.dataRead,
                                       guestPhysicalAddress: L2GPA(Self.gpa), instructionLength: 3))
        #expect(again == .resume(.l1))
    }

    @Test func inveptKeepsTheShadowsAndResyncsTheUnsyncLeaves() throws {
        let f = try filled()
        let leafTable = Plan.ept12Tables[3]
        let neighbourGPA = Self.gpa + pageSize
        let neighbour = L1GPA(leafTable.raw + Fixture.eptIndex(neighbourGPA, level: 1) * 8)
        // L1 maps the next page (a new entry: the leaf goes unsync), then INVEPT.
        #expect(l1TrappedStore(f, Fixture.eptLeaf(Plan.l2Backing.raw + 0x1000), at: neighbour) == .resume(.l1))
        f.l1Run[register: .rax] = 2
        _ = f.vmx(.invept, operand: Plan.eptp, info: VMXInstructionInfo.make(typeRegister: .rax))
        #expect(f.vmxResult == .succeed)
        // Nothing changed under the page L2 already touched: its EPT02 entry survives, the
        // shadows stay, and the leaf is write-protected again.
        #expect(f.vcpu.ept02.translate(L2GPA(Self.gpa)) != nil && !f.nested.shadows.tables.isEmpty)
        for t in Plan.ept12Tables { #expect(try isProtected(f, t)) }
        #expect(f.nested.shadows.unsync.isEmpty && f.vcpu.counters.ept12Resyncs == 1)
        // Now L1 changes the touched page's own entry (a trap: the leaf is protected again, so
        // it goes unsync once more) and INVEPTs: that entry's EPT02 entry is dropped.
        let own = L1GPA(leafTable.raw + Fixture.eptIndex(Self.gpa, level: 1) * 8)
        #expect(l1TrappedStore(f, Fixture.eptLeaf(Plan.l2Backing.raw + 0x2000), at: own) == .resume(.l1))
        f.l1Run[register: .rax] = 2
        _ = f.vmx(.invept, operand: Plan.eptp, info: VMXInstructionInfo.make(typeRegister: .rax))
        #expect(f.vcpu.ept02.translate(L2GPA(Self.gpa)) == nil)
        #expect(f.vcpu.counters.ept12Resyncs == 2)
    }

    @Test func aStoreThatTrapsOutsideL1MemoryStopsTheStackInsteadOfLanding() throws {
        let f = try filled()
        #expect(l1TrappedStore(f, 1, at: L1GPA(Plan.slotSize + 8)) == .stop(.fatal(.l1StoreOutsideMemory(L1GPA(Plan.slotSize + 8)))))
    }
}
