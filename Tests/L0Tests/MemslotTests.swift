import ABI
import Testing
import Transport
@testable import L0

/// L1's memslots (KVM_SET_USER_MEMORY_REGION's rules) and the two zap policies of seeds/004.
@Suite struct MemslotValidationTests {
    func slots() throws -> L1Memslots {
        var s = L1Memslots(hostSize: 64 << 20)
        try s.add(MemorySlot(slot: 0, guestPhysAddr: L1GPA(0), memorySize: 16 << 20, hostOffset: HostOffset(0)))
        return s
    }

    @Test func overlapsMisalignmentHostRangeDuplicatesAndUnknownFlagsAreRefused() throws {
        var s = try slots()
        #expect(throws: MemoryError.overlapsSlot(0)) {
            try s.add(MemorySlot(slot: 1, guestPhysAddr: L1GPA(15 << 20), memorySize: 2 << 20, hostOffset: HostOffset(32 << 20)))
        }
        #expect(throws: MemoryError.misaligned(0x1234)) {
            try s.add(MemorySlot(slot: 1, guestPhysAddr: L1GPA(0x1234), memorySize: 1 << 20, hostOffset: HostOffset(32 << 20)))
        }
        #expect(throws: MemoryError.hostRangeOutside(HostOffset(60 << 20), length: 8 << 20, hostSize: 64 << 20)) {
            try s.add(MemorySlot(slot: 1, guestPhysAddr: L1GPA(32 << 20), memorySize: 8 << 20, hostOffset: HostOffset(60 << 20)))
        }
        #expect(throws: MemoryError.duplicateSlot(0)) {
            try s.add(MemorySlot(slot: 0, guestPhysAddr: L1GPA(32 << 20), memorySize: 1 << 20, hostOffset: HostOffset(32 << 20)))
        }
        #expect(throws: MemoryError.unknownFlags(1 << 5)) {
            try s.add(MemorySlot(slot: 1, flags: 1 << 5, guestPhysAddr: L1GPA(32 << 20), memorySize: 1 << 20, hostOffset: HostOffset(32 << 20)))
        }
        #expect(throws: MemoryError.noSuchSlot(9)) { _ = try s.delete(9) }
        #expect(s.slots.count == 1)
    }
}

@Suite struct MemslotZapTests {
    /// A PV vCPU with a second slot (id 1, L1 GPA 32 MiB.., host 48 MiB..) and L2 mappings into both.
    func pvWithTwoSlots(flags: UInt32 = 0) throws -> Fixture {
        let f = try Fixture(.pv)
        try f.vcpu.createMemslot(MemorySlot(slot: 1, flags: flags, guestPhysAddr: L1GPA(32 << 20), memorySize: 8 << 20,
                                            hostOffset: HostOffset(48 << 20)))
        #expect(f.map(l2: 0x10_0000, l1: 0x40_0000, length: 0x4000) == 0)            // slot 0
        #expect(f.map(l2: 0x80_0000, l1: 32 << 20, length: 0x4000) == 0)             // slot 1
        return f
    }

    func read(_ f: Fixture, _ gpa: UInt64) -> NextStep {
        f.l2Exit(L2ExitInfo(reason: .eptViolation, qualification: EPTViolationQualification.dataRead,
                           guestPhysicalAddress: L2GPA(gpa), instructionLength: 3, instructionInfo: 8))
    }

    @Test func targetedZapRemovesExactlyThatSlotsMappings() throws {
        let f = try pvWithTwoSlots()
        f.vcpu.memslotZapPolicy = .targeted
        #expect(try f.vcpu.deleteMemslot(1) == 4)
        for p in 0..<4 as Range<UInt64> {
            #expect(f.vcpu.ept02.translate(L2GPA(0x80_0000 + p * pageSize)) == nil)
            #expect(f.vcpu.ept02.translate(L2GPA(0x10_0000 + p * pageSize)) != nil)  // the other slot stays
        }
        #expect(f.pv.map.lookup(L2GPA(0x80_0000)) == nil)                       // nor does the PV map keep it
        _ = f.hypercall(.createVCPU, Plan.exitPage.raw)
        #expect(read(f, 0x80_0000) == .resume(.l1))                                  // L2 cannot reach it
    }

    @Test func fastZapInvalidatesEverythingAtOnceAndRebuildsWhatIsStillMappedLazily() throws {
        let f = try pvWithTwoSlots()
        f.vcpu.memslotZapPolicy = .fast
        let gen = f.vcpu.ept02.generation
        #expect(try f.vcpu.deleteMemslot(1) == 8)
        #expect(f.vcpu.ept02.generation == gen + 1 && f.vcpu.ept02.present.isEmpty)
        #expect(f.vcpu.ept02.translate(L2GPA(0x10_0000)) == nil)                     // invalid at once...
        #expect(read(f, 0x10_0000) == .resume(.l2))                                     // ...rebuilt on first touch
        #expect(f.vcpu.ept02.translate(L2GPA(0x10_0000)) == HostOffset(Plan.slotHost.raw + 0x40_0000))
        _ = f.hypercall(.createVCPU, Plan.exitPage.raw)
        #expect(read(f, 0x80_0000) == .resume(.l1))                                  // the deleted slot's pages never come back
    }

    @Test func thePerSlotFlagAsksForATargetedZapWhateverTheVMPolicy() throws {
        let f = try pvWithTwoSlots(flags: MemorySlot.targetedZapFlag)
        f.vcpu.memslotZapPolicy = .fast
        let gen = f.vcpu.ept02.generation
        #expect(try f.vcpu.deleteMemslot(1) == 4)
        #expect(f.vcpu.ept02.generation == gen)
        #expect(f.vcpu.ept02.translate(L2GPA(0x10_0000)) != nil)
    }

    @Test(arguments: MemslotZapPolicy.allCases)
    func onNVMXADeletedSlotsShadowsAreGoneAndL2CannotReachTheOldMemory(policy: MemslotZapPolicy) throws {
        let f = try Fixture(.nvmx)
        try f.vcpu.createMemslot(MemorySlot(slot: 1, guestPhysAddr: L1GPA(32 << 20), memorySize: 8 << 20, hostOffset: HostOffset(48 << 20)))
        try f.launchL2()
        f.vcpu.memslotZapPolicy = policy
        // EPT12 maps L2 0x20_0000 into slot 1.
        try f.writeEPT12Path(gpa: 0x20_0000, leafLevel: 1, leaf: Fixture.eptLeaf(32 << 20))
        #expect(read(f, 0x20_0000) == .resume(.l2))
        #expect(f.vcpu.ept02.translate(L2GPA(0x20_0000)) == HostOffset(48 << 20))
        try f.vcpu.deleteMemslot(1)
        #expect(f.vcpu.ept02.translate(L2GPA(0x20_0000)) == nil)
        // Touching it again finds EPT12 pointing at L1 memory that no longer exists: unassigned.
        #expect(read(f, 0x20_0000) == .resume(.l2))
        #expect(f.vcpu.ept02.translate(L2GPA(0x20_0000)) == nil && f.vcpu.counters.unbackedAccesses == 1)
        #expect(f.l2Run[register: .rax] == ~0)
    }

    @Test func movingASlotZapsItAndRecreatesItAtTheNewAddress() throws {
        let f = try pvWithTwoSlots()
        try f.vcpu.moveMemslot(1, to: L1GPA(64 << 20))
        #expect(f.vcpu.l1Memory.memslots.slots.first { $0.slot == 1 }?.guestPhysAddr == L1GPA(64 << 20))
        #expect(f.vcpu.ept02.translate(L2GPA(0x80_0000)) == nil)
        #expect(f.pv.map.lookup(L2GPA(0x80_0000)) == nil)
        #expect(try f.vcpu.l1Memory.memslots.translate(L1GPA(64 << 20)) == HostOffset(48 << 20))
        // A move onto slot 0 is refused and changes nothing.
        #expect(throws: MemoryError.self) { try f.vcpu.moveMemslot(1, to: L1GPA(0)) }
        #expect(f.vcpu.l1Memory.memslots.slots.count == 2)
    }

    @Test func aWritableMappingOfReadOnlyL1MemoryIsRefused() throws {
        let f = try Fixture(.pv)
        try f.vcpu.createMemslot(MemorySlot(slot: 1, flags: MemorySlot.readOnlyFlag, guestPhysAddr: L1GPA(32 << 20),
                                            memorySize: 1 << 20, hostOffset: HostOffset(48 << 20)))
        #expect(f.map(l2: 0x90_0000, l1: 32 << 20, length: pageSize) == HypercallError.permission.returnValue)
        #expect(f.map(l2: 0x90_0000, l1: 32 << 20, length: pageSize, flags: PVMapFlags.read) == 0)
    }
}
