import ABI
import Transport

/// nested_vmx_reflect_vmexit: which L2 exits L1 must see, from vmcs12's controls and bitmaps.
/// Pure: reads vmcs12, L2's registers (for CR moves) and L1's bitmaps; changes nothing.
public enum NestedExitRules {
    public static func reflects(_ exit: GuestExit, vmcs12 v: VMCSImage, l2: RunPageView, l1Memory: L1MemoryAccess) -> Bool {
        let cpu = v[.cpuBasedVMExecControl]
        switch exit.reason.basic {
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
        case .crAccess: return crAccessReflects(exit.qualification, v, l2)
        case .ioInstruction: return ioReflects(exit.qualification, cpu, v, l1Memory)
        case .msrRead, .msrWrite:
            return msrReflects(UInt32(truncatingIfNeeded: l2[register: .rcx]), write: exit.reason == .msrWrite, cpu, v, l1Memory)
        case .exceptionNMI:
            let vector = exit.interruptionInfo & 0xFF, type = (exit.interruptionInfo >> 8) & 7
            if type == 2 { return v[.pinBasedVMExecControl] & PinBased.nmiExiting != 0 }   // NMI
            let bitmapSays = v[.exceptionBitmap] & (1 << vector) != 0
            guard vector == 14 else { return bitmapSays }
            // #PF (SDM 25.2): bit 14 decides when PFEC & MASK == MATCH, its inverse otherwise.
            let matches = exit.interruptionErrorCode & v[.pageFaultErrorCodeMask] == v[.pageFaultErrorCodeMatch]
            return matches ? bitmapSays : !bitmapSays
        default:
            return true
        }
    }

    /// I/O: unconditional I/O exiting, or a set bit in I/O bitmap A (< 0x8000) / B for any byte.
    static func ioReflects(_ q: UInt64, _ cpu: UInt64, _ v: VMCSImage, _ mem: L1MemoryAccess) -> Bool {
        guard cpu & CPUBased.useIOBitmaps != 0 else { return cpu & CPUBased.unconditionalIOExiting != 0 }
        let port = UInt64(IOQualification.port(q)), size = UInt64(IOQualification.size(q))
        for p in port..<(port + size) {
            if p > 0xFFFF { return true }
            let bitmap = L1GPA(v[p < 0x8000 ? .ioBitmapA : .ioBitmapB])
            guard let byteAddr = bitmap.adding((p & 0x7FFF) / 8),
                  let host = try? mem.memslots.translate(byteAddr),
                  let byte: UInt8 = try? mem.host.load(at: host) else { return true }
            if byte & (1 << UInt8(p % 8)) != 0 { return true }
        }
        return false
    }

    /// MSRs: no MSR bitmap -> always; else L1's bitmap bit (read-low 0x000, read-high 0x400,
    /// write-low 0x800, write-high 0xC00); MSRs outside both ranges always reflect.
    static func msrReflects(_ msr: UInt32, write: Bool, _ cpu: UInt64, _ v: VMCSImage, _ mem: L1MemoryAccess) -> Bool {
        guard cpu & CPUBased.useMSRBitmaps != 0, let (offset, bit) = MSRBitmap.position(of: msr, write: write) else { return true }
        guard let addr = L1GPA(v[.msrBitmap]).adding(offset),
              let host = try? mem.memslots.translate(addr),
              let byte: UInt8 = try? mem.host.load(at: host) else { return true }
        return byte & (1 << bit) != 0
    }

    /// CR access (SDM Table 28-3): MOV to CR0/CR4 reflects when a bit L1 owns (guest/host mask)
    /// would differ from its read shadow; CR3/CR8 by their load/store exiting controls.
    static func crAccessReflects(_ q: UInt64, _ v: VMCSImage, _ l2: RunPageView) -> Bool {
        let cr = q & 0xF, type = (q >> 4) & 3
        let reg = Register(sdmNumber: (q >> 8) & 0xF) ?? .rax
        let cpu = v[.cpuBasedVMExecControl]
        switch (cr, type) {
        case (0, 0):
            return (l2[register: reg] ^ v[.cr0ReadShadow]) & v[.cr0GuestHostMask] != 0
        case (4, 0):
            return (l2[register: reg] ^ v[.cr4ReadShadow]) & v[.cr4GuestHostMask] != 0
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
