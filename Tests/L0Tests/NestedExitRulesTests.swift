import ABI
@testable import L0
import Testing
import Transport

/// nested_vmx_reflect_vmexit as a pure function of the exit, vmcs12, L2's registers and L1's bitmaps.
@Suite struct NestedExitRulesTests {
    let f: Fixture
    let v: VMCSImage

    init() throws {
        f = try Fixture(.nvmx)
        try f.store32(VMCS12Layout.revisionID, Plan.vmcs12)
        v = try f.vmcs(at: Plan.vmcs12)
    }

    func reflects(_ exit: L2ExitInfo) -> Bool {
        reflectsDecoded(L2Exit(info: exit, registers: f.l2Run.registers), vcpu: v, f)
    }

    func reflects(_ reason: ExitReason, qualification: UInt64 = 0, interruptionInfo: UInt64 = 0) -> Bool {
        reflects(L2ExitInfo(reason: reason, qualification: qualification, interruptionInfo: interruptionInfo))
    }

    func io(port: UInt16, size: Int, isIn: Bool = true) -> Bool {
        reflects(.ioInstruction, qualification: IOQualification.make(port: port, size: size, isIn: isIn))
    }

    func setBit(_ base: L1GPA, _ bit: UInt64) throws {
        let at = L1GPA(base.raw + bit / 8)
        let old: UInt8 = try f.host.load(at: f.hostOffset(at).raw)
        try f.store8(old | 1 << UInt8(bit % 8), at)
    }

    /// kvm-nested-work.md section 6, every row: what L0 keeps whatever vmcs12 says, what L1
    /// always gets, and what L1 gets exactly when its control asks.
    @Test func kvmsTwoTablesRowByRow() {
        v[.cpuBasedVMExecControl] = ~0 & ~CPUBased.useIOBitmaps & ~CPUBased.useMSRBitmaps
        v[.secondaryVMExecControl] = ~0
        v[.pinBasedVMExecControl] = ~0
        for r in [ExitReason.externalInterrupt, .mceDuringVMEntry, .eptViolation, .eptMisconfig, .preemptionTimer,
                  .pmlFull, .vmfunc, .busLock, .notify, .encls] {
            #expect(!reflects(r), "L0 keeps \(r)")
        }
        #expect(!reflects(.exceptionNMI, interruptionInfo: 1 << 31 | 2 << 8 | 2), "NMIs are L0's")
        #expect(!reflects(.ioInstruction, qualification: IOQualification.make(port: Ucall.port, size: 4, isIn: false)),
                "the harness's ucall port is L0's")

        v[.cpuBasedVMExecControl] = 0
        v[.secondaryVMExecControl] = 0
        v[.pinBasedVMExecControl] = 0
        for r in [ExitReason.tripleFault, .interruptWindow, .nmiWindow, .taskSwitch, .cpuid, .invd, .vmcall, .vmclear,
                  .vmlaunch, .vmptrld, .vmptrst, .vmresume, .vmxoff, .vmxon, .invept, .invvpid, .apicAccess, .apicWrite,
                  .eoiInduced, .xsetbv, .xsaves, .xrstors, .invalidState, .vmread, .vmwrite, .msrLoadFail] {
            #expect(reflects(r), "L1 always gets \(r)")
        }
        typealias Rule = (ExitReason, cpu: UInt64, secondary: UInt64)
        let byControl: [Rule] = [
            (.hlt, CPUBased.hltExiting, 0), (.invlpg, CPUBased.invlpgExiting, 0), (.rdpmc, CPUBased.rdpmcExiting, 0),
            (.rdtsc, CPUBased.rdtscExiting, 0), (.rdtscp, CPUBased.rdtscExiting, 0), (.mwait, CPUBased.mwaitExiting, 0),
            (.monitor, CPUBased.monitorExiting, 0), (.drAccess, CPUBased.movDRExiting, 0),
            (.monitorTrapFlag, CPUBased.monitorTrapFlag, 0), (.tprBelowThreshold, CPUBased.tprShadow, 0),
            (.pause, CPUBased.pauseExiting, 0), (.pause, 0, SecondaryExec.pauseLoopExiting),
            (.wbinvd, 0, SecondaryExec.wbinvdExiting), (.rdrand, 0, SecondaryExec.rdrandExiting),
            (.rdseed, 0, SecondaryExec.rdseedExiting), (.gdtrIdtr, 0, SecondaryExec.descriptorTableExiting),
            (.ldtrTr, 0, SecondaryExec.descriptorTableExiting), (.umwait, 0, SecondaryExec.enableUserWaitPause),
            (.tpause, 0, SecondaryExec.enableUserWaitPause),
            (.invpcid, CPUBased.invlpgExiting, SecondaryExec.enableINVPCID),
        ]
        for (r, cpu, secondary) in byControl {
            v[.cpuBasedVMExecControl] = CPUBased.activateSecondaryControls
            v[.secondaryVMExecControl] = 0
            #expect(!reflects(r), "\(r) without its control")
            v[.cpuBasedVMExecControl] = cpu | CPUBased.activateSecondaryControls
            v[.secondaryVMExecControl] = secondary
            #expect(reflects(r), "\(r) with its control")
        }
        // INVPCID needs both controls; either alone keeps it in L0.
        v[.cpuBasedVMExecControl] = CPUBased.activateSecondaryControls
        v[.secondaryVMExecControl] = SecondaryExec.enableINVPCID
        #expect(!reflects(.invpcid))
        // External interrupts: by the pin control.
        v[.pinBasedVMExecControl] = PinBased.externalInterruptExiting
        #expect(!reflects(.externalInterrupt), "checked by L0 first: the host's interrupt")
    }

    /// vmexit.c's CR tests under a KVM L1's masks (EPT on): toggling CR0.WP or CR4.PGE changes only
    /// bits L1 lets its guest own, so L1 never sees it; CR8 without CR8 exiting stays in L0; a bit
    /// L1 owns (CR0.PE) reaches it.
    @Test func vmexitsCRTestsReflectByAKVMsMasks() {
        v[.cpuBasedVMExecControl] = 0
        v[.cr0GuestHostMask] = ControlRegisterBits.kvmCR0GuestHostMask
        v[.cr4GuestHostMask] = ControlRegisterBits.kvmCR4GuestHostMask
        v[.cr0ReadShadow] = ControlRegisterBits.initialCR0
        v[.cr4ReadShadow] = ControlRegisterBits.initialCR4
        func movTo(_ cr: UInt64, _ value: UInt64) -> Bool {
            f.l2Run[register: .rax] = value
            return reflects(.crAccess, qualification: CRAccessQualification.make(cr: cr, type: CRAccessQualification.movToCR, register: .rax))
        }
        #expect(!movTo(0, ControlRegisterBits.initialCR0 ^ ControlRegisterBits.cr0WP))
        #expect(!movTo(4, ControlRegisterBits.initialCR4 ^ ControlRegisterBits.cr4PGE))
        #expect(movTo(0, ControlRegisterBits.initialCR0 ^ 1))
        #expect(!movTo(8, 0))
        v[.cpuBasedVMExecControl] = CPUBased.cr8LoadExiting
        #expect(movTo(8, 0))
    }

    /// L2's own VMREAD/VMWRITE: L1 gets it unless vmcs12 shadows VMCS accesses and L1's bitmap
    /// lets the field through (nested_vmx_exit_handled_vmcs_access).
    @Test func l2sVMREADReflectsByL1sShadowingAndBitmap() throws {
        v[.cpuBasedVMExecControl] = CPUBased.activateSecondaryControls
        v[.secondaryVMExecControl] = SecondaryExec.shadowVMCS
        v[.vmreadBitmap] = Plan.ioBitmapA.raw                       // all zero: every field passes
        f.l2Run[register: .rdx] = UInt64(VMCSField.guestRIP.rawValue)
        let info = L2ExitInfo(reason: .vmread, instructionInfo: VMXInstructionInfo.make(valueRegister: .rax, fieldRegister: .rdx))
        #expect(!reflects(info))
        try setBit(Plan.ioBitmapA, UInt64(VMCSField.guestRIP.rawValue))
        #expect(reflects(info))
        f.l2Run[register: .rdx] = 0x8000                             // beyond any bitmap: always L1's
        #expect(reflects(info))
        v[.secondaryVMExecControl] = 0
        f.l2Run[register: .rdx] = UInt64(VMCSField.guestRSP.rawValue)
        #expect(reflects(info))
    }

    @Test func cpuidAndVMXInstructionsAlwaysReflect() {
        v[.cpuBasedVMExecControl] = 0
        for r in [ExitReason.cpuid, .vmcall, .vmclear, .vmlaunch, .vmptrld, .vmptrst, .vmread, .vmresume, .vmwrite,
                  .vmxoff, .vmxon, .invept, .invvpid, .tripleFault, .taskSwitch, .invd, .xsetbv] {
            #expect(reflects(r), "\(r)")
        }
    }

    @Test func eptViolationsExternalInterruptsAndPreemptionTimerNeverReflect() {
        v[.cpuBasedVMExecControl] = ~0
        v[.exceptionBitmap] = ~0
        for r in [ExitReason.eptViolation, .eptMisconfig, .externalInterrupt, .preemptionTimer] {
            #expect(!reflects(r), "\(r)")
        }
    }

    @Test func hltAndOtherControlledExitsReflectOnlyWithTheirControl() {
        let controlled: [(ExitReason, UInt64)] = [
            (.hlt, CPUBased.hltExiting), (.invlpg, CPUBased.invlpgExiting), (.rdpmc, CPUBased.rdpmcExiting),
            (.rdtsc, CPUBased.rdtscExiting), (.rdtscp, CPUBased.rdtscExiting), (.mwait, CPUBased.mwaitExiting),
            (.monitor, CPUBased.monitorExiting), (.pause, CPUBased.pauseExiting), (.drAccess, CPUBased.movDRExiting),
        ]
        for (reason, bit) in controlled {
            v[.cpuBasedVMExecControl] = ~bit & 0xFFFF_FFFF
            #expect(!reflects(reason), "\(reason) without its control")
            v[.cpuBasedVMExecControl] = bit
            #expect(reflects(reason), "\(reason) with its control")
        }
    }

    @Test func ioWithoutBitmapsFollowsUnconditionalIOExiting() {
        v[.cpuBasedVMExecControl] = 0
        #expect(!io(port: 0x60, size: 1))
        v[.cpuBasedVMExecControl] = CPUBased.unconditionalIOExiting
        #expect(io(port: 0x60, size: 1))
        #expect(io(port: 0xFFFF, size: 1, isIn: false))
    }

    @Test func ioBitmapsOverrideUnconditionalIOExiting() throws {
        v[.cpuBasedVMExecControl] = CPUBased.useIOBitmaps | CPUBased.unconditionalIOExiting
        v[.ioBitmapA] = Plan.ioBitmapA.raw
        v[.ioBitmapB] = Plan.ioBitmapB.raw
        #expect(!io(port: 0x60, size: 1))
        try setBit(Plan.ioBitmapA, 0x61)
        #expect(!io(port: 0x60, size: 1))
        #expect(io(port: 0x61, size: 1))
        #expect(io(port: 0x60, size: 2))        // the second byte hits 0x61
        #expect(io(port: 0x5E, size: 4))
        #expect(!io(port: 0x62, size: 4))
        try setBit(Plan.ioBitmapB, 0xC000 - 0x8000)
        #expect(io(port: 0xC000, size: 1))
        #expect(!io(port: 0xC001, size: 1))
    }

    @Test func aMultiByteAccessIsCheckedInBothBitmapsForEveryByte() throws {
        v[.cpuBasedVMExecControl] = CPUBased.useIOBitmaps
        v[.ioBitmapA] = Plan.ioBitmapA.raw
        v[.ioBitmapB] = Plan.ioBitmapB.raw
        // 0x7FFE..0x8001: two bytes in A, two in B.
        #expect(!io(port: 0x7FFE, size: 4))
        try setBit(Plan.ioBitmapB, 1)           // port 0x8001: B bit 1
        #expect(io(port: 0x7FFE, size: 4))
        #expect(!io(port: 0x7FFE, size: 2))
        #expect(!io(port: 0x8000, size: 1))
        #expect(io(port: 0x8000, size: 2))
        // Port 0x7FFF in A.
        let g = try Fixture(.nvmx)
        let w = try g.vmcs(at: Plan.vmcs12)
        w[.cpuBasedVMExecControl] = CPUBased.useIOBitmaps
        w[.ioBitmapA] = Plan.ioBitmapA.raw
        w[.ioBitmapB] = Plan.ioBitmapB.raw
        try g.store8(0x80, L1GPA(Plan.ioBitmapA.raw + 0x7FFF / 8))
        let q = IOQualification.make(port: 0x7FFE, size: 4, isIn: false)
        #expect(reflectsDecoded(L2Exit(info: L2ExitInfo(reason: .ioInstruction, qualification: q), registers: g.l2Run.registers), vcpu: w, g))
    }

    @Test func anAccessThatWrapsPastPort0xFFFFReflects() {
        v[.cpuBasedVMExecControl] = CPUBased.useIOBitmaps
        v[.ioBitmapA] = Plan.ioBitmapA.raw
        v[.ioBitmapB] = Plan.ioBitmapB.raw
        #expect(!io(port: 0xFFFF, size: 1))
        #expect(io(port: 0xFFFF, size: 2))
        #expect(io(port: 0xFFFE, size: 4))
    }

    @Test func anIOBitmapL0CannotReadReflects() {
        v[.cpuBasedVMExecControl] = CPUBased.useIOBitmaps
        v[.ioBitmapA] = Plan.slotSize
        v[.ioBitmapB] = Plan.ioBitmapB.raw
        #expect(io(port: 0x60, size: 1))
        #expect(!io(port: 0x8060, size: 1))
    }

    func msr(_ index: UInt32, write: Bool) -> Bool {
        f.l2Run[register: .rcx] = 0xFFFF_FFFF_0000_0000 | UInt64(index)   // ECX only
        return reflects(write ? .msrWrite : .msrRead)
    }

    @Test func withoutAnMSRBitmapEveryMSRAccessReflects() {
        v[.cpuBasedVMExecControl] = 0
        for index: UInt32 in [0x10, 0x1B, 0xC000_0080, 0x4000_0000] {
            #expect(msr(index, write: false))
            #expect(msr(index, write: true))
        }
    }

    @Test func theMSRBitmapHasReadLowReadHighWriteLowAndWriteHighQuarters() throws {
        v[.cpuBasedVMExecControl] = CPUBased.useMSRBitmaps
        v[.msrBitmap] = Plan.msrBitmap.raw
        for index: UInt32 in [0x10, 0x1FFF, 0xC000_0080, 0xC000_1FFF] {
            #expect(!msr(index, write: false), "0x\(String(index, radix: 16))")
            #expect(!msr(index, write: true), "0x\(String(index, radix: 16))")
        }
        try setBit(Plan.msrBitmap, 0x000 * 8 + 0x10)          // read-low
        try setBit(Plan.msrBitmap, 0x400 * 8 + 0x80)          // read-high: 0xC000_0080
        try setBit(Plan.msrBitmap, 0x800 * 8 + 0x1FFF)        // write-low
        try setBit(Plan.msrBitmap, 0xC00 * 8 + 0x1FFF)        // write-high: 0xC000_1FFF
        #expect(msr(0x10, write: false))
        #expect(!msr(0x10, write: true))
        #expect(msr(0xC000_0080, write: false))
        #expect(!msr(0xC000_0080, write: true))
        #expect(!msr(0x80, write: false))                     // the low MSR with the same bit
        #expect(msr(0x1FFF, write: true))
        #expect(!msr(0x1FFF, write: false))
        #expect(msr(0xC000_1FFF, write: true))
        #expect(!msr(0xC000_1FFF, write: false))
    }

    @Test func anMSROutsideBothRangesAlwaysReflects() {
        v[.cpuBasedVMExecControl] = CPUBased.useMSRBitmaps
        v[.msrBitmap] = Plan.msrBitmap.raw
        for index: UInt32 in [0x2000, 0x4000_0000, 0xBFFF_FFFF, 0xC000_2000, 0xFFFF_FFFF] {
            #expect(msr(index, write: false), "0x\(String(index, radix: 16))")
            #expect(msr(index, write: true), "0x\(String(index, radix: 16))")
        }
    }

    /// CR access qualification (SDM Table 28-3): CR number 3:0, access type 5:4, GPR 11:8.
    static func movToCR(_ cr: UInt64, gpr: UInt64) -> UInt64 { cr | 0 << 4 | gpr << 8 }

    @Test func aCR0WriteReflectsOnlyWhenAnOwnedBitDiffersFromTheReadShadow() {
        v[.cr0GuestHostMask] = Plan.cr0PG | 1 << 0        // L1 owns PG and PE
        v[.cr0ReadShadow] = Plan.cr0PG | 1
        let q = Self.movToCR(0, gpr: 0)                    // MOV CR0, RAX
        f.l2Run[register: .rax] = Plan.cr0PG | 1 | 1 << 5 | 1 << 16   // only unowned bits differ
        #expect(!reflects(.crAccess, qualification: q))
        f.l2Run[register: .rax] = 1 | 1 << 5               // PG would clear
        #expect(reflects(.crAccess, qualification: q))
        v[.cr0GuestHostMask] = 0
        #expect(!reflects(.crAccess, qualification: q))
    }

    @Test func aCR4WriteUsesTheCR4MaskAndShadow() {
        v[.cr4GuestHostMask] = 1 << 13                     // VMXE
        v[.cr4ReadShadow] = 0
        let q = Self.movToCR(4, gpr: 0)
        f.l2Run[register: .rax] = Plan.cr4PAE
        #expect(!reflects(.crAccess, qualification: q))
        f.l2Run[register: .rax] = Plan.cr4PAE | 1 << 13
        #expect(reflects(.crAccess, qualification: q))
    }

    @Test func cr3AndCR8AccessesFollowTheirExitingControls() {
        v[.cpuBasedVMExecControl] = 0
        #expect(!reflects(.crAccess, qualification: 3 | 0 << 4))
        #expect(!reflects(.crAccess, qualification: 3 | 1 << 4))
        #expect(!reflects(.crAccess, qualification: 8 | 0 << 4))
        v[.cpuBasedVMExecControl] = CPUBased.cr3LoadExiting | CPUBased.cr8StoreExiting
        #expect(reflects(.crAccess, qualification: 3 | 0 << 4))
        #expect(!reflects(.crAccess, qualification: 3 | 1 << 4))
        #expect(!reflects(.crAccess, qualification: 8 | 0 << 4))
        #expect(reflects(.crAccess, qualification: 8 | 1 << 4))
    }

    /// The GPR field of the CR-access qualification uses the x86 register numbering
    /// (0 RAX, 1 RCX, 2 RDX, 3 RBX, 4 RSP, 5 RBP, 6 RSI, 7 RDI), not `Register`'s kvm_regs order.
    @Test func theCRAccessRegisterFieldUsesTheSDMRegisterNumbering() {
        v[.cr0GuestHostMask] = Plan.cr0PG
        v[.cr0ReadShadow] = Plan.cr0PG
        let sdmNumbering: [(UInt64, Register)] = [(1, .rcx), (2, .rdx), (3, .rbx), (6, .rsi), (7, .rdi)]
        for (number, register) in sdmNumbering {
            for r in Register.allCases { f.l2Run[register: r] = Plan.cr0PG }   // no owned bit changes
            f.l2Run[register: register] = 0                                     // ...except in the named register
            do {
                #expect(reflects(.crAccess, qualification: Self.movToCR(0, gpr: number)), "GPR \(number) = \(register)")
            }
        }
    }

    @Test func exceptionsReflectByTheExceptionBitmap() {
        v[.exceptionBitmap] = 1 << 14 | 1 << 3
        let pf: UInt64 = 1 << 31 | 3 << 8 | 14
        let ud: UInt64 = 1 << 31 | 3 << 8 | 6
        let bp: UInt64 = 1 << 31 | 6 << 8 | 3
        #expect(reflects(.exceptionNMI, interruptionInfo: pf))
        #expect(!reflects(.exceptionNMI, interruptionInfo: ud))
        #expect(reflects(.exceptionNMI, interruptionInfo: bp))
        v[.exceptionBitmap] = 0
        #expect(!reflects(.exceptionNMI, interruptionInfo: pf))
    }

    @Test func theRulesChangeNothing() throws {
        v[.cpuBasedVMExecControl] = CPUBased.useIOBitmaps | CPUBased.useMSRBitmaps
        v[.ioBitmapA] = Plan.ioBitmapA.raw
        v[.ioBitmapB] = Plan.ioBitmapB.raw
        v[.msrBitmap] = Plan.msrBitmap.raw
        let vmcsBefore = try f.host.readBytes(at: f.hostOffset(Plan.vmcs12).raw, count: 4096)
        let regs = f.l2Run.registers
        for r in [ExitReason.cpuid, .ioInstruction, .msrRead, .msrWrite, .crAccess, .eptViolation, .hlt] {
            _ = reflects(r, qualification: 0x60 << 16)
        }
        #expect(try f.host.readBytes(at: f.hostOffset(Plan.vmcs12).raw, count: 4096) == vmcsBefore)
        #expect(f.l2Run.registers == regs)
        #expect(f.vcpu.counters == TransitionCounters())
    }
}

/// The rule as L0 applies it: the exit decoded from the registers L2 left.
func reflectsDecoded(_ exit: L2Exit, vcpu v: VMCSImage, _ f: Fixture) -> Bool {
    NestedExitRules.reflects(exit, vmcs12: v, registers: f.l2Run.registers, l1Memory: f.vcpu.l1Memory)
}
