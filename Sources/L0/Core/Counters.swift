import ABI

/// Every transition of one vCPU, counted by L0 (every transition passes through L0), plus the
/// work L0 does that hardware would do on a real nested path, for the cost model.
public struct TransitionCounters: Equatable, Sendable {
    static let reasonSlots = ExitReason.countedSlots

    /// L2 -> L0 exits, by basic exit reason.
    public var l2Exits = [UInt64](repeating: 0, count: reasonSlots)
    /// L1 -> L0 exits, by basic exit reason (VMCALL, VMREAD, VMWRITE, VMRESUME, ...).
    public var l1Exits = [UInt64](repeating: 0, count: reasonSlots)
    /// L2 exits L0 delivered to L1 (reflected on nvmx, PV exits on pv), by basic reason.
    public var deliveries = [UInt64](repeating: 0, count: reasonSlots)
    public var l1Entries: UInt64 = 0
    public var l2Entries: UInt64 = 0
    /// PV hypercalls L1 made, by number (a subset of l1Exits[VMCALL]). L1 picks the numbers, so
    /// the table is bounded: numbers past the first `hypercallKeys` distinct ones count as others.
    public var hypercalls = BoundedCounts<UInt64>(capacity: hypercallKeys)
    public static let hypercallKeys = 32

    // Work a real L0 would do on these paths.
    public var vmcs12FieldReads: UInt64 = 0
    public var vmcs12FieldWrites: UInt64 = 0
    public var shadowVMCSFieldCopies: UInt64 = 0
    /// eVMCS <-> cached vmcs12 field copies (nvmx-evmcs).
    public var evmcsFieldCopies: UInt64 = 0
    public var vmcsSwitches: UInt64 = 0
    public var ept12EntriesWalked: UInt64 = 0
    public var ept02Fills: UInt64 = 0
    /// L1 stores to write-protected EPT12 pages L0 emulated, and leaf tables that went unsync.
    public var ept12WriteTraps: UInt64 = 0
    public var ept12Unsyncs: UInt64 = 0
    /// L2 accesses that EPT12 sent to L1 GPAs nothing backs, completed by L0 as unassigned.
    public var unbackedAccesses: UInt64 = 0
    /// Memslot deletions (and moves) that zapped mappings.
    public var memslotZaps: UInt64 = 0
    /// VM-entry consistency-check groups run (controls, host state, guest state).
    public var consistencyChecks: UInt64 = 0
    /// EPT12 entries whose accessed/dirty bits L0 set during a walk (EPTP A/D enabled).
    public var ept12ADUpdates: UInt64 = 0
    /// vmcs02 MSR bitmap merges (nested_vmx_prepare_msr_bitmap).
    public var msrBitmapMerges: UInt64 = 0

    // What KVM as L0 does on its own VMCSs (vmcs01, vmcs02, the shadow VMCS) in a nested
    // transition, by kind (kvm-nested-work.md sections 1-2; NestedVMX/KVMWork.swift).
    public var hwVMREADs: UInt64 = 0
    public var hwVMWRITEs: UInt64 = 0
    public var hwVMPTRLDs: UInt64 = 0
    public var hwVMCLEARs: UInt64 = 0
    /// L0's MMU switched between L1's root and the shadow-EPT root (nested_ept_[un]init_mmu_context).
    public var mmuRootSwitches: UInt64 = 0
    /// The transition TLB flush (nested_vmx_transition_tlb_flush: INVVPID of the current VPID).
    public var tlbFlushes: UInt64 = 0
    /// The deferred 35-field vmcs02 -> vmcs12 sync, done when something asks for those fields.
    public var rareFieldSyncs: UInt64 = 0
    /// VM entries after a major control was written: the hardware runs its full checks.
    public var fullEntryChecks: UInt64 = 0
    /// Exits a VMM's userspace device model handled (an exit to userspace and back): L0's own
    /// VMM on one level, L1's VMM for the ports and MMIO of L1's device model.
    public var vmmUserspaceExits: UInt64 = 0
    /// Port accesses a hypervisor's in-kernel device completed (L0's, or a KVM L1's at 0x4d0).
    public var kernelDeviceAccesses: UInt64 = 0
    /// PV enter-L2 hypercalls that entered L2: the streamlined entry (exit page, no vmcs12).
    public var pvEntries: UInt64 = 0
    /// L2 exits L0 delivered through the PV exit page.
    public var pvDeliveries: UInt64 = 0
    /// Emulated VM exits into L1 (reflected L2 exits and failed entries) and emulated VM entries
    /// into L2 (VMLAUNCH/VMRESUME that entered): KVM's nested_vmx_vmexit and nested_vmx_run.
    public var nestedVMExits: UInt64 = 0
    public var nestedVMEntries: UInt64 = 0
    /// Unsync leaf EPT12 tables re-synced at INVEPT (write-protected again, entries re-read).
    public var ept12Resyncs: UInt64 = 0
    // Interrupts between vCPUs, where L0 runs the local APICs (`L0APIC.swift`).
    /// Interrupts a local APIC L0 runs accepted from an IPI (one per target), and self-IPIs.
    public var apicIPIs: UInt64 = 0
    /// APIC register accesses L0 emulated (x2APIC MSRs: ICR, SELF_IPI, EOI, TPR, ID; and the
    /// same registers in the xAPIC page).
    public var apicAccesses: UInt64 = 0
    /// Accesses to L2's xAPIC page completed through an instruction emulator (fetch, decode,
    /// then the APIC's MMIO handler), where WRMSR needs none: L0's, where it runs L2's APICs;
    /// on nVMX L1's, for the EPT violations L0 reflects there (L0 knows L1's platform).
    public var apicMMIOEmulations: UInt64 = 0
    /// Timer interrupts a local APIC L0 runs accepted (its TSC deadline reached): L2's on single
    /// and pv, L1's own on nested VMX.
    public var apicTimerFires: UInt64 = 0
    /// vmcs12's VMX-preemption timer started at a nested entry (KVM's vmx_start_preemption_timer:
    /// an hrtimer, since L0 cannot hand vmcs12's timer to the hardware as it is).
    public var nestedTimerStarts: UInt64 = 0
    /// KVM_HC_SEND_IPI hypercalls L0 handled (one per call, whatever the bitmap).
    public var pvIPIHypercalls: UInt64 = 0
    /// Running targets made to exit so they take an interrupt (kvm_vcpu_kick's IPI).
    public var apicKicks: UInt64 = 0
    /// HLTs that blocked the vCPU in L0, and halted vCPUs an interrupt woke.
    public var haltsBlocked: UInt64 = 0
    public var apicWakeups: UInt64 = 0
    /// Interrupts L0 injected at an entry (VM_ENTRY_INTR_INFO, external interrupt).
    public var interruptsInjected: UInt64 = 0
    /// L2 TLB flushes: L2's flush hypercalls L0 handled, the per-vCPU flush requests they made,
    /// and the flushes L0 did at an entry for a steal-time KVM_VCPU_FLUSH_TLB.
    public var tlbFlushHypercalls: UInt64 = 0
    public var tlbFlushRequests: UInt64 = 0
    public var tlbFlushesAtEntry: UInt64 = 0

    /// pvm-rfc: what the switcher and L1's shadow MMU counted (`SwitcherLayout`: L2 -> L1 exits
    /// by reason, then the `SwitcherCounter`s), as L1 reported them at the harness's last call.
    /// L0 sees none of it happen; a window subtracts with clamping, so L1 lowering a counter
    /// cannot make a figure wrap.
    public var switcher = [UInt64](repeating: 0, count: SwitcherLayout.counterWords)

    /// L2's own event counters (`L2EventCounter`) as L2's CPU reported them at the harness's
    /// last call (its claims, like a guest's PMU; clamped in a window).
    public var l2Events = [UInt64](repeating: 0, count: L2EventCounter.allCases.count)
    public subscript(l2 e: L2EventCounter) -> UInt64 { l2Events[e.rawValue] }

    /// One switcher counter, and the L2 -> L1 exits (pvm-rfc).
    public subscript(switcher c: SwitcherCounter) -> UInt64 { switcher[SwitcherLayout.reasonSlots + c.rawValue] }
    public var switcherExits: [UInt64] { Array(switcher[0..<SwitcherLayout.reasonSlots]) }
    public var totalSwitcherExits: UInt64 {
        switcherExits.reduce(0) { let (s, o) = $0.addingReportingOverflow($1); return o ? .max : s }
    }

    /// The most a window may hold of an event a guest counts itself (L2's events, L1's
    /// switcher counters): beyond any real run (10^12), and small enough that every figure the
    /// report derives from it stays printable.
    public static let guestClaimCap: UInt64 = 1 << 40

    public init() {}

    @inline(__always) static func index(_ r: ExitReason) -> Int { min(Int(r.basic.rawValue), reasonSlots - 1) }
    @inline(__always) public mutating func countL2Exit(_ r: ExitReason) { l2Exits[Self.index(r)] += 1 }
    @inline(__always) public mutating func countL1Exit(_ r: ExitReason) { l1Exits[Self.index(r)] += 1 }
    @inline(__always) public mutating func countDelivery(_ r: ExitReason) { deliveries[Self.index(r)] += 1 }

    public var totalL2Exits: UInt64 { l2Exits.reduce(0, +) }
    public var totalL1Exits: UInt64 { l1Exits.reduce(0, +) }
    public var totalDeliveries: UInt64 { deliveries.reduce(0, +) }

    public static func byReason(_ a: [UInt64]) -> [ExitReason: UInt64] {
        var d: [ExitReason: UInt64] = [:]
        for (i, n) in a.enumerated() where n > 0 { d[ExitReason(rawValue: UInt32(i))] = n }
        return d
    }

    /// Every plain count, for the field-by-field operations below (keep it complete: a field
    /// missing here would be left out of every window). Immutable key paths: nothing to race on.
    nonisolated(unsafe) static let scalarFields: [WritableKeyPath<TransitionCounters, UInt64>] = [
        \.l1Entries, \.l2Entries, \.vmcs12FieldReads, \.vmcs12FieldWrites, \.shadowVMCSFieldCopies, \.evmcsFieldCopies,
        \.vmcsSwitches, \.ept12EntriesWalked, \.ept02Fills, \.ept12WriteTraps, \.ept12Unsyncs, \.msrBitmapMerges,
        \.unbackedAccesses, \.consistencyChecks, \.memslotZaps, \.ept12ADUpdates, \.hwVMREADs, \.hwVMWRITEs, \.hwVMPTRLDs,
        \.hwVMCLEARs, \.mmuRootSwitches, \.tlbFlushes, \.rareFieldSyncs, \.fullEntryChecks, \.vmmUserspaceExits, \.pvEntries,
        \.kernelDeviceAccesses, \.pvDeliveries, \.nestedVMExits, \.nestedVMEntries, \.ept12Resyncs,
        \.apicIPIs, \.apicAccesses, \.apicMMIOEmulations, \.apicTimerFires, \.nestedTimerStarts, \.pvIPIHypercalls, \.apicKicks, \.haltsBlocked, \.apicWakeups, \.interruptsInjected,
        \.tlbFlushHypercalls, \.tlbFlushRequests, \.tlbFlushesAtEntry,
    ]

    /// self - earlier, field by field: the transitions of a measurement window. Clamped at 0:
    /// the guest decides when a window starts and ends (and on pvm-rfc writes some of the
    /// counters), so no field may wrap whatever it does.
    public func since(_ earlier: TransitionCounters) -> TransitionCounters {
        var d = combined(with: earlier) { $0.subtractingClamped($1) }
        d.hypercalls = hypercalls.since(earlier.hypercalls)
        d.switcher = zip(switcher, earlier.switcher).map { min($0.subtractingClamped($1), Self.guestClaimCap) }
        d.l2Events = zip(l2Events, earlier.l2Events).map { min($0.subtractingClamped($1), Self.guestClaimCap) }
        return d
    }

    /// self + other, field by field, saturating: the windows of several vCPUs of one run taken
    /// together (a test whose work spans vCPUs, an IPI's sender and its target). PV hypercalls
    /// by number are self's only (they are per vCPU and L1's choice).
    public func adding(_ other: TransitionCounters) -> TransitionCounters {
        func sum(_ a: UInt64, _ b: UInt64) -> UInt64 { let (s, o) = a.addingReportingOverflow(b); return o ? .max : s }
        var d = combined(with: other, sum)
        d.hypercalls = hypercalls
        d.switcher = zip(switcher, other.switcher).map { min(sum($0, $1), Self.guestClaimCap) }
        d.l2Events = zip(l2Events, other.l2Events).map { min(sum($0, $1), Self.guestClaimCap) }
        return d
    }

    /// The exits by reason and every plain count, each `f(self's, other's)`.
    func combined(with other: TransitionCounters, _ f: (UInt64, UInt64) -> UInt64) -> TransitionCounters {
        var d = TransitionCounters()
        for i in 0..<Self.reasonSlots {
            d.l2Exits[i] = f(l2Exits[i], other.l2Exits[i])
            d.l1Exits[i] = f(l1Exits[i], other.l1Exits[i])
            d.deliveries[i] = f(deliveries[i], other.deliveries[i])
        }
        for k in Self.scalarFields { d[keyPath: k] = f(self[keyPath: k], other[keyPath: k]) }
        return d
    }
}
