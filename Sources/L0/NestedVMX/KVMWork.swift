import ABI

/// What KVM as L0 executes on its own VMCSs (vmcs01, vmcs02, the shadow VMCS) in each nested
/// transition, step by step from ../shared/reference/kvm-nested-work.md (KVM's nested.c and
/// vmx.c, 2025 trees), for this L0's configuration: EPT on, a 64-bit L2 (no PAE PDPTRs), no
/// PML, no APICv, no TSC scaling, the vCPU never moved to another CPU, KVM's fast paths. Each
/// count names the table row it comes from. These are counted per transition in
/// `TransitionCounters.hwVM*`; the shadow-VMCS copies add theirs where they run
/// (`copyShadowToVMCS12`, `copyVMCS12ToShadow`).
enum KVMWork {
    struct Ops: Equatable {
        var reads = 0, writes = 0, ptrlds = 0, clears = 0
    }

    // MARK: section 1, an L2 exit reflected to L1 (nested_vmx_vmexit)

    /// Row 1 vmx_vcpu_enter_exit: VM_EXIT_REASON and IDT_VECTORING_INFO_FIELD.
    static let exitReasonReads = 2
    /// Row 5 nested_vmx_reflect_vmexit: exit interruption info and qualification (the error
    /// code too for an exception that has one).
    static let reflectDecisionReads = 2
    /// Row 6: VM_EXIT_INSTRUCTION_LEN (not on a failed entry).
    static let instructionLengthReads = 1
    /// Row 8 sync_vmcs02_to_vmcs12: CR0 + read shadow, CR4 + read shadow, RSP, RIP, RFLAGS,
    /// CS/SS AR, interruptibility, CR3, linear address. The 35 rare fields are deferred.
    static let syncReads = 12
    /// Row 9 prepare_vmcs12: VMX_INSTRUCTION_INFO.
    static let prepareVMCS12Reads = 1
    /// Row 11 vmx_switch_vmcs: VMPTRLD vmcs01.
    static let switchPtrlds = 1
    /// Row 13 __nested_vmx_vmexit: exit/entry MSR-load counts, TSC_OFFSET.
    static let vmexitBodyWrites = 3
    /// Row 14 load_vmcs12_host_state: interruptibility and CR4 mask read; ~47 writes (RFLAGS,
    /// CR0, CR4, SYSENTER x3, GDTR/IDTR, 8 segments x 4, DR7, DEBUGCTL...).
    static let hostStateReads = 2
    static let hostStateWrites = 47
    /// Row 16 vcpu_enter_guest (vmx_load_mmu_pgd): EPT_POINTER and GUEST_CR3 of L1's root.
    static let loadPGDWrites = 2
    /// Row 18 vmx_vcpu_run: GUEST_RSP and GUEST_RIP before VMRESUME into L1.
    static let runWrites = 2

    /// The reflected exit's own operations (shadow-VMCS copies excluded: counted by the copy).
    static func reflectedExit(exceptionWithErrorCode: Bool, failedEntry: Bool) -> Ops {
        Ops(reads: exitReasonReads + reflectDecisionReads + (exceptionWithErrorCode ? 1 : 0)
                + (failedEntry ? 0 : instructionLengthReads) + syncReads + prepareVMCS12Reads + hostStateReads,
            writes: vmexitBodyWrites + hostStateWrites + loadPGDWrites + runWrites,
            ptrlds: switchPtrlds)
    }

    // MARK: section 2, L1's VMLAUNCH / VMRESUME (nested_vmx_run)

    /// Row 1: L1's own exit on vmcs01 (exit reason, IDT vectoring info).
    static let l1ExitReads = 2
    /// Row 2 nested_vmx_run preamble: L1's interruptibility (MOV-SS check), SS AR (CPL).
    static let preambleReads = 2
    /// Row 6 vmx_switch_vmcs: VMPTRLD vmcs02.
    static let entrySwitchPtrlds = 1
    /// Row 7 prepare_vmcs02_early: the entry-event fields with a run pending (4); when vmcs12 is
    /// dirty or an eVMCS, prepare_vmcs02_early_rare (VMCS_LINK_POINTER, VIRTUAL_PROCESSOR_ID; the
    /// constant state is written once per vmcs02); and one VMWRITE per control whose value
    /// changed (the cached setters skip the others, section 0).
    static let earlyWrites = 4
    static let earlyRareWrites = 2
    /// Row 11 prepare_vmcs02: ~16 always; prepare_vmcs02_rare ~54 more when dirty or an eVMCS:
    /// the guest segments (8 selectors, 10 limits, 8 AR, 10 bases: 36, eVMCS group GUEST_GRP2),
    /// SYSENTER x3, pending debug exceptions and 4 PDPTRs (8, GUEST_GRP1), and the rest (XSS,
    /// PFEC mask/match, EOI bitmaps, MSR counts, CET, CR4 mask: 10). With an eVMCS KVM writes a
    /// guest group only when its clean bit is clear.
    static let prepareWrites = 16
    static let prepareRareGuestGrp2Writes = 36
    static let prepareRareGuestGrp1Writes = 8
    static let prepareRareOtherWrites = 10

    /// What runs of prepare_vmcs02's rare halves: nothing (clean vmcs12), all (dirty vmcs12), or
    /// with an eVMCS the early half and the groups whose clean bits are clear.
    struct RareWork: Equatable {
        var early = false, guestGrp2 = false, guestGrp1 = false, other = false
        static let none = RareWork()
        static let all = RareWork(early: true, guestGrp2: true, guestGrp1: true, other: true)
        var writes: Int {
            (early ? earlyRareWrites : 0) + (guestGrp2 ? prepareRareGuestGrp2Writes : 0)
                + (guestGrp1 ? prepareRareGuestGrp1Writes : 0) + (other ? prepareRareOtherWrites : 0)
        }
    }
    /// Row 14 vcpu_enter_guest / vmx_vcpu_run: EPT_POINTER (shadow root), GUEST_CR3, RSP, RIP.
    static let entryRunWrites = 4

    /// The emulated VM entry's operations after the checks passed (rows 6-14; rows 1-2 are
    /// counted when the instruction is taken, whatever its outcome, and the shadow-VMCS copy
    /// where it runs); `rare`: vmcs12 dirty, or an eVMCS.
    static func nestedEntry(rare: RareWork, changedControls: Int) -> Ops {
        Ops(writes: earlyWrites + changedControls + rare.writes + prepareWrites + entryRunWrites, ptrlds: entrySwitchPtrlds)
    }

    /// A VM entry that failed its guest-state checks (nested_vmx_enter_non_root_mode's
    /// vmentry_fail_vmexit): VMPTRLD vmcs02, prepare_vmcs02_early's entry-event writes, VMPTRLD
    /// vmcs01 back, then load_vmcs12_host_state. No sync to vmcs12, no prepare_vmcs12.
    static let failedEntry = Ops(reads: hostStateReads, writes: earlyWrites + hostStateWrites, ptrlds: 2)

    /// copy_vmcs02_to_vmcs12_rare asked for by an exiting VMREAD/VMWRITE: vmcs02 loaded and
    /// vmcs01 back (its 35 VMREADs are priced with the sync as a whole).
    static let rareCopyOutsideExit = Ops(ptrlds: 2)

    // MARK: the shadow VMCS (section 0)

    /// copy_shadow_to_vmcs12: VMPTRLD shadow, a VMREAD per read-write field, VMCLEAR, VMPTRLD back.
    static func shadowToVMCS12(fields: Int) -> Ops { Ops(reads: fields, ptrlds: 2, clears: 1) }
    /// copy_vmcs12_to_shadow: VMPTRLD shadow, a VMWRITE per shadowed field, VMCLEAR, VMPTRLD back.
    static func vmcs12ToShadow(fields: Int) -> Ops { Ops(writes: fields, ptrlds: 2, clears: 1) }

    /// The fields sync_vmcs02_to_vmcs12_rare copies: the guest segment selectors, limits, AR
    /// bytes and bases, GDTR/IDTR, and the pending debug exceptions.
    static let rareFields: Set<VMCSField> = [
        .guestESSelector, .guestCSSelector, .guestSSSelector, .guestDSSelector, .guestFSSelector, .guestGSSelector,
        .guestLDTRSelector, .guestTRSelector, .guestESLimit, .guestCSLimit, .guestSSLimit, .guestDSLimit,
        .guestFSLimit, .guestGSLimit, .guestLDTRLimit, .guestTRLimit, .guestGDTRLimit, .guestIDTRLimit,
        .guestESARBytes, .guestDSARBytes, .guestFSARBytes, .guestGSARBytes, .guestLDTRARBytes, .guestTRARBytes,
        .guestESBase, .guestCSBase, .guestSSBase, .guestDSBase, .guestFSBase, .guestGSBase, .guestLDTRBase,
        .guestTRBase, .guestGDTRBase, .guestIDTRBase, .guestPendingDbgExceptions,
    ]
    static func needsRareSync(_ f: VMCSField) -> Bool { rareFields.contains(f) }
}

extension TransitionCounters {
    mutating func count(_ o: KVMWork.Ops) {
        hwVMREADs += UInt64(o.reads)
        hwVMWRITEs += UInt64(o.writes)
        hwVMPTRLDs += UInt64(o.ptrlds)
        hwVMCLEARs += UInt64(o.clears)
    }
}
