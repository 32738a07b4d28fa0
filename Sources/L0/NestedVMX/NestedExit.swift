import ABI
import Transport

extension L0VCPU {
    /// L2 exits on the nvmx paths: reflect to L1 what vmcs12 asks for; keep the rest.
    func handleNestedL2Exit(_ exit: GuestExit) -> L2ExitOutcome {
        guard let vmcs12 = nested.vmcs12 else { return .stop(.fatal("L2 exit with no current vmcs12")) }
        if NestedExitRules.reflects(exit, vmcs12: vmcs12, l2: l2Run, l1Memory: l1Memory) {
            nestedVMExit(exit)
            return .deliverToL1
        }
        switch exit.reason {
        case .eptViolation:
            return handleNestedEPTViolation(exit, vmcs12)
        case .ioInstruction:
            return handleL0PortIO(exit)
        case .msrRead, .msrWrite:
            return handleL0MSR(exit)
        case .hlt, .pause, .rdtsc, .rdtscp, .invlpg, .mwait, .monitor:
            // L1 did not ask for these. HLT: L0 has no other work and an interrupt is "pending"
            // at once, so L2 wakes immediately.
            skipL2Instruction(exit)
            return .resumeL2
        default:
            return .stop(.fatal("L2 exit \(exit.reason) kept by L0 has no handler"))
        }
    }

    /// A VM entry that failed its guest-state checks (SDM 26.8, KVM's nested_vmx_entry_failure):
    /// only VM_EXIT_REASON and EXIT_QUALIFICATION change, L2 never ran so its state is not
    /// synced, L1's GPRs stay as they were, and L1 continues at HOST_RIP.
    func nestedEntryFailureExit(reason: ExitReason, qualification: UInt64 = 0) {
        guard let v = nested.vmcs12 else { return }
        v[.vmExitReason] = UInt64(reason.rawValue)
        v[.exitQualification] = qualification
        counters.vmcs12FieldWrites += 2
        if nested.shadowing { copyVMCS12ToShadow() }
        if path.enlightenedVMCS { writeBackEnlightenedVMCS() }
        loadHostState(v)
    }

    /// SDM 27.5: L1 continues at HOST_RIP with HOST_RSP and RFLAGS = 0x2.
    func loadHostState(_ v: VMCSImage) {
        l1Run[register: .rip] = v[.hostRIP]
        l1Run[register: .rsp] = v[.hostRSP]
        l1Run[register: .rflags] = 0x2
        counters.vmcs12FieldReads += 2
        l1Run[RunPage.enteredByVMExit] = 1
        l1Run[RunPage.vmxResult] = 0
    }

    /// nested_vmx_vmexit: sync vmcs02 -> vmcs12, write the exit information, refresh the shadow
    /// VMCS, load vmcs12's host state into L1 and hand L1 L2's GPRs.
    func nestedVMExit(_ exit: GuestExit) {
        guard let v = nested.vmcs12 else { return }
        var writes: UInt64 = 0
        v[.guestRIP] = l2Run[register: .rip]
        v[.guestRSP] = l2Run[register: .rsp]
        v[.guestRFLAGS] = l2Run[register: .rflags]
        v[.guestInterruptibilityInfo] = 0
        writes += 4
        v[.vmExitReason] = UInt64(exit.reason.rawValue)
        v[.exitQualification] = exit.qualification
        v[.guestPhysicalAddress] = exit.guestPhysicalAddress
        v[.guestLinearAddress] = exit.guestLinearAddress
        v[.vmExitInstructionLen] = exit.instructionLength
        v[.vmxInstructionInfo] = exit.instructionInfo
        v[.vmExitIntrInfo] = exit.interruptionInfo
        v[.vmExitIntrErrorCode] = exit.interruptionErrorCode
        v[.idtVectoringInfoField] = 0
        v[.vmEntryIntrInfoField] = v[.vmEntryIntrInfoField] & ~(1 << 31)   // SDM 27.2: valid bit cleared
        writes += 10
        counters.vmcs12FieldWrites += writes
        if nested.shadowing { copyVMCS12ToShadow() }
        if path.enlightenedVMCS { writeBackEnlightenedVMCS() }

        // L2's GPRs stay in the CPU across the exit: L1 finds them in its registers.
        for r in Register.gprsOutsideVMCS {
            l1Run[register: r] = l2Run[register: r]
        }
        loadHostState(v)
        // The decoded access size of a faulting load/store: what L1's instruction emulator would
        // learn by fetching and decoding the instruction from L2 memory (no VMREAD involved).
        l1Run[RunPage.instructionInfo] = exit.instructionInfo
        nested.guestMode = false
        counters.vmcsSwitches += 1          // vmcs02 -> vmcs01
        counters.countDelivery(exit.reason)
    }

    /// An L2 access that reached no memory and no device: reads float high, writes are dropped.
    func completeUnbackedAccess(_ exit: GuestExit) -> L2ExitOutcome {
        if exit.qualification & EPTViolationQualification.dataWrite == 0 {
            let size = max(1, min(8, exit.instructionInfo))
            l2Run[register: .rax] = size >= 8 ? ~0 : (1 << (size * 8)) - 1
        }
        counters.unbackedAccesses += 1
        skipL2Instruction(exit)
        return .resumeL2
    }

    /// An L2 EPT violation on EPT02: walk L1's EPT12. No L1 mapping -> reflect (L1 fixes its
    /// tables); a mapping -> install the EPT02 entry and retry L2 silently.
    func handleNestedEPTViolation(_ exit: GuestExit, _ vmcs12: VMCSImage) -> L2ExitOutcome {
        let gpa = L2GPA(exit.guestPhysicalAddress)
        let access = exit.qualification & EPT.rwxMask
        let walker = EPT12Walker(memory: l1Memory)
        let walk = walker.walk(eptp: vmcs12[.eptPointer], gpa: gpa, write: access & EPT.write != 0)
        counters.ept12EntriesWalked += UInt64(walk.entriesRead)
        counters.ept12ADUpdates += UInt64(walk.adUpdates)
        switch walk.result {
        case .misconfigured:
            var e = exit
            e.reason = .eptMisconfig
            e.qualification = 0
            nestedVMExit(e)
            return .deliverToL1
        case .notPresent(let perms):
            var e = exit
            e.qualification = (exit.qualification & ~(EPT.rwxMask << EPTViolationQualification.readableShift))
                | perms << EPTViolationQualification.readableShift
            nestedVMExit(e)
            return .deliverToL1
        case let .mapped(l1, perms, _):
            guard access & ~perms == 0 else {
                var e = exit
                e.qualification = (exit.qualification & ~(EPT.rwxMask << EPTViolationQualification.readableShift))
                    | perms << EPTViolationQualification.readableShift
                nestedVMExit(e)
                return .deliverToL1
            }
            guard let slot = l1Memory.memslots.slot(containing: l1),
                  let host = try? l1Memory.memslots.translate(l1.pageBase, length: pageSize) else {
                // EPT12 points at an L1 GPA no memslot backs: MMIO to nothing in L1's platform
                // (KVM exits to L0's userspace, where no device answers). Complete it that way.
                return completeUnbackedAccess(exit)
            }
            let allowed = slot.flags & MemorySlot.readOnlyFlag != 0 ? perms & ~EPT.write : perms
            guard access & ~allowed == 0 else {
                // A write to read-only L1 memory (a ROM): the write is dropped, as MMIO to a ROM.
                return completeUnbackedAccess(exit)
            }
            guard ept02.install(gpa.pageBase, host: host, permissions: allowed, memslot: slot.slot) else {
                return .stop(.fatal("\(gpa) is beyond the L2 address limit of this L0"))
            }
            shadowWalk(walk, for: gpa)
            counters.ept02Fills += 1
            return .resumeL2
        }
    }
}
