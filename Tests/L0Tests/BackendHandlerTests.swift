import ABI
import GuestDevices
@testable import L0
import Testing
import Transport

/// Backends fed typed exits directly, as Firecracker's `run_emulation` tests feed a vCPU: the
/// exit is a value, L2's registers a value the handler changes, and the next step the answer.
/// No run page is written to make the exit and none is read for the result; the vCPU's memory
/// is private anonymous memory (Fixture), no memfd and no other process.
@Suite struct BackendHandlerTests {
    static func l2(_ kind: L2Exit.Kind, _ reason: ExitReason, length: UInt64 = 2, qualification: UInt64 = 0,
                   gpa: L2GPA = L2GPA(0)) -> L2Exit {
        L2Exit(kind: kind, info: L2ExitInfo(reason: reason, qualification: qualification, guestPhysicalAddress: gpa,
                                            instructionLength: length))
    }

    @Test func decodingReadsTheOperandsOnceFromTheRegisters() {
        var r = RegisterFile()
        r[.rax] = 0xFFFF_FFFF_0000_0007; r[.rcx] = 0x1_0000_0001; r[.rdx] = 0xAB
        #expect(L2Exit(info: L2ExitInfo(reason: .cpuid), registers: r).kind == .cpuid(leaf: 7, subleaf: 1))
        #expect(L2Exit(info: L2ExitInfo(reason: .msrRead), registers: r).kind == .msrRead(1))
        #expect(L2Exit(info: L2ExitInfo(reason: .msrWrite), registers: r).kind == .msrWrite(1, value: 0xAB_0000_0007))
        let out = IOQualification.make(port: 0x4D0, size: 2, isIn: false)
        #expect(L2Exit(info: L2ExitInfo(reason: .ioInstruction, qualification: out), registers: r).kind
                == .io(PortIO(port: 0x4D0, size: 2, isIn: false, value: 0x0007)))
        let ept = L2ExitInfo(reason: .eptViolation, qualification: EPTViolationQualification.dataWrite | 0x38,
                             guestPhysicalAddress: L2GPA(0x1234_5678), instructionInfo: 4)
        #expect(L2Exit(info: ept, registers: r).kind == .eptViolation(L2GPA(0x1234_5678), access: EPT.write, size: 4))
        #expect(L2Exit(info: L2ExitInfo(reason: .tripleFault), registers: r).kind == .other)
        // L1's VMREAD names its registers in VMX_INSTRUCTION_INFO (SDM numbering).
        r[.rdx] = UInt64(VMCSField.guestRIP.rawValue)
        let vmread = L1ExitInfo(reason: .vmread, instructionInfo: VMXInstructionInfo.make(valueRegister: .rax, fieldRegister: .rdx))
        #expect(L1Exit(info: vmread, registers: r).kind
                == .vmx(.vmread(VMCSFieldOperands(field: UInt64(VMCSField.guestRIP.rawValue), valueRegister: .rax))))
        #expect(L1Exit(info: L1ExitInfo(reason: .vmptrld, vmxOperand: 0x3000), registers: r).kind == .vmx(.vmptrld(L1GPA(0x3000))))
        // A reason with flag bits (a failed entry's bit 31, say) is no instruction's.
        let flagged = ExitReason(rawValue: ExitReason.cpuid.rawValue | ExitReason.failedVMEntryFlag)
        #expect(L2Exit(info: L2ExitInfo(reason: flagged), registers: r).kind == .other)
        let flaggedLaunch = ExitReason(rawValue: ExitReason.vmlaunch.rawValue | ExitReason.failedVMEntryFlag)
        #expect(L1Exit(info: L1ExitInfo(reason: flaggedLaunch), registers: r).kind == .other)
    }

    @Test func anL1ExitWithAFlaggedReasonStopsTheStackInsteadOfRunningAsTheInstruction() throws {
        let f = try Fixture(.nvmx)
        let reason = ExitReason(rawValue: ExitReason.vmlaunch.rawValue | ExitReason.failedVMEntryFlag)
        #expect(f.vcpu.handleL1Exit(L1ExitInfo(reason: reason, instructionLength: 3)) == .stop(.fatal(.impossibleExit(.l1, reason))))
        #expect(!f.nested.guestMode && !f.vcpu.backend.hasL2VCPU)
    }

    @Test func onlyReasonsACPUReportsAreArchitectural() {
        #expect(ExitReason.cpuid.isArchitectural && ExitReason.notify.isArchitectural && ExitReason.exceptionNMI.isArchitectural)
        for raw: UInt32 in [35, 38, 42, 65, 70, 76, 79, 127, 128, 0xFFFF, 0xFFFF_FFFF,
                            ExitReason.cpuid.rawValue | ExitReason.failedVMEntryFlag, ExitReason.cpuid.rawValue | 1 << 16] {
            #expect(!ExitReason(rawValue: raw).isArchitectural, "\(raw)")
        }
    }

    /// An L2 exit with a reason no CPU reports is L2's CPU misbehaving: L0 stops the stack and
    /// reflects nothing, so the L1 (which trusts what L0 hands it) never sees it.
    @Test(arguments: [NestingPath.single, .pv, .nvmx, .nvmxEVMCS])
    func anL2ExitNoCPUReportsIsNeitherHandledNorReflected(_ path: NestingPath) throws {
        let f = try Fixture(path)
        let before = f.vcpu.counters
        let reason = ExitReason(rawValue: 0xFFFF_FFFF)
        #expect(f.vcpu.handleL2Exit(L2ExitInfo(reason: reason, instructionLength: 3)) == .stop(.fatal(.impossibleExit(.l2, reason))))
        #expect(f.vcpu.counters.totalDeliveries == before.totalDeliveries && f.vcpu.counters.nestedVMExits == before.nestedVMExits)
    }

    @Test func pvCPUIDIsAnsweredFromTheTableInTheRegisterFileAlone() throws {
        let f = try Fixture(.pv)
        try f.writeCPUIDEntries([CPUIDEntry(function: 1, eax: 0xA, ebx: 0xB, ecx: 0xC, edx: 0xD)], at: Plan.cpuidBuffer)
        #expect(f.hypercall(.setCPUID, Plan.cpuidBuffer.raw, 1).rax == HypercallError.success)
        let pageBefore = f.l2Run.registers
        var regs = RegisterFile()
        regs[.rip] = 0x1000
        let next = f.pv.handleL2Exit(Self.l2(.cpuid(leaf: 1, subleaf: 0), .cpuid), &regs, f.vcpu)
        #expect(next == .resume(.l2))
        #expect([regs[.rax], regs[.rbx], regs[.rcx], regs[.rdx]] == [0xA, 0xB, 0xC, 0xD])
        #expect(regs[.rip] == 0x1002)
        #expect(f.l2Run.registers == pageBefore)      // the handler changed the value, not shared memory
    }

    @Test func pvPolicyMSRWriteToAReadOnlyBitIsAGPFault() throws {
        let f = try Fixture(.pv)
        f.pv.msrPolicy[0x3B] = MSRPolicy(action: .emulate, writableMask: 0xFF)
        var regs = RegisterFile()
        regs[.rip] = 0x2000
        #expect(f.pv.handleL2Exit(Self.l2(.msrWrite(0x3B, value: 0x42), .msrWrite), &regs, f.vcpu) == .resume(.l2))
        #expect(f.vcpu.l0MSRs[0x3B] == 0x42 && regs[.rip] == 0x2002)
        #expect(f.pv.handleL2Exit(Self.l2(.msrWrite(0x3B, value: 0x1_0000), .msrWrite), &regs, f.vcpu) == .resume(.l2))
        #expect(f.vcpu.l0MSRs[0x3B] == 0x42 && regs[.rip] == 0x2002)       // not emulated: RIP stays
        #expect(f.l2Run[RunPage.eventInjection] & 0xFF == 13)
    }

    @Test func singleLevelPortIOReachesL0sLatchDevice() throws {
        let f = try Fixture(.single)
        let backend = try #require(f.vcpu.backend as? SingleLevelBackend)
        var regs = RegisterFile()
        let port = L0Devices.kernelPort
        #expect(backend.handleL2Exit(Self.l2(.io(PortIO(port: port, size: 4, isIn: false, value: 0xBEEF)), .ioInstruction, length: 1),
                                     &regs, f.vcpu) == .resume(.l2))
        regs[.rax] = 0xFFFF_FFFF_0000_0000
        #expect(backend.handleL2Exit(Self.l2(.io(PortIO(port: port, size: 2, isIn: true, value: 0)), .ioInstruction, length: 1),
                                     &regs, f.vcpu) == .resume(.l2))
        #expect(regs[.rax] == 0xFFFF_FFFF_0000_BEEF)               // 2 bytes replaced, the rest kept
        #expect(regs[.rip] == 2)
    }

    @Test func nestedCPUIDIsReflectedToL1WithL2sRegistersAndTheExitInVMCS12() throws {
        let f = try Fixture(.nvmx)
        let v = try f.launchL2()
        var regs = RegisterFile()
        regs[.rip] = 0x4000; regs[.rbx] = 0xB0B
        let next = f.nested.handleL2Exit(Self.l2(.cpuid(leaf: 0, subleaf: 0), .cpuid), &regs, f.vcpu)
        #expect(next == .resume(.l1))
        #expect(!f.nested.guestMode)
        #expect(v[.vmExitReason] == UInt64(ExitReason.cpuid.rawValue) && v[.guestRIP] == 0x4000 && v[.vmExitInstructionLen] == 2)
        #expect(f.l1Run[register: .rbx] == 0xB0B && f.l1Run[register: .rip] == Plan.hostRIP)
        #expect(regs[.rip] == 0x4000)                               // L1 emulates; L0 did not skip it
    }

    @Test func nestedVMRESUMEIsTheNextStepEnterL2() throws {
        let f = try Fixture(.nvmx)
        try f.launchL2()
        var l2 = RegisterFile()
        l2[.rflags] = 0x2          // a valid guest RFLAGS goes back into vmcs12 with the exit
        _ = f.nested.handleL2Exit(Self.l2(.cpuid(leaf: 0, subleaf: 0), .cpuid), &l2, f.vcpu)
        var l1 = f.l1Run.registers
        let resume = L1Exit(kind: .vmx(.vmresume), info: L1ExitInfo(reason: .vmresume, instructionLength: 3))
        #expect(f.nested.handleL1Exit(resume, &l1, f.vcpu) == .enterL2)
        #expect(f.nested.guestMode)
        let launchAgain = L1Exit(kind: .vmx(.vmlaunch), info: L1ExitInfo(reason: .vmlaunch, instructionLength: 3))
        f.nested.guestMode = false
        #expect(f.nested.handleL1Exit(launchAgain, &l1, f.vcpu) == .resume(.l1))   // VMfailValid: already launched
        #expect(f.l1Run[RunPage.vmInstructionError] == UInt64(VMInstructionError.vmlaunchNonClearVMCS.rawValue))
    }
}

/// The PM timer of the device model: a 24-bit count at 3.579545 MHz that never overflows.
@Suite struct PMTimerTests {
    @Test func theCountIsExactAndNeverTraps() {
        #expect(L1Devices.pmTimerTicks(atNanos: 0) == 0)
        #expect(L1Devices.pmTimerTicks(atNanos: 1_000_000_000) == 3_579_545 & 0xFF_FFFF)
        #expect(L1Devices.pmTimerTicks(atNanos: 2_000_000_000) == 7_159_090 & 0xFF_FFFF)
        // Past 86 minutes the naive nanos x 3,579,545 wraps 2^64; up to 2^64 ns it must not trap.
        for t: UInt64 in [6_000_000_000_000, UInt64.max / 2, UInt64.max] {
            let ticks = L1Devices.pmTimerTicks(atNanos: t)
            #expect(ticks <= 0xFF_FFFF)
        }
        #expect(L1Devices.pmTimerTicks(atNanos: 6_000_000_000_000) == (6_000 * 3_579_545) & 0xFF_FFFF)
    }
}
