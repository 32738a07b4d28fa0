import ABI
import Testing
import Transport
@testable import L0

/// nvmx-evmcs: L1 names its eVMCS through the VP assist page; L0 copies only dirty groups.
@Suite struct EnlightenedVMCSTests {
    static let evmcsGPA = L1GPA(0x9000), assistGPA = L1GPA(0xA000)

    /// VMXON, an eVMCS filled with a valid L2 setup (all groups dirty), the VP assist page.
    func makeFixture() throws -> (Fixture, VMCSImage) {
        let f = try Fixture(.nvmxEVMCS)
        try f.store32(VMCS12Layout.revisionID, Plan.vmxonRegion)
        _ = f.vmx(.vmxon, operand: Plan.vmxonRegion.raw)
        let evmcs = try f.vmcs(at: Self.evmcsGPA)
        evmcs.revisionID = EnlightenedVMCS.revision
        let fields: [(VMCSField, UInt64)] = [
            (.cpuBasedVMExecControl, CPUBased.activateSecondaryControls | CPUBased.hltExiting),
            (.secondaryVMExecControl, SecondaryExec.enableEPT), (.eptPointer, Plan.eptp),
            (.hostCR0, Plan.cr0PE | Plan.cr0PG), (.hostCR4, Plan.cr4PAE), (.vmExitControls, VMExitControl.hostAddressSpaceSize),
            (.hostRIP, Plan.hostRIP), (.hostRSP, Plan.hostRSP), (.guestRFLAGS, 0x2), (.guestRIP, Plan.guestRIP),
        ]
        for (field, v) in fields { evmcs.write(field, v) }
        evmcs.evmcsCleanFields = 0
        try f.store64(Self.evmcsGPA.raw, L1GPA(Self.assistGPA.raw + VPAssistPage.currentNestedVMCS))
        try f.store8(1, L1GPA(Self.assistGPA.raw + VPAssistPage.enlightenVMEntry))
        f.l1Run[register: .rcx] = UInt64(VPAssistPage.msr)
        f.l1Run[register: .rax] = Self.assistGPA.raw | VPAssistPage.enable
        f.l1Run[register: .rdx] = 0
        #expect(f.vcpu.handleL1Exit(L1ExitInfo(reason: .msrWrite, instructionLength: 2)) == .resume(.l1))
        return (f, evmcs)
    }

    func cleanFields(_ e: VMCSImage) -> UInt32 { e.evmcsCleanFields }

    @Test func theFirstLaunchCopiesEveryGroupIntoL0sCachedVMCS12() throws {
        let (f, _) = try makeFixture()
        #expect(f.vmx(.vmlaunch) == .enterL2)
        let cache = f.nested.cachedVMCS12
        #expect(cache[.eptPointer] == Plan.eptp && cache[.hostRIP] == Plan.hostRIP && cache.launched)
        #expect(f.vcpu.counters.evmcsFieldCopies > 0)
        #expect(f.l2Run[register: .rip] == Plan.guestRIP)
    }

    /// KVM ignores the clean bits on VMLAUNCH (nested_vmx_handle_enlightened_vmptrld clears them):
    /// every group is copied even if L1 marked them all clean. A VMRESUME with everything clean
    /// copies only TPR_THRESHOLD and GUEST_RIP, but an eVMCS entry still runs the rare vmcs02
    /// writes (section 2 row 11), and every exit the rare sync.
    @Test func vmlaunchIgnoresTheCleanBitsAndAnEVMCSEntryAlwaysTakesTheRarePath() throws {
        let (f, evmcs) = try makeFixture()
        evmcs.evmcsCleanFields = EnlightenedVMCS.allClean
        #expect(f.vmx(.vmlaunch) == .enterL2)
        let everyGroup = UInt64(NestedVMXBackend.evmcsGroupOffsets.joined().count + NestedVMXBackend.evmcsAlwaysCopiedOffsets.count)
        #expect(f.vcpu.counters.evmcsFieldCopies == everyGroup)
        #expect(f.nested.cachedVMCS12[.eptPointer] == Plan.eptp)
        // A reflected exit: the write-back, and the rare sync.
        let beforeExit = f.vcpu.counters
        _ = f.l2Exit(L2ExitInfo(reason: .cpuid, instructionLength: 2))
        #expect(f.vcpu.counters.evmcsFieldCopies - beforeExit.evmcsFieldCopies == UInt64(NestedVMXBackend.evmcsWriteBackOffsets.count))
        #expect(f.vcpu.counters.rareFieldSyncs - beforeExit.rareFieldSyncs == 1)
        #expect(f.vcpu.counters.hwVMCLEARs == 0)                              // no shadow VMCS with an eVMCS
        // VMRESUME, all clean: 2 fields copied; early_rare (2) and the rare writes outside the guest
        // groups (10) all the same, the GUEST_GRP1/GRP2 writes (8 + 36) only when dirty.
        let before = f.vcpu.counters
        #expect(f.vmx(.vmresume) == .enterL2)
        let after = f.vcpu.counters
        #expect(after.evmcsFieldCopies - before.evmcsFieldCopies == 2)
        #expect(after.hwVMWRITEs - before.hwVMWRITEs == UInt64(24 + 2 + 10))
        _ = f.l2Exit(L2ExitInfo(reason: .cpuid, instructionLength: 2))
        evmcs.evmcsCleanFields = EnlightenedVMCS.allClean & ~EnlightenedVMCS.Group.guestGrp2.bit
        let beforeDirty = f.vcpu.counters
        #expect(f.vmx(.vmresume) == .enterL2)
        #expect(f.vcpu.counters.hwVMWRITEs - beforeDirty.hwVMWRITEs == UInt64(24 + 2 + 10 + 36))
        #expect(after.hwVMREADs - before.hwVMREADs == 4 && after.hwVMPTRLDs - before.hwVMPTRLDs == 1)
        #expect(after.consistencyChecks - before.consistencyChecks == 7)     // the eVMCS controls group too
        #expect(after.fullEntryChecks == before.fullEntryChecks)              // nothing dirty
    }

    /// The eVMCS has no VMX_PREEMPTION_TIMER_VALUE: an entry that asks for the timer fails its
    /// control checks, as KVM's nested_evmcs_check_controls fails it.
    @Test func anEntryAskingForThePreemptionTimerFailsWithAnEVMCS() throws {
        let (f, evmcs) = try makeFixture()
        evmcs.write(.pinBasedVMExecControl, PinBased.externalInterruptExiting | PinBased.preemptionTimer)
        _ = f.vmx(.vmlaunch)
        #expect(f.vmxResult == .failValid(.entryInvalidControlField) && !f.nested.guestMode)
        evmcs.write(.pinBasedVMExecControl, PinBased.externalInterruptExiting)
        evmcs.evmcsCleanFields = 0
        #expect(f.vmx(.vmlaunch) == .enterL2)
    }

    @Test func aFieldInACleanGroupIsNotCopiedUntilL1ClearsTheBit() throws {
        let (f, evmcs) = try makeFixture()
        _ = f.vmx(.vmlaunch)
        _ = f.l2Exit(L2ExitInfo(reason: .cpuid, instructionLength: 2))
        #expect(cleanFields(evmcs) == EnlightenedVMCS.allClean)                 // set on exit
        #expect(evmcs[.vmExitReason] == UInt64(ExitReason.cpuid.rawValue))     // exit info written back
        // L1 changes HOST_RSP but "forgets" to clear HOST_POINTER's clean bit: L0 keeps its copy.
        evmcs.write(.hostRSP, 0x99_0000)
        _ = f.vmx(.vmresume)
        #expect(f.nested.cachedVMCS12[.hostRSP] == Plan.hostRSP)
        _ = f.l2Exit(L2ExitInfo(reason: .cpuid, instructionLength: 2))
        // Now with the bit cleared, as L1's VMWRITE would: copied at the next entry.
        evmcs.write(.hostRSP, 0x99_0000)
        evmcs.evmcsCleanFields = cleanFields(evmcs) & ~EnlightenedVMCS.Group.hostPointer.bit
        _ = f.vmx(.vmresume)
        #expect(f.nested.cachedVMCS12[.hostRSP] == 0x99_0000)
    }

    @Test func guestRIPIsCopiedOnEveryEntryWhateverTheCleanBits() throws {
        let (f, evmcs) = try makeFixture()
        _ = f.vmx(.vmlaunch)
        _ = f.l2Exit(L2ExitInfo(reason: .cpuid, instructionLength: 2))
        let before = f.vcpu.counters.evmcsFieldCopies
        evmcs.write(.guestRIP, 0x4242)                                          // group NONE
        #expect(f.vmx(.vmresume) == .enterL2)
        #expect(f.l2Run[register: .rip] == 0x4242)
        #expect(f.vcpu.counters.evmcsFieldCopies - before == UInt64(NestedVMXBackend.evmcsAlwaysCopiedOffsets.count))
    }

    @Test func withoutAnEnlightenedEntryVMLAUNCHFailsInvalid() throws {
        let (f, _) = try makeFixture()
        try f.store8(0, L1GPA(Self.assistGPA.raw + VPAssistPage.enlightenVMEntry))
        _ = f.vmx(.vmlaunch)
        #expect(f.l1Run[RunPage.vmxResult] == 1)
    }

    @Test func anEVMCSWithTheWrongRevisionIsRefused() throws {
        let (f, evmcs) = try makeFixture()
        evmcs.revisionID = 7
        _ = f.vmx(.vmlaunch)
        #expect(f.l1Run[RunPage.vmxResult] == 1)
    }

    @Test func aVPAssistPageOutsideL1MemoryIsAGeneralProtectionFault() throws {
        let f = try Fixture(.nvmxEVMCS)
        f.l1Run[register: .rcx] = UInt64(VPAssistPage.msr)
        f.l1Run[register: .rax] = (Plan.slotSize + pageSize) | VPAssistPage.enable
        f.l1Run[register: .rdx] = 0
        _ = f.vcpu.handleL1Exit(L1ExitInfo(reason: .msrWrite, instructionLength: 2))
        #expect(f.l1Run[RunPage.eventInjection] & 0xFF == 13 && f.nested.vpAssistPage == nil)
    }

    /// KVM's copy_enlightened_to_vmcs12 (kvm-nested-work.md section 5): TPR_THRESHOLD and
    /// GUEST_RIP every entry; RSP, RFLAGS and interruptibility with GUEST_BASIC; activity state
    /// with GUEST_GRP1, segments with GUEST_GRP2, the host bases and RSP with HOST_POINTER, host
    /// RIP with HOST_GRP1; never the PFEC mask/match, MSR lists, CR3 target count or exit info.
    @Test func theCleanFieldGroupsAreKVMs() {
        #expect(Set(NestedVMXBackend.evmcsAlwaysCopiedOffsets) == Set([VMCSField.guestRIP, .tprThreshold].compactMap { VMCS12Layout.slot(of: $0)?.offset }))
        let expected: [(VMCSField, EnlightenedVMCS.Group?)] = [
            (.guestRSP, .guestBasic), (.guestRFLAGS, .guestBasic), (.guestInterruptibilityInfo, .guestBasic),
            (.guestActivityState, .guestGrp1), (.vmcsLinkPointer, .guestGrp1), (.guestIA32EFER, .guestGrp1),
            (.guestCSSelector, .guestGrp2), (.guestTRBase, .guestGrp2), (.guestSSARBytes, .guestGrp2),
            (.hostFSBase, .hostPointer), (.hostRSP, .hostPointer), (.hostRIP, .hostGrp1), (.hostCR3, .hostGrp1),
            (.tscOffset, .controlGrp2), (.eptPointer, .controlXlat), (.virtualProcessorID, .controlXlat),
            (.pageFaultErrorCodeMask, nil), (.pageFaultErrorCodeMatch, nil), (.cr3TargetCount, nil),
            (.vmExitMsrLoadAddr, nil), (.vmEntryMsrLoadCount, nil), (.exitQualification, nil),
        ]
        for (f, g) in expected { #expect(EnlightenedVMCS.group(of: f) == g, "\(f)") }
        #expect(!EnlightenedVMCS.copiedOnEveryEntry(.pageFaultErrorCodeMask))
        // What a nested exit writes back: guest state and exit information, the processor-based
        // and entry controls and the entry-event fields; no host state, no other control.
        for f in [VMCSField.guestCSSelector, .guestRIP, .guestRSP, .guestActivityState, .exitQualification,
                  .guestPhysicalAddress, .cpuBasedVMExecControl, .vmEntryControls, .vmEntryIntrInfoField] {
            #expect(EnlightenedVMCS.writtenBackAtExit(f), "\(f)")
        }
        for f in [VMCSField.hostRIP, .hostCR3, .pinBasedVMExecControl, .exceptionBitmap, .eptPointer, .vmcsLinkPointer] {
            #expect(!EnlightenedVMCS.writtenBackAtExit(f), "\(f)")
        }
    }
}
