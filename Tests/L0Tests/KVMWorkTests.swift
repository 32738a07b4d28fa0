import ABI
@testable import L0
import Testing
import Transport

/// What KVM as L0 executes per nested transition, pinned against kvm-nested-work.md sections
/// 1-2 (the step tables): VMREAD / VMWRITE / VMPTRLD / VMCLEAR by kind, and the software steps.
@Suite struct KVMWorkTests {
    struct Ops: Equatable { var r, w, p, c: UInt64 }
    func ops(_ a: TransitionCounters, _ b: TransitionCounters) -> Ops {
        Ops(r: b.hwVMREADs - a.hwVMREADs, w: b.hwVMWRITEs - a.hwVMWRITEs, p: b.hwVMPTRLDs - a.hwVMPTRLDs, c: b.hwVMCLEARs - a.hwVMCLEARs)
    }
    static let shadowAll = UInt64(NestedVMXBackend.shadowedAllOffsets.count)
    static let shadowRW = UInt64(NestedVMXBackend.shadowedReadWriteOffsets.count)

    /// Section 1: reads 2 (exit) + 2 (reflect decision) + 1 (instruction length) + 12 (sync) +
    /// 1 (prepare_vmcs12) + 2 (host state) = 20; writes 3 + 47 + 2 + 2 = 54; VMPTRLD vmcs01.
    /// With shadowing, copy_vmcs12_to_shadow adds a VMWRITE per shadowed field, 2 VMPTRLDs and
    /// a VMCLEAR: KVM's totals P=3, C=1.
    @Test(arguments: [NestingPath.nvmx, .nvmxNoShadow])
    func aReflectedCPUIDCountsSection1(path: NestingPath) throws {
        let f = try Fixture(path)
        try f.launchL2()
        let before = f.vcpu.counters
        #expect(f.l2CPUID(function: 0) == .resume(.l1))
        let after = f.vcpu.counters
        let shadowing = path == .nvmx
        #expect(ops(before, after) == Ops(r: 20, w: 54 + (shadowing ? Self.shadowAll : 0), p: shadowing ? 3 : 1, c: shadowing ? 1 : 0))
        #expect(after.mmuRootSwitches - before.mmuRootSwitches == 1)
        #expect(after.tlbFlushes - before.tlbFlushes == 1)          // this vmcs12 has no VPID
        #expect(after.nestedVMExits - before.nestedVMExits == 1)
        #expect(after.rareFieldSyncs == before.rareFieldSyncs)     // deferred until asked for
    }

    /// Section 2, clean: reads 2 (L1's exit) + 2 (preamble) [+ 24 copy_shadow_to_vmcs12];
    /// writes 4 (early) + 16 (prepare_vmcs02) + 4 (run) = 24; VMPTRLD vmcs02 [+ 2 and a
    /// VMCLEAR for the shadow]; the check groups; the MSR-bitmap merge on every entry.
    @Test(arguments: [NestingPath.nvmx, .nvmxNoShadow])
    func aCleanVMRESUMECountsSection2(path: NestingPath) throws {
        let f = try Fixture(path)
        try f.launchL2()
        #expect(f.l2CPUID(function: 0) == .resume(.l1))
        let before = f.vcpu.counters
        #expect(f.vmx(.vmresume) == .enterL2)
        let after = f.vcpu.counters
        let shadowing = path == .nvmx
        #expect(ops(before, after) == Ops(r: 4 + (shadowing ? Self.shadowRW : 0), w: 24, p: shadowing ? 3 : 1, c: shadowing ? 1 : 0))
        #expect(after.consistencyChecks - before.consistencyChecks == 6)
        #expect(after.msrBitmapMerges - before.msrBitmapMerges == 1)
        #expect(after.fullEntryChecks == before.fullEntryChecks)
        #expect(after.mmuRootSwitches - before.mmuRootSwitches == 1 && after.nestedVMEntries - before.nestedVMEntries == 1)
    }

    /// Section 2, dirty: an exiting VMWRITE dirtied vmcs12, so prepare_vmcs02_early_rare (2)
    /// and prepare_vmcs02_rare (54) write too, and the hardware runs its full entry checks; a
    /// control whose value changed costs one more VMWRITE (the cached setters skip the rest).
    @Test func aDirtyVMRESUMEAddsTheRareWritesAndTheFullChecks() throws {
        let f = try Fixture(.nvmx)
        try f.launchL2()
        #expect(f.l2CPUID(function: 0) == .resume(.l1))
        f.vmwrite(.tscOffset, 0x1000)                           // not shadowed: exits, dirties vmcs12
        #expect(f.vmxResult == .succeed)
        let before = f.vcpu.counters
        #expect(f.vmx(.vmresume) == .enterL2)
        let after = f.vcpu.counters
        #expect(ops(before, after) == Ops(r: 4 + Self.shadowRW, w: 24 + 2 + 54, p: 3, c: 1))
        #expect(after.fullEntryChecks - before.fullEntryChecks == 1)
        #expect(f.l2CPUID(function: 0) == .resume(.l1))
        f.vmwrite(.secondaryVMExecControl, SecondaryExec.enableEPT | SecondaryExec.rdtscp)   // a control changes
        let beforeControl = f.vcpu.counters
        #expect(f.vmx(.vmresume) == .enterL2)
        #expect(f.vcpu.counters.hwVMWRITEs - beforeControl.hwVMWRITEs == UInt64(24 + 2 + 54 + 1))
    }

    /// The rare fields are synced once, when L1 first reads one after an exit.
    @Test func theRareSyncRunsOnTheFirstExitingVMREADOfARareField() throws {
        let f = try Fixture(.nvmxNoShadow)
        try f.launchL2()
        #expect(f.l2CPUID(function: 0) == .resume(.l1))
        _ = f.vmread(.vmExitReason)                              // exit information: not rare
        #expect(f.vcpu.counters.rareFieldSyncs == 0)
        _ = f.vmread(.guestESSelector)
        _ = f.vmread(.guestDSSelector)
        #expect(f.vcpu.counters.rareFieldSyncs == 1)
    }

    /// A vmcs12 with a VPID: no flush on exit, one on the first entry with that VPID.
    @Test func withAVPIDInVMCS12OnlyAnEntryWithANewVPIDFlushes() throws {
        let f = try Fixture(.nvmxNoShadow)
        try f.enterVMXOperation()
        let v = try f.prepareValidVMCS12()
        v[.secondaryVMExecControl] = SecondaryExec.enableEPT | SecondaryExec.enableVPID
        v[.virtualProcessorID] = 1
        f.vmx(.vmptrld, Plan.vmcs12)
        #expect(f.vmx(.vmlaunch) == .enterL2)
        #expect(f.vcpu.counters.tlbFlushes == 1)
        #expect(f.l2CPUID(function: 0) == .resume(.l1))
        #expect(f.vmx(.vmresume) == .enterL2)
        #expect(f.vcpu.counters.tlbFlushes == 1)
    }

    /// nested_vmx_run's first check: VMLAUNCH under MOV-SS blocking is VMfailValid(26).
    @Test func anEntryUnderMOVSSBlockingIsVMfailValid26() throws {
        let f = try Fixture(.nvmx)
        try f.loadValidVMCS12()
        f.l1Run[RunPage.interruptibility] = 2
        #expect(f.vmx(.vmlaunch) == .resume(.l1))
        #expect(f.vmxResult == .failValid(.entryEventsBlockedByMovSS))
        #expect(f.vcpu.counters.consistencyChecks == 1 && !f.nested.guestMode)
    }
}
