import ABI
@testable import L0
import Testing
import Transport

/// The PV hypercalls: results in RAX, and on any error nothing in the PV map or EPT02 changes.
@Suite struct PVHypercallTests {
    static let mb: UInt64 = 1 << 20
    let rwx = PVMapFlags.rwx

    /// A vCPU with one good mapping: L2 [1 MiB, +64 KiB) -> L1 [4 MiB, +64 KiB).
    func mappedFixture() throws -> Fixture {
        let f = try Fixture(.pv)
        #expect(f.map(l2: Self.mb, l1: 4 * Self.mb, length: 0x1_0000) == 0)
        return f
    }

    /// Runs `body` (a failing hypercall) and checks the PV map and EPT02 are exactly as before.
    func expectUnchanged(_ f: Fixture, _ what: Comment, sourceLocation: SourceLocation = #_sourceLocation,
                         _ body: () -> Void) throws {
        let mappings = f.pv.map.mappings
        let (table, present) = try f.ept02Snapshot()
        let fills = f.vcpu.counters.ept02Fills
        body()
        #expect(f.pv.map.mappings == mappings, what, sourceLocation: sourceLocation)
        let (after, presentAfter) = try f.ept02Snapshot()
        let sameTable = after == table   // not inside #expect: a failure would print 2 MiB
        #expect(sameTable, what, sourceLocation: sourceLocation)
        #expect(presentAfter == present, what, sourceLocation: sourceLocation)
        #expect(f.vcpu.counters.ept02Fills == fills, what, sourceLocation: sourceLocation)
    }

    @Test func anUnknownHypercallNumberReturnsENOSYSAndSkipsVMCALL() throws {
        let f = try Fixture(.pv)
        f.l1Run[register: .rip] = 0x4000
        let vmcalls = f.vcpu.counters.l1Exits[Int(ExitReason.vmcall.rawValue)]
        let numbers: [UInt64] = [0, 1, PVHypercall.base + 0x100, PVHypercall.base + 0xFFFF, PVHypercall.base - 1, ~0]
        for nr in numbers {
            #expect(PVHypercall(rawValue: nr) == nil)
            let r = f.hypercall(nr)
            #expect(r.outcome == .resume(.l1))
            #expect(r.rax == HypercallError.noSys.returnValue, "0x\(String(nr, radix: 16))")
        }
        #expect(f.l1Run[register: .rip] == 0x4000 + UInt64(numbers.count) * 3)
        #expect(f.vcpu.counters.hypercalls[0] == 1)
        #expect(f.vcpu.counters.l1Exits[Int(ExitReason.vmcall.rawValue)] == vmcalls + UInt64(numbers.count))
    }

    /// L1 chooses hypercall numbers: L0 counts the first few distinct ones by number and the
    /// rest together, so 10,000 distinct numbers do not grow L0.
    @Test func hypercallNumbersAreCountedInBoundedStorage() throws {
        let f = try Fixture(.pv)
        let before = f.vcpu.counters.hypercalls     // the fixture's own negotiation
        for i in UInt64(0)..<10_000 {
            #expect(f.hypercall(1 << 63 | i &* 0x9E37_79B9).rax == HypercallError.noSys.returnValue)
        }
        let h = f.vcpu.counters.hypercalls
        #expect(h.counts.count == TransitionCounters.hypercallKeys)
        let mine = UInt64(TransitionCounters.hypercallKeys - before.counts.count)
        #expect(h.total == before.total + 10_000 && h.others == 10_000 - mine)
    }

    /// L1 chooses how many ranges it maps: one page in two, never merging, fills L0's PV map to
    /// its bound. Then a call that could grow it is E2BIG and changes nothing, while one that
    /// cannot (an unmap of whole ranges, a replace of a whole range) still works: a full map shrinks.
    @Test func thePVMapIsBoundedAndAFullMapRefusesGrowthOnly() throws {
        let f = try Fixture(.pv)
        let l1 = 4 * Self.mb
        // One three-page range first (its middle page is where a split would come from).
        #expect(f.map(l2: 0, l1: l1, length: 3 * pageSize) == 0)
        var next: UInt64 = 2                              // single pages at 4, 6, 8, ... (x 4 KiB)
        func batch(_ n: Int) throws -> UInt64 {
            for i in 0..<n {
                let base = Plan.argumentPage.raw + UInt64(i) * PVMapBatchEntry.size
                try f.store64((next + UInt64(i)) * 2 * pageSize, L1GPA(base + PVMapBatchEntry.l2GPA))
                try f.store64(l1, L1GPA(base + PVMapBatchEntry.l1GPA))
                try f.store64(pageSize, L1GPA(base + PVMapBatchEntry.length))
                try f.store64(PVMapFlags.rwx, L1GPA(base + PVMapBatchEntry.flags))
            }
            let r = f.hypercall(.mapGPABatch, UInt64(n)).rax
            if r == 0 { next += UInt64(n) }
            return r
        }
        let perCall = Int(PVMapBatchEntry.maxPerCall)
        while try batch(perCall) == 0 {}
        #expect(f.pv.map.mappings.count > PVMap.maxMappings - perCall)
        while f.map(l2: next * 2 * pageSize, l1: l1, length: pageSize) == 0 { next += 1 }
        #expect(f.pv.map.mappings.count == PVMap.maxMappings)
        let tooBig = HypercallError.tooBig.returnValue
        try expectUnchanged(f, "full map") {
            #expect(f.map(l2: next * 2 * pageSize, l1: l1, length: pageSize) == tooBig)
            #expect(f.map(l2: pageSize, l1: l1, length: pageSize, flags: PVMapFlags.rwx | PVMapFlags.replace) == tooBig)
            #expect(f.unmap(l2: pageSize, length: pageSize) == tooBig)     // a hole in the 3-page range
        }
        // Whole ranges: no growth, so allowed on a full map.
        #expect(f.map(l2: 4 * pageSize, l1: l1 + pageSize, length: pageSize, flags: PVMapFlags.rwx | PVMapFlags.replace) == 0)
        #expect(f.unmap(l2: 6 * pageSize, length: pageSize) == 0)
        #expect(f.pv.map.mappings.count == PVMap.maxMappings - 1)
        #expect(f.unmap(l2: pageSize, length: pageSize) == 0)             // now there is room to split
        #expect(f.pv.map.mappings.count == PVMap.maxMappings)
    }

    @Test func pvHypercallsBeforeNegotiationAreEPERM() throws {
        let f = try Fixture(.pv, negotiating: nil)
        #expect(f.hypercall(.getVersion).rax == PVABIVersion.current.packed)
        #expect(f.map(l2: 0x20_0000, l1: 0x40_0000, length: 0x1000) == HypercallError.permission.returnValue)
        #expect(f.hypercall(.createVCPU, Plan.exitPage.raw).rax == HypercallError.permission.returnValue)
        #expect(f.pv.map.mappings.isEmpty)
        #expect(f.pv.exitPageGPA == nil)
        #expect(f.negotiate(.all) == 0)
        #expect(f.map(l2: 0x20_0000, l1: 0x40_0000, length: 0x1000) == 0)
    }

    @Test func setCPUIDWithoutTheDirectCPUIDFeatureIsEOPNOTSUPP() throws {
        let f = try Fixture(.pv, negotiating: [.batchMap])
        try f.writeCPUIDEntries([CPUIDEntry(function: 0, eax: 1, ebx: 0, ecx: 0, edx: 0)], at: Plan.cpuidBuffer)
        #expect(f.hypercall(.setCPUID, Plan.cpuidBuffer.raw, 1).rax == HypercallError.notSupported.returnValue)
        #expect(f.pv.cpuid == nil)
    }

    @Test func aGoodMapInstallsEPT02EntriesThroughTheMemslot() throws {
        let f = try Fixture(.pv)
        let l2: UInt64 = 0x20_0000, l1: UInt64 = 0x40_0000, length: UInt64 = 0x3000
        #expect(f.map(l2: l2, l1: l1, length: length, flags: PVMapFlags.read | PVMapFlags.write) == 0)
        for off in stride(from: UInt64(0), to: length, by: 0x800) {
            let expected = HostOffset(Plan.slotHost.raw + l1 + off)
            #expect(f.vcpu.ept02.translate(L2GPA(l2 + off)) == expected)
            #expect(f.vcpu.ept02.translate(L2GPA(l2 + off), access: EPT.write) == expected)
            #expect(f.vcpu.ept02.translate(L2GPA(l2 + off), access: EPT.execute) == nil)
        }
        #expect(f.vcpu.ept02.translate(L2GPA(l2 + length)) == nil)
        #expect(f.vcpu.ept02.translate(L2GPA(l2 - 1)) == nil)
        #expect(f.pv.map.mappings == [PVMapping(l2: AddressRange(start: L2GPA(l2), length: length)!, l1: L1GPA(l1),
                                                     permissions: PVMapFlags.read | PVMapFlags.write)])
        #expect(f.vcpu.counters.ept02Fills == 3)
        #expect(f.vcpu.ept02.present == Set([0x200, 0x201, 0x202]))
    }

    @Test func mapRejectsMisalignedArgumentsWithEINVAL() throws {
        let f = try mappedFixture()
        let cases: [(UInt64, UInt64, UInt64, String)] = [
            (0x20_0800, 0x40_0000, 0x1000, "L2 misaligned"),
            (0x20_0000, 0x40_0010, 0x1000, "L1 misaligned"),
            (0x20_0000, 0x40_0000, 0x1001, "length misaligned"),
            (0x20_0000, 0x40_0000, 0x800, "length below a page"),
            (0x20_0000, 0x40_0000, 0, "zero length"),
        ]
        for (l2, l1, length, what) in cases {
            try expectUnchanged(f, "\(what)") {
                #expect(f.map(l2: l2, l1: l1, length: length) == HypercallError.invalid.returnValue, "\(what)")
            }
        }
    }

    @Test func mapRejectsRangesThatWrapPast2To64WithEINVAL() throws {
        let f = try mappedFixture()
        let top: UInt64 = 0xFFFF_FFFF_FFFF_F000
        try expectUnchanged(f, "L2 wraps") {
            #expect(f.map(l2: top, l1: 0x40_0000, length: 0x2000) == HypercallError.invalid.returnValue)
        }
        try expectUnchanged(f, "L1 wraps") {
            #expect(f.map(l2: 0x20_0000, l1: top, length: 0x2000) == HypercallError.invalid.returnValue)
        }
        try expectUnchanged(f, "huge length") {
            #expect(f.map(l2: 0x20_0000, l1: 0x40_0000, length: top) == HypercallError.invalid.returnValue)
        }
    }

    @Test func mapOfAnL1RangeOutsideL1MemoryFaults() throws {
        let f = try mappedFixture()
        try expectUnchanged(f, "outside") {
            #expect(f.map(l2: 0x20_0000, l1: Plan.slotSize, length: 0x1000) == HypercallError.fault.returnValue)
        }
        try expectUnchanged(f, "far outside") {
            #expect(f.map(l2: 0x20_0000, l1: 1 << 40, length: 0x1000) == HypercallError.fault.returnValue)
        }
        // The first pages are inside; the last one is past the end of the slot.
        try expectUnchanged(f, "straddles the end of the slot") {
            #expect(f.map(l2: 0x20_0000, l1: Plan.slotSize - 0x2000, length: 0x3000) == HypercallError.fault.returnValue)
        }
        // The last pages of the slot are mappable.
        #expect(f.map(l2: 0x20_0000, l1: Plan.slotSize - 0x2000, length: 0x2000) == 0)
        #expect(f.vcpu.ept02.translate(L2GPA(0x20_1FFF)) == HostOffset(Plan.slotHost.raw + Plan.slotSize - 1))
    }

    @Test func mapOverlappingAnExistingMappingIsEINVAL() throws {
        let f = try mappedFixture()   // L2 [1 MiB, +64 KiB)
        let overlaps: [(UInt64, UInt64)] = [
            (Self.mb, 0x1000), (Self.mb - 0x1000, 0x2000), (Self.mb + 0xF000, 0x2000),
            (Self.mb - 0x1000, 0x2_0000), (Self.mb + 0x4000, 0x1000),
        ]
        for (l2, length) in overlaps {
            try expectUnchanged(f, "overlap at 0x\(String(l2, radix: 16))") {
                #expect(f.map(l2: l2, l1: 8 * Self.mb, length: length) == HypercallError.invalid.returnValue)
            }
        }
        // Adjacent on both sides is fine.
        #expect(f.map(l2: Self.mb - 0x1000, l1: 8 * Self.mb, length: 0x1000) == 0)
        #expect(f.map(l2: Self.mb + 0x1_0000, l1: 8 * Self.mb, length: 0x1000) == 0)
    }

    @Test func mapWithUnknownOrNoPermissionFlagsIsEINVAL() throws {
        let f = try mappedFixture()
        for flags: UInt64 in [0, PVMapFlags.replace, 1 << 4, PVMapFlags.rwx | 1 << 4, 1 << 63] {
            try expectUnchanged(f, "flags 0x\(String(flags, radix: 16))") {
                #expect(f.map(l2: 0x20_0000, l1: 0x40_0000, length: 0x1000, flags: flags) == HypercallError.invalid.returnValue)
            }
        }
    }

    /// EPT02 entries are EPT entries: write without read (XWR = 010 or 110) is an EPT
    /// misconfiguration (SDM 29.3.3.1), so L0 must not install one on L1's behalf.
    @Test func mapWithWriteWithoutReadIsEINVAL() throws {
        let f = try mappedFixture()
        for flags in [PVMapFlags.write, PVMapFlags.write | PVMapFlags.execute] {
            do {
                try expectUnchanged(f, "flags 0x\(String(flags, radix: 16))") {
                    #expect(f.map(l2: 0x20_0000, l1: 0x40_0000, length: 0x1000, flags: flags) == HypercallError.invalid.returnValue)
                }
            }
            _ = f.unmap(l2: 0x20_0000, length: 0x1000)
        }
    }

    @Test func mapBeyondTheL2AddressLimitIsEINVAL() throws {
        let f = try mappedFixture()
        let limit = Plan.l2Limit
        for (l2, length) in [(limit, UInt64(0x1000)), (limit - 0x1000, UInt64(0x2000)), (1 << 40, UInt64(0x1000))] {
            try expectUnchanged(f, "0x\(String(l2, radix: 16)) +0x\(String(length, radix: 16))") {
                #expect(f.map(l2: l2, l1: 0x40_0000, length: length) == HypercallError.invalid.returnValue)
            }
        }
        // The last page below the limit is mappable.
        #expect(f.map(l2: limit - 0x1000, l1: 0x40_0000, length: 0x1000) == 0)
        #expect(f.vcpu.ept02.translate(L2GPA(limit - 1)) == HostOffset(Plan.slotHost.raw + 0x40_0FFF))
    }

    @Test func unmapRemovesTheMappingAndItsEPT02Entries() throws {
        let f = try mappedFixture()
        #expect(f.unmap(l2: Self.mb, length: 0x1_0000) == 0)
        #expect(f.pv.map.mappings.isEmpty)
        for off in stride(from: UInt64(0), to: 0x1_0000, by: 0x1000) {
            #expect(f.vcpu.ept02.translate(L2GPA(Self.mb + off)) == nil)
            #expect(f.vcpu.ept02.entry(L2GPA(Self.mb + off)) == 0)
        }
        #expect(f.vcpu.ept02.present.isDisjoint(with: (Self.mb >> 12)..<((Self.mb + 0x1_0000) >> 12)))
        // Mapping the range again works.
        #expect(f.map(l2: Self.mb, l1: 6 * Self.mb, length: 0x1000) == 0)
        #expect(f.vcpu.ept02.translate(L2GPA(Self.mb)) == HostOffset(Plan.slotHost.raw + 6 * Self.mb))
    }

    @Test func unmapOfSomethingNotMappedIsEINVAL() throws {
        let f = try mappedFixture()
        let cases: [(UInt64, UInt64, String)] = [
            (0x20_0000, 0x1000, "never mapped"),
            (Self.mb + 0x1_0000, 0x1000, "just past the mapping"),
            (Self.mb - 0x1000, 0x1000, "just before the mapping"),
            (Self.mb + 0x800, 0x1000, "misaligned"),
            (Self.mb, 0, "zero length"),
            (Self.mb, 0x1800, "misaligned length"),
            (0xFFFF_FFFF_FFFF_F000, 0x2000, "wraps"),
        ]
        for (l2, length, what) in cases {
            try expectUnchanged(f, "\(what)") {
                #expect(f.unmap(l2: l2, length: length) == HypercallError.invalid.returnValue, "\(what)")
            }
        }
        #expect(f.unmap(l2: Self.mb, length: 0x1_0000) == 0)
        try expectUnchanged(f, "already unmapped") {
            #expect(f.unmap(l2: Self.mb, length: 0x1_0000) == HypercallError.invalid.returnValue)
        }
    }

    @Test func aPartialUnmapSplitsTheMapping() throws {
        let f = try Fixture(.pv)
        let l2: UInt64 = 0x10_0000, l1: UInt64 = 0x40_0000
        #expect(f.map(l2: l2, l1: l1, length: 0x1_0000, flags: PVMapFlags.read | PVMapFlags.execute) == 0)
        #expect(f.unmap(l2: l2 + 0x4000, length: 0x4000) == 0)
        let perms = PVMapFlags.read | PVMapFlags.execute
        #expect(f.pv.map.mappings == [
            PVMapping(l2: AddressRange(start: L2GPA(l2), length: 0x4000)!, l1: L1GPA(l1), permissions: perms),
            PVMapping(l2: AddressRange(start: L2GPA(l2 + 0x8000), length: 0x8000)!, l1: L1GPA(l1 + 0x8000), permissions: perms),
        ])
        for page in 0..<UInt64(16) {
            let gpa = L2GPA(l2 + page * 0x1000 + 0x10)
            let expected: HostOffset? = (4..<8).contains(page) ? nil : HostOffset(Plan.slotHost.raw + l1 + page * 0x1000 + 0x10)
            #expect(f.vcpu.ept02.translate(gpa) == expected, "page \(page)")
            #expect(f.pv.map.lookup(gpa)?.l1Address(for: gpa) == (expected == nil ? nil : L1GPA(l1 + page * 0x1000 + 0x10)))
        }
        // Unmapping the head of the tail piece splits again; the remainder keeps its offset.
        #expect(f.unmap(l2: l2 + 0x8000, length: 0x1000) == 0)
        #expect(f.pv.map.lookup(L2GPA(l2 + 0x9000))?.l1 == L1GPA(l1 + 0x9000))
        #expect(f.vcpu.ept02.translate(L2GPA(l2 + 0x8000)) == nil)
        #expect(f.vcpu.ept02.translate(L2GPA(l2 + 0x9000)) == HostOffset(Plan.slotHost.raw + l1 + 0x9000))
    }

    @Test func createVCPUSucceedsOnceThenIsEINVAL() throws {
        let f = try Fixture(.pv)
        #expect(!f.vcpu.backend.hasL2VCPU)
        let r = f.hypercall(.createVCPU, Plan.exitPage.raw)
        #expect(r.outcome == .resume(.l1))
        #expect(r.rax == 0)
        #expect(f.pv.exitPageGPA == Plan.exitPage)
        #expect(f.vcpu.backend.hasL2VCPU)
        #expect(f.hypercall(.createVCPU, Plan.otherVMCS.raw).rax == HypercallError.invalid.returnValue)
        #expect(f.pv.exitPageGPA == Plan.exitPage)
    }

    @Test func createVCPUChecksTheExitPage() throws {
        let f = try Fixture(.pv)
        #expect(f.hypercall(.createVCPU, Plan.exitPage.raw + 8).rax == HypercallError.invalid.returnValue)
        #expect(f.hypercall(.createVCPU, Plan.slotSize).rax == HypercallError.fault.returnValue)
        #expect(f.pv.exitPageGPA == nil)
        #expect(!f.vcpu.backend.hasL2VCPU)
    }

    @Test func enterL2BeforeCreateVCPUIsEINVAL() throws {
        let f = try Fixture(.pv)
        let r = f.hypercall(.enterL2)
        #expect(r.outcome == .resume(.l1))
        #expect(r.rax == HypercallError.invalid.returnValue)
    }

    @Test func enterL2LoadsL2RegistersAndAPendingEventFromTheExitPage() throws {
        let f = try Fixture(.pv)
        #expect(f.hypercall(.createVCPU, Plan.exitPage.raw).rax == 0)
        let page = try f.runPage(at: Plan.exitPage)
        for r in Register.allCases { page[register: r] = 0x1000 + UInt64(r.rawValue) }
        let event: UInt64 = 1 << 31 | 3 << 8 | 14
        page[RunPage.eventInjection] = event
        page[RunPage.eventErrorCode] = 2
        let r = f.hypercall(.enterL2)
        #expect(r.outcome == .enterL2)
        for reg in Register.allCases { #expect(f.l2Run[register: reg] == 0x1000 + UInt64(reg.rawValue)) }
        #expect(f.l2Run[RunPage.eventInjection] == event)
        #expect(f.l2Run[RunPage.eventErrorCode] == 2)
        // The event is consumed: it is not injected a second time.
        #expect(page[RunPage.eventInjection] == 0)
    }

    @Test(arguments: [NestingPath.nvmx, .nvmxNoShadow])
    func pvHypercallsAreENOSYSOnTheNestedVMXPaths(path: NestingPath) throws {
        let f = try Fixture(path)
        f.l1Run[register: .rip] = 0x100
        for call in PVHypercall.allCases {
            let r = f.hypercall(call, Plan.exitPage.raw, 0x40_0000, 0x1000, PVMapFlags.rwx)
            #expect(r.outcome == .resume(.l1), "\(call)")
            #expect(r.rax == HypercallError.noSys.returnValue, "\(call)")
        }
        #expect(f.l1Run[register: .rip] == 0x100 + 3 * UInt64(PVHypercall.allCases.count))
        // Nothing was mapped and no L2 vCPU exists: a nested-VMX L1 has no PV state at all.
        #expect(f.vcpu.ept02.present.isEmpty)
        #expect(!(f.vcpu.backend is PVBackend))
        #expect(!f.vcpu.backend.hasL2VCPU)
    }
}

@Suite struct PVMapReplaceTests {
    @Test func mapWithReplaceTakesOverTheOverlappedPagesAndKeepsTheRest() throws {
        let f = try Fixture(.pv)
        #expect(f.map(l2: 0x10_0000, l1: 0x40_0000, length: 0x4000) == 0)
        #expect(f.map(l2: 0x10_1000, l1: 0x80_0000, length: 0x2000, flags: PVMapFlags.read | PVMapFlags.replace) == 0)
        #expect(f.pv.map.mappings == [
            PVMapping(l2: AddressRange(start: L2GPA(0x10_0000), length: 0x1000)!, l1: L1GPA(0x40_0000), permissions: 7),
            PVMapping(l2: AddressRange(start: L2GPA(0x10_1000), length: 0x2000)!, l1: L1GPA(0x80_0000), permissions: 1),
            PVMapping(l2: AddressRange(start: L2GPA(0x10_3000), length: 0x1000)!, l1: L1GPA(0x40_3000), permissions: 7),
        ])
        #expect(f.vcpu.ept02.translate(L2GPA(0x10_0000)) == HostOffset(Plan.slotHost.raw + 0x40_0000))
        #expect(f.vcpu.ept02.translate(L2GPA(0x10_1000)) == HostOffset(Plan.slotHost.raw + 0x80_0000))
        #expect(f.vcpu.ept02.translate(L2GPA(0x10_2000), access: EPT.write) == nil)
        #expect(f.vcpu.ept02.translate(L2GPA(0x10_3000)) == HostOffset(Plan.slotHost.raw + 0x40_3000))
        #expect(f.vcpu.ept02.present == Set([0x100, 0x101, 0x102, 0x103]))
    }

    @Test func aRefusedReplaceLeavesTheOldMappingInPlace() throws {
        let f = try Fixture(.pv)
        #expect(f.map(l2: 0x10_0000, l1: 0x40_0000, length: 0x4000) == 0)
        let before = f.pv.map.mappings
        #expect(f.map(l2: 0x10_1000, l1: Plan.slotSize - 0x1000, length: 0x2000, flags: PVMapFlags.rwx | PVMapFlags.replace)
                == HypercallError.fault.returnValue)
        #expect(f.pv.map.mappings == before)
        #expect(f.vcpu.ept02.translate(L2GPA(0x10_2000)) == HostOffset(Plan.slotHost.raw + 0x40_2000))
    }
}
