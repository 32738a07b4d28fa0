import ABI
import Transport

extension L0VCPU {
    /// L2 exits on the PV path: L0 emulates the hot ones from what L1 registered and delivers
    /// the rest to L1 through the PV exit page.
    func handlePVL2Exit(_ exit: GuestExit) -> L2ExitOutcome {
        switch exit.reason {
        case .cpuid:
            guard pv.enabled.contains(.directCPUID), let table = pv.cpuid else { return deliverPVExit(exit) }
            emulateCPUID(table)
            skipL2Instruction(exit)
            return .resumeL2
        case .msrRead, .msrWrite:
            let msr = UInt32(truncatingIfNeeded: l2Run[register: .rcx])
            guard pv.enabled.contains(.directMSR), let policy = pv.msrPolicy[msr] else { return deliverPVExit(exit) }
            switch policy.action {
            case .emulate: return emulatePolicyMSR(exit, msr: msr, writableMask: policy.writableMask)
            case .injectGP:
                injectIntoL2(vector: 13, errorCode: 0)
                return .resumeL2
            case .passToL1: return deliverPVExit(exit)
            case .passthrough: return handleL0MSR(exit)   // only if L2 exits anyway (it should not)
            }
        case .ioInstruction:
            let port = IOQualification.port(exit.qualification)
            if port == Ucall.port || (pv.enabled.contains(.l0Ports) && l0Devices.owns(port)) { return handleL0PortIO(exit) }
            return deliverPVExit(exit)
        case .eptViolation:
            if refillFromPVMap(exit) { return .resumeL2 }     // lazily rebuilt after a fast zap
            // Tell L1 what the current mapping allows (bits 3-5), so a permission fault and a
            // missing mapping look different.
            var e = exit
            let perms = ept02.permissions(L2GPA(exit.guestPhysicalAddress))
            e.qualification = (exit.qualification & EPT.rwxMask) | perms << EPTViolationQualification.readableShift
            return deliverPVExit(e)
        default:
            return deliverPVExit(exit)
        }
    }

    /// An MSR L0 emulates under L1's policy: reads return L0's value; a write may change only
    /// writable bits (anything else is #GP, as KVM does for reserved bits).
    func emulatePolicyMSR(_ exit: GuestExit, msr: UInt32, writableMask: UInt64) -> L2ExitOutcome {
        let old = l0MSRs[msr] ?? 0
        if exit.reason == .msrWrite {
            let new = (l2Run[register: .rdx] << 32) | (l2Run[register: .rax] & 0xFFFF_FFFF)
            guard (new ^ old) & ~writableMask == 0 else {
                injectIntoL2(vector: 13, errorCode: 0)
                return .resumeL2
            }
            l0MSRs[msr] = new
        } else {
            l2Run[register: .rax] = old & 0xFFFF_FFFF
            l2Run[register: .rdx] = old >> 32
        }
        skipL2Instruction(exit)
        return .resumeL2
    }

    @inline(__always)
    func emulateCPUID(_ table: CPUIDTable) {
        let (a, b, c, d) = table.lookup(function: UInt32(truncatingIfNeeded: l2Run[register: .rax]),
                                        index: UInt32(truncatingIfNeeded: l2Run[register: .rcx]))
        l2Run[register: .rax] = UInt64(a)
        l2Run[register: .rbx] = UInt64(b)
        l2Run[register: .rcx] = UInt64(c)
        l2Run[register: .rdx] = UInt64(d)
    }

    /// Completes L1's pending enter-L2 hypercall with this exit in its PV exit page.
    func deliverPVExit(_ exit: GuestExit) -> L2ExitOutcome {
        guard let gpa = pv.exitPageGPA,
              let page = try? l1Memory.host.runPage(at: l1Memory.memslots.translate(gpa, length: RunPage.size))
        else { return .stop(.fatal("L2 exit \(exit.reason) with no PV exit page registered")) }
        l2Run.copy(to: page)        // L2's registers (and the raw exit)...
        exit.write(to: page)        // ...then the exit as L0 reports it
        counters.countDelivery(exit.reason)
        l1Run[register: .rax] = 0
        return .deliverToL1
    }
}
