import ABI
import Transport

/// The L2-exit side of nested VMX: which exits L1 must see (`NestedExitRules`, pure), how L0
/// reflects one as a VM exit into vmcs12 (KVM's nested_vmx_vmexit), and what L0 does with the
/// ones it keeps. EPT violations continue in NestedEPT.swift.
extension NestedVMXBackend {
    public func handleL2Exit(_ exit: L2Exit, _ regs: inout RegisterFile, _ vcpu: L0VCPU) -> NextStep {
        guard let vmcs12 else { return .stop(.fatal(.noCurrentVMCS12)) }
        if NestedExitRules.reflects(exit, vmcs12: vmcs12, registers: regs, l1Memory: vcpu.l1Memory) {
            return reflect(exit.info, l2: regs, vcpu)
        }
        switch exit.kind {
        case let .eptViolation(gpa, access, _):
            return handleEPTViolation(exit, gpa: gpa, access: access, vmcs12, &regs, vcpu)
        case .io(let io):
            return vcpu.handleL0PortIO(io, exit, &regs)
        case .msrRead, .msrWrite:
            return vcpu.handleL0MSR(exit, &regs)
        default:
            switch exit.info.reason {
            case .hlt, .pause, .rdtsc, .rdtscp, .invlpg, .mwait, .monitor:
                // L1 did not ask for these. HLT: L0 has no other work and an interrupt is
                // "pending" at once, so L2 wakes immediately.
                regs.skipInstruction(length: exit.info.instructionLength)
                return .resume(.l2)
            default:
                return .stop(.fatal(.unhandledL2Exit(exit.info.reason)))
            }
        }
    }

    /// nested_vmx_vmexit: sync L2's state into vmcs12, write the exit information, refresh the
    /// shadow VMCS (or eVMCS), hand L1 L2's GPRs and load vmcs12's host state into L1.
    func reflect(_ info: L2ExitInfo, l2 regs: RegisterFile, _ vcpu: L0VCPU) -> NextStep {
        guard let v = vmcs12 else { return .stop(.fatal(.noCurrentVMCS12)) }
        var writes: UInt64 = 0
        v[.guestRIP] = regs[.rip]
        v[.guestRSP] = regs[.rsp]
        v[.guestRFLAGS] = regs[.rflags]
        v[.guestInterruptibilityInfo] = 0
        writes += 4
        v[.vmExitReason] = UInt64(info.reason.rawValue)
        v[.exitQualification] = info.qualification
        v[.guestPhysicalAddress] = info.guestPhysicalAddress.raw
        v[.guestLinearAddress] = info.guestLinearAddress
        v[.vmExitInstructionLen] = info.instructionLength
        v[.vmxInstructionInfo] = info.instructionInfo
        v[.vmExitIntrInfo] = info.interruptionInfo
        v[.vmExitIntrErrorCode] = info.interruptionErrorCode
        v[.idtVectoringInfoField] = 0
        v[.vmEntryIntrInfoField] = v[.vmEntryIntrInfoField] & ~(1 << 31)   // SDM 27.2: valid bit cleared
        writes += 10
        vcpu.counters.vmcs12FieldWrites += writes
        if shadowing { copyVMCS12ToShadow(vcpu) }
        if variant == .enlightened { writeBackEnlightenedVMCS(vcpu) }

        // L2's GPRs stay in the CPU across the exit: L1 finds them in its registers.
        var l1 = vcpu.l1Run.registers
        for r in Register.gprsOutsideVMCS { l1[r] = regs[r] }
        loadHostState(v, &l1, vcpu)
        vcpu.l1Run.registers = l1
        // The decoded access size of a faulting load/store: what L1's instruction emulator would
        // learn by fetching and decoding the instruction from L2 memory (no VMREAD involved).
        vcpu.l1Run[RunPage.instructionInfo] = info.instructionInfo
        guestMode = false
        vcpu.counters.vmcsSwitches += 1          // vmcs02 -> vmcs01
        vcpu.counters.countDelivery(info.reason)
        return .resume(.l1)
    }

    /// SDM 27.5: L1 continues at HOST_RIP with HOST_RSP and RFLAGS = 0x2, entered by a VM exit.
    func loadHostState(_ v: VMCSImage, _ l1: inout RegisterFile, _ vcpu: L0VCPU) {
        l1[.rip] = v[.hostRIP]
        l1[.rsp] = v[.hostRSP]
        l1[.rflags] = 0x2
        vcpu.counters.vmcs12FieldReads += 2
        vcpu.l1Run[RunPage.enteredByVMExit] = 1
        vcpu.l1Run[RunPage.vmxResult] = 0
    }
}

/// nested_vmx_reflect_vmexit: which L2 exits L1 must see, from vmcs12's controls and bitmaps.
/// Pure: reads vmcs12, L2's registers (for CR moves) and L1's bitmaps; changes nothing.
public enum NestedExitRules {
    public static func reflects(_ exit: L2Exit, vmcs12 v: VMCSImage, registers l2: RegisterFile, l1Memory: L1MemoryAccess) -> Bool {
        let cpu = v[.cpuBasedVMExecControl]
        let info = exit.info
        switch info.reason.basic {
        // L0 always keeps these (EPT faults are checked against EPT12 first).
        case .externalInterrupt, .eptViolation, .eptMisconfig, .preemptionTimer:
            return false
        // L1 always gets these.
        case .cpuid, .tripleFault, .taskSwitch, .invd, .xsetbv,
             .vmcall, .vmclear, .vmlaunch, .vmptrld, .vmptrst, .vmread, .vmresume, .vmwrite, .vmxoff, .vmxon,
             .invept, .invvpid:
            return true
        case .hlt: return cpu & CPUBased.hltExiting != 0
        case .invlpg: return cpu & CPUBased.invlpgExiting != 0
        case .rdpmc: return cpu & CPUBased.rdpmcExiting != 0
        case .rdtsc, .rdtscp: return cpu & CPUBased.rdtscExiting != 0
        case .mwait: return cpu & CPUBased.mwaitExiting != 0
        case .monitor: return cpu & CPUBased.monitorExiting != 0
        case .pause: return cpu & CPUBased.pauseExiting != 0
        case .drAccess: return cpu & CPUBased.movDRExiting != 0
        case .crAccess: return crAccessReflects(info.qualification, v, l2)
        case .ioInstruction:
            guard case .io(let io) = exit.kind else { return true }
            return ioReflects(io, cpu, v, l1Memory)
        case .msrRead, .msrWrite:
            switch exit.kind {
            case .msrRead(let msr): return msrReflects(msr, write: false, cpu, v, l1Memory)
            case .msrWrite(let msr, _): return msrReflects(msr, write: true, cpu, v, l1Memory)
            default: return true
            }
        case .exceptionNMI:
            let vector = info.interruptionInfo & 0xFF, type = (info.interruptionInfo >> 8) & 7
            if type == 2 { return v[.pinBasedVMExecControl] & PinBased.nmiExiting != 0 }   // NMI
            let bitmapSays = v[.exceptionBitmap] & (1 << vector) != 0
            guard vector == 14 else { return bitmapSays }
            // #PF (SDM 25.2): bit 14 decides when PFEC & MASK == MATCH, its inverse otherwise.
            let matches = info.interruptionErrorCode & v[.pageFaultErrorCodeMask] == v[.pageFaultErrorCodeMatch]
            return matches ? bitmapSays : !bitmapSays
        default:
            return true
        }
    }

    /// I/O: unconditional I/O exiting, or a set bit in I/O bitmap A (< 0x8000) / B for any byte.
    static func ioReflects(_ io: PortIO, _ cpu: UInt64, _ v: VMCSImage, _ mem: L1MemoryAccess) -> Bool {
        guard cpu & CPUBased.useIOBitmaps != 0 else { return cpu & CPUBased.unconditionalIOExiting != 0 }
        let port = UInt64(io.port)
        for p in port..<(port + io.size) {
            if p > 0xFFFF { return true }
            let bitmap = L1GPA(v[p < 0x8000 ? .ioBitmapA : .ioBitmapB])
            guard let byteAddr = bitmap.adding((p & 0x7FFF) / 8),
                  let byte: UInt8 = try? mem.load(byteAddr) else { return true }
            if byte & (1 << UInt8(p % 8)) != 0 { return true }
        }
        return false
    }

    /// MSRs: no MSR bitmap -> always; else L1's bitmap bit (read-low 0x000, read-high 0x400,
    /// write-low 0x800, write-high 0xC00); MSRs outside both ranges always reflect.
    static func msrReflects(_ msr: UInt32, write: Bool, _ cpu: UInt64, _ v: VMCSImage, _ mem: L1MemoryAccess) -> Bool {
        guard cpu & CPUBased.useMSRBitmaps != 0, let (offset, bit) = MSRBitmap.position(of: msr, write: write) else { return true }
        guard let addr = L1GPA(v[.msrBitmap]).adding(offset),
              let byte: UInt8 = try? mem.load(addr) else { return true }
        return byte & (1 << bit) != 0
    }

    /// CR access (SDM Table 28-3): MOV to CR0/CR4 reflects when a bit L1 owns (guest/host mask)
    /// would differ from its read shadow; CR3/CR8 by their load/store exiting controls.
    static func crAccessReflects(_ q: UInt64, _ v: VMCSImage, _ l2: RegisterFile) -> Bool {
        let cr = q & 0xF, type = (q >> 4) & 3
        let reg = Register(sdmNumber: (q >> 8) & 0xF) ?? .rax
        let cpu = v[.cpuBasedVMExecControl]
        switch (cr, type) {
        case (0, 0):
            return (l2[reg] ^ v[.cr0ReadShadow]) & v[.cr0GuestHostMask] != 0
        case (4, 0):
            return (l2[reg] ^ v[.cr4ReadShadow]) & v[.cr4GuestHostMask] != 0
        case (3, 0): return cpu & CPUBased.cr3LoadExiting != 0
        case (3, 1): return cpu & CPUBased.cr3StoreExiting != 0
        case (8, 0): return cpu & CPUBased.cr8LoadExiting != 0
        case (8, 1): return cpu & CPUBased.cr8StoreExiting != 0
        case (0, 2):   // CLTS: reflects if L1 owns CR0.TS and its shadow has TS set
            return v[.cr0GuestHostMask] & 8 != 0 && v[.cr0ReadShadow] & 8 != 0
        case (0, 3):   // LMSW
            let src = (q >> 16) & 0xFFFF
            return (src ^ v[.cr0ReadShadow]) & v[.cr0GuestHostMask] & 0xF != 0
        default: return true
        }
    }
}
