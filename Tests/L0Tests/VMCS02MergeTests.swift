import ABI
import Testing
import Transport
@testable import L0

/// prepare_vmcs02's merge, EPT A/D bits set by L0's walk, and the work counted for the model.
@Suite struct VMCS02MergeTests {
    @Test func vmcs02ControlsAreL1sORedWithWhatL0NeedsAndExceptionBitmapsMerge() throws {
        let f = try Fixture(.nvmx)
        let v = try f.loadValidVMCS12()
        f.l1SetField(.exceptionBitmap, 1 << 6 | 1 << 14)
        f.l1SetField(.cpuBasedVMExecControl, v[.cpuBasedVMExecControl] | CPUBased.rdtscExiting)
        #expect(f.vmx(.vmlaunch) == .enterL2)
        let c = f.nested.vmcs02
        #expect(c.exceptionBitmap == 1 << 6 | 1 << 14 | 1 << 18)                       // L1's | L0's #MC
        #expect(c.cpuBased & CPUBased.rdtscExiting != 0)                              // L1 asked
        #expect(c.cpuBased & CPUBased.unconditionalIOExiting != 0)                    // L0 needs it
        #expect(c.pinBased & PinBased.externalInterruptExiting != 0)
        #expect(c.secondary & SecondaryExec.enableEPT != 0)
        // KVM's groups in order: nested_vmx_run (MOV-SS, launch state), execution, exit and entry
        // controls, host state, guest state.
        #expect(f.vcpu.counters.consistencyChecks == 6)
    }

    @Test func aWalkWithADEnabledSetsAccessedAndForAWriteDirty() throws {
        let f = try Fixture(.nvmx)
        let v = try f.launchL2()
        v[.eptPointer] = Plan.eptp | EPT.eptpADEnable
        f.nested.shadowedEPTP = v[.eptPointer]       // same root: no rebuild needed for the test
        let gpa: UInt64 = 0x20_0000
        try f.writeEPT12Path(gpa: gpa, leafLevel: 1, leaf: Fixture.eptLeaf(Plan.l2Backing.raw))
        _ = f.l2Exit(L2ExitInfo(reason: .eptViolation, qualification: EPTViolationQualification.dataWrite,
                               guestPhysicalAddress: L2GPA(gpa), instructionLength: 3))
        for (i, t) in Plan.ept12Tables.enumerated() {
            let level = 4 - i
            let e = try f.vcpu.l1Memory.load64(L1GPA(t.raw + Fixture.eptIndex(gpa, level: level) * 8))
            #expect(e & EPT.accessed != 0, "level \(level)")
            #expect((e & EPT.dirty != 0) == (level == 1), "level \(level)")
        }
        #expect(f.vcpu.counters.ept12ADUpdates == 4)
    }

    @Test func withoutADEnabledTheWalkLeavesL1sEntriesAlone() throws {
        let f = try Fixture(.nvmx)
        try f.launchL2()
        let gpa: UInt64 = 0x20_0000
        let leaf = Fixture.eptLeaf(Plan.l2Backing.raw)
        try f.writeEPT12Path(gpa: gpa, leafLevel: 1, leaf: leaf)
        _ = f.l2Exit(L2ExitInfo(reason: .eptViolation, qualification: EPTViolationQualification.dataWrite,
                               guestPhysicalAddress: L2GPA(gpa), instructionLength: 3))
        #expect(try f.vcpu.l1Memory.load64(L1GPA(Plan.ept12Tables[3].raw + Fixture.eptIndex(gpa, level: 1) * 8)) == leaf)
        #expect(f.vcpu.counters.ept12ADUpdates == 0)
    }
}
