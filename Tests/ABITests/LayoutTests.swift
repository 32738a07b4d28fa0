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

    @Test func controlLayoutGivesEachVCPUItsOwnPagesAndEPT02Last() {
        let l = ControlLayout(vcpuCount: 2, l2AddressLimit: 1 << 30)
        let pages = [l.handoff(0), l.l2RunPage(0), l.l1RunPage(0), l.shadowVMCS(0),
                     l.handoff(1), l.l2RunPage(1), l.l1RunPage(1), l.shadowVMCS(1), l.vmreadBitmap, l.vmwriteBitmap]
        #expect(Set(pages).count == pages.count)
        for p in pages { #expect(p.isPageAligned && p.raw >= pageSize && p < l.ept02) }
        #expect(l.ept02Entries == (1 << 30) / pageSize)
        #expect(l.totalSize == (l.ept02 + l.ept02Entries * 8).raw)
    }

    @Test func handoffWordsSitOnSeparateCacheLines() {
        let words = [HandoffLayout.turn] + Tier.allCases.map(HandoffLayout.sleeping) + [HandoffLayout.shadowVMCSActive]
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
