import ABI
import Testing

@Suite struct LayoutTests {
    @Test func runPageSlotsAreDistinctAndInsideThePage() {
        let slots: [UInt64] = [RunPage.exitReason, RunPage.exitQualification, RunPage.guestPhysicalAddress,
                               RunPage.guestLinearAddress, RunPage.instructionLength, RunPage.instructionInfo,
                               RunPage.vmxOperand, RunPage.exitInterruptionInfo, RunPage.vmxResult,
                               RunPage.vmInstructionError, RunPage.eventInjection, RunPage.eventErrorCode,
                               RunPage.enteredByVMExit, RunPage.exitInterruptionErrorCode]
        #expect(Set(slots).count == slots.count)
        for s in slots { #expect(s % 8 == 0 && s + 8 <= RunPage.registers) }
        #expect(RunPage.registersEnd <= RunPage.size)
        #expect(RunPage.offset(of: .rip) == RunPage.registers + 16 * 8)
        #expect(Register.allCases.count == Register.count)
        #expect(!Register.gprsOutsideVMCS.contains(.rsp) && Register.gprsOutsideVMCS.count == 15)
    }

    @Test func controlLayoutGivesEachVCPUItsOwnPagesInEachRegionAndEPT02Last() {
        let l = ControlLayout(vcpuCount: 2, l2AddressLimit: 1 << 30)
        let l1Exchange = [l.handoff(0), l.runPage(0), l.shadowVMCS(0), l.handoff(1), l.runPage(1), l.shadowVMCS(1)]
        let l2Exchange = [l.handoff(0), l.runPage(0), l.l2MSRValues(0), l.handoff(1), l.runPage(1), l.l2MSRValues(1)]
        for pages in [l1Exchange, l2Exchange] {
            #expect(Set(pages).count == pages.count)
            for p in pages { #expect(p.isPageAligned && p.raw + pageSize <= l.exchangeSize) }
        }
        // The tables regions keep page 0 for the header.
        let l1Tables = [l.shadowVMCSActive(0), l.shadowVMCSActive(1), l.vmreadBitmap, l.vmwriteBitmap, l.l1WriteProtectBitmap]
        #expect(Set(l1Tables).count == l1Tables.count)
        for p in l1Tables { #expect(p.isPageAligned && p.raw >= pageSize && p.raw < l.l1TablesSize) }
        #expect(l.l1TablesSize == (l.l1WriteProtectBitmap + ControlLayout.l1WriteProtectLimit / pageSize / 8).raw)
        let l2Tables = [l.l2MSRBitmap(0), l.l2CRGuestHostMasks(0), l.l2MSRBitmap(1), l.l2CRGuestHostMasks(1)]
        #expect(Set(l2Tables).count == l2Tables.count)
        for p in l2Tables { #expect(p.isPageAligned && p.raw >= pageSize && p < l.ept02) }
        #expect(l.ept02Entries == (1 << 30) / pageSize)
        #expect(l.l2TablesSize == (l.ept02 + l.ept02Entries * 8).raw)
        #expect(l.cachedVMCS12(1).raw + pageSize == l.l0PrivateSize)
    }

    @Test func onlyTheTablesAreReadOnlyToTheirTierAndNothingSharesTheL0PrivateRegion() {
        #expect(ControlRegion.l1Exchange.mappedBy! == (.l1, true))
        #expect(ControlRegion.l2Exchange.mappedBy! == (.l2, true))
        #expect(ControlRegion.l1Tables.mappedBy! == (.l1, false))
        #expect(ControlRegion.l2Tables.mappedBy! == (.l2, false))
        #expect(ControlRegion.l0Private.mappedBy == nil)
        #expect(ControlRegion.exchange(of: .l2) == .l2Exchange && ControlRegion.tables(of: .l1) == .l1Tables)
    }

    @Test func handoffWordsSitOnSeparateCacheLines() {
        let words = [HandoffLayout.turn] + Tier.allCases.map(HandoffLayout.sleeping)
        #expect(Set(words.map { $0 / 64 }).count == words.count)
        #expect(words.allSatisfy { $0 + 4 <= pageSize })
    }

    @Test func ucallBlockFitsAndPortIsSelftestsPort() {
        #expect(Ucall.port == 0x1000)
        #expect(Ucall.argsOffset + UInt64(Ucall.argCount) * 8 <= Ucall.messageOffset)
        #expect(Ucall.messageOffset + UInt64(Ucall.messageCapacity) <= Ucall.size)
        #expect(UcallCommand.sync.rawValue == 1 && UcallCommand.done.rawValue == 4 && UcallCommand.abort.rawValue == 2)
    }
}
