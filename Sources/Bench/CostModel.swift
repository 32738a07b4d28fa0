import ABI
import Foundation
import L0

/// The cost model: modelled cycles per operation = the events counted in the measurement window
/// (per operation) x the unit prices of a hardware profile. Nothing is fitted: the profile holds
/// one-level prices; what nesting costs comes out of what the nested path counted.
public enum CostModel {
    /// One line of an explanation: what was counted per operation, its price, the subtotal.
    public struct Line: Equatable, Sendable {
        public var what: String
        public var event: CostProfile.Event
        /// Whose work it is: a world switch (hardware or the switcher), L0's, L1's or L2's own.
        public var part: Part
        public var countPerOp: Double
        public var unitCycles: Double
        /// The price's range ([low, high] for an estimate, the price itself otherwise).
        public var unitRange: ClosedRange<Double>
        public var subtotal: Double { countPerOp * unitCycles }
        public var subtotalRange: ClosedRange<Double> { countPerOp * unitRange.lowerBound...countPerOp * unitRange.upperBound }
    }

    /// Whose cycles a line's are (the chart's split).
    public enum Part: String, CaseIterable, Sendable {
        case worldSwitch = "world-switches", l0 = "l0-work", l1 = "l1-work", l2 = "l2-work"
    }

    /// The priced lines for one result's measurement window.
    public static func lines(_ r: BenchResult, _ p: CostProfile) -> [Line] {
        lines(window: r.window, iterations: r.iterations, path: r.variant.path, p)
    }

    /// Every counted event, priced once. (Shadow-VMCS field copies are the hardware VMREADs and
    /// VMWRITEs counted by kind; VMCS switches are the VMPTRLDs.)
    public static func lines(window w: TransitionCounters, iterations: UInt64, path: NestingPath, _ p: CostProfile) -> [Line] {
        let n = Double(max(iterations, 1))
        func per(_ x: UInt64) -> Double { Double(x) / n }
        let l1 = TransitionCounters.byReason(w.l1Exits)
        let vmAccess = (l1[.vmread] ?? 0) + (l1[.vmwrite] ?? 0)
        let vmcalls = l1[.vmcall] ?? 0
        let invepts = l1[.invept] ?? 0
        let otherL1 = w.totalL1Exits.subtractingClamped(vmAccess + vmcalls + w.nestedVMEntries + invepts + w.ept12WriteTraps)
        let handledInL0 = w.totalL2Exits.subtractingClamped(w.totalDeliveries)
        typealias E = CostProfile.Event
        func line(_ what: String, _ e: E, _ count: UInt64, _ part: Part = .l0) -> Line {
            Line(what: what, event: e, part: part, countPerOp: per(count), unitCycles: p.cycles(e), unitRange: p.range(e))
        }
        let sw = { (c: SwitcherCounter) in w[switcher: c] }
        var out: [Line] = [
            line("L2 -> L0 exits and entries (world switch)", .exitRoundTrip, w.totalL2Exits, .worldSwitch),
            line("L2 exits L0 handles itself", .l0SimpleExit, handledInL0),
            line("exits delivered to L1, handled there", .l1ExitHandling, w.totalDeliveries, .l1),
            line("L1 -> L0 exits and entries (world switch)", .exitRoundTrip, w.totalL1Exits, .worldSwitch),
            line("exiting VMREAD/VMWRITE emulated by L0", .l0VMXInstruction, vmAccess),
            line("hypercalls handled by L0 (PV enter-L2 apart)", .l0Hypercall, vmcalls.subtractingClamped(w.pvEntries)),
            line("PV enter-L2: the streamlined entry", .pvEntry, w.pvEntries),
            line("PV exit deliveries into the exit page", .pvDelivery, w.pvDeliveries),
            line("other L1 exits emulated by L0 (VMPTRLD, VMfails, L1's MSRs...)", .l0SimpleExit, otherL1),
            line("INVEPTs emulated by L0", .l0INVEPT, invepts),
            line("L1 stores to write-protected EPT12 pages emulated by L0 (incl. unsyncs)", .l0EmulatedStore, w.ept12WriteTraps),
            line("emulated VM exits into L1 (nested_vmx_vmexit software)", .nestedVMExitSoftware, w.nestedVMExits),
            line("emulated VM entries into L2 (nested_vmx_run software)", .nestedVMEntrySoftware, w.nestedVMEntries),
            line("hardware VMREADs by L0", .hwVMREAD, w.hwVMREADs),
            line("hardware VMWRITEs by L0", .hwVMWRITE, w.hwVMWRITEs),
            line("VMPTRLDs by L0 (VMCS switches)", .hwVMPTRLD, w.hwVMPTRLDs),
            line("VMCLEARs by L0", .hwVMCLEAR, w.hwVMCLEARs),
            line("vmcs12 / eVMCS fields read, written or copied in memory", .vmcsFieldAccess,
                 w.vmcs12FieldReads + w.vmcs12FieldWrites + w.evmcsFieldCopies),
            line("VM-entry consistency-check groups", .consistencyCheckGroup, w.consistencyChecks),
            line("full hardware entry checks (dirty vmcs02)", .fullEntryChecks, w.fullEntryChecks),
            line("MSR-bitmap merges", .msrBitmapMerge, w.msrBitmapMerges),
            line("MMU root switches", .mmuRootSwitch, w.mmuRootSwitches),
            line("transition TLB flushes", .tlbFlush, w.tlbFlushes),
            line("rare-field syncs vmcs02 -> vmcs12", .rareFieldSync, w.rareFieldSyncs),
            line("EPT12 entries read by L0 (walks, resyncs)", .ept12WalkStep, w.ept12EntriesWalked),
            line("EPT12 A/D bits set by L0", .ept12ADUpdate, w.ept12ADUpdates),
            line("EPT02 entries filled", .ept02Fill, w.ept02Fills),
            line("EPT12 leaf tables re-synced", .ept12Resync, w.ept12Resyncs),
            line("exits a VMM's userspace handles (I/O, MMIO, unbacked memory)", .vmmUserspaceExit,
                 w.vmmUserspaceExits + w.unbackedAccesses),
            line("port accesses an in-kernel device emulates", .kernelDeviceEmulation, w.kernelDeviceAccesses),
            // pvm-rfc: the switcher and L1's shadow MMU (L1's counts).
            line("L2 -> L1 exits and entries through the switcher", .switcherRoundTrip, w.totalSwitcherExits, .worldSwitch),
            line("switcher exits L1 handles (dispatch and handler)", .l1ExitHandling, w.totalSwitcherExits, .l1),
            line("switcher direct switches (SYSCALL, SYSRET, IRET)", .directSwitch, sw(.directSwitches), .worldSwitch),
            line("events L1 injects into L2 through the switcher", .eventInjection, sw(.injectedEvents), .l1),
            line("shadow entries filled", .shadowFill, sw(.shadowFills), .l1),
            line("L2 page-table entries L1 read (walks, syncs)", .guestPTERead, sw(.guestPTEReads), .l1),
            line("L2 page-table A/D flags L1 set", .guestADUpdate, sw(.guestADUpdates), .l1),
            line("L2 page-table writes and MMIO accesses L1 emulated", .shadowEmulatedWrite,
                 sw(.emulatedPTEWrites) + sw(.mmioEmulations), .l1),
            line("shadow pages unsynced", .shadowUnsync, sw(.unsyncs), .l1),
            line("shadow pages or entries synced again", .shadowResync, sw(.resyncs), .l1),
            line("CR3 loads from the cache of roots", .rootCacheHit, sw(.rootCacheHits), .l1),
            line("CR3 loads that build a root", .rootBuild, sw(.rootBuilds), .l1),
            line("INVLPGs L1 handled", .shadowINVLPG, sw(.invlpgs), .l1),
            line("shadow pages zapped", .shadowPageZap, sw(.shadowPageZaps), .l1),
            line("L2 pages write-protected for shadowing", .writeProtect, sw(.writeProtects), .l1),
            line("L2 TLB flushes L1 asked for (shadow entries lost rights)", .shadowTLBFlush, sw(.tlbFlushes), .l1),
            line("exits L1's VMM userspace handles", .vmmUserspaceExit, sw(.vmmUserspaceExits), .l1),
            line("port accesses L1's in-kernel device emulates", .kernelDeviceEmulation, sw(.kernelDeviceAccesses), .l1),
            // Interrupts between vCPUs, where L0 runs the local APICs.
            line("IPIs accepted by the local APICs L0 runs (one per target)", .apicIPIEmulation, w.apicIPIs),
            line(path.usesVMX ? "xAPIC page accesses L1's APIC completed through its instruction emulator"
                              : "xAPIC page accesses L0's APIC completed through its instruction emulator",
                 .apicMMIOEmulation, w.apicMMIOEmulations, path.usesVMX ? .l1 : .l0),
            line("timer interrupts the local APICs L0 runs accepted (TSC deadline reached)", .apicTimerExpiry, w.apicTimerFires),
            line("vmcs12 VMX-preemption timers started at nested entries (an hrtimer each)", .nestedTimerStart, w.nestedTimerStarts),
            line("KVM_HC_SEND_IPI hypercalls (the bitmap walk)", .pvIPIHypercall, w.pvIPIHypercalls),
            line("kicks: physical IPIs that make a target in guest mode exit", .vcpuKick, w.apicKicks),
            line("vCPUs blocked at HLT", .haltBlock, w.haltsBlocked),
            line("halted vCPUs woken", .vcpuWakeup, w.apicWakeups),
            line("interrupts injected at an entry", .interruptInjection, w.interruptsInjected),
            line("vCPUs named in L2's flush hypercalls (requests; the hypercall's exit priced above)", .tlbFlushRequest, w.tlbFlushRequests),
            line("L2 TLB flushes L0 did at an entry (steal-time KVM_VCPU_FLUSH_TLB)", .tlbFlush, w.tlbFlushesAtEntry),
            // L2's own work, on every path.
            line("L2 system calls (SYSCALL/SYSRET)", .l2Syscall, w[l2: .syscalls], .l2),
            line("L2 exceptions delivered through its IDT (and IRET)", .l2Exception, w[l2: .exceptions], .l2),
            line("L2 INVLPGs (the TLB entry dropped)", .l2INVLPG, w[l2: .invlpgs], .l2),
            line("L2 CR3 loads (the TLB flushed)", .l2CR3Load, w[l2: .cr3Loads], .l2),
            path.usesSwitcher
                ? line("L2 TLB misses, walked on the shadow tables (one dimension)", .l2TLBMissShadow, w[l2: .tlbMisses], .l2)
                : line("L2 TLB misses, walked through EPT02 (two dimensions)", .l2TLBMiss2D, w[l2: .tlbMisses], .l2),
        ]
        out.removeAll { $0.countPerOp == 0 }
        return out
    }

    public static func cyclesPerOp(_ r: BenchResult, _ p: CostProfile) -> Double {
        lines(r, p).reduce(0) { $0 + $1.subtotal }
    }

    /// The total with every estimate at its low and at its high end.
    public static func cyclesRangePerOp(_ r: BenchResult, _ p: CostProfile) -> ClosedRange<Double> {
        let ls = lines(r, p)
        return ls.reduce(0) { $0 + $1.subtotalRange.lowerBound }...ls.reduce(0) { $0 + $1.subtotalRange.upperBound }
    }

    /// `pvm model explain`: the breakdown line by line, with each price's range and source,
    /// then the total in cycles and time and the range its estimates span.
    public static func explain(_ r: BenchResult, _ p: CostProfile) -> String {
        var out = "\(r.test) on \(r.variant.label), profile \(p.name) (\(Report.fmt(p.ghz, 2)) GHz), per operation:\n"
        out += Report.pad("event", 66) + Report.pad("count", 9, right: true) + Report.pad("x cycles", 9, right: true)
            + Report.pad("(low-high)", 13, right: true) + Report.pad("= cycles", 10, right: true) + "  source\n"
        let ls = lines(r, p)
        for l in ls {
            let range = p.prices[l.event.rawValue]?.isEstimate == true
                ? "\(Report.fmt(l.unitRange.lowerBound, 0))-\(Report.fmt(l.unitRange.upperBound, 0))" : ""
            let source = p.prices[l.event.rawValue]?.source ?? ""
            out += Report.pad(l.what, 66) + Report.pad(Report.fmt(l.countPerOp, 2), 9, right: true)
                + Report.pad(Report.fmt(l.unitCycles, 0), 9, right: true) + Report.pad(range, 13, right: true)
                + Report.pad(Report.fmt(l.subtotal, 0), 10, right: true) + "  " + l.event.rawValue + ": " + source + "\n"
        }
        let total = ls.reduce(0) { $0 + $1.subtotal }
        let range = cyclesRangePerOp(r, p)
        out += Report.pad("total", 97) + Report.pad(Report.fmt(total, 0), 10, right: true)
            + "  (\(Report.fmt(total / p.ghz, 0)) ns at \(Report.fmt(p.ghz, 2)) GHz)\n"
        if range.lowerBound != range.upperBound {
            out += "with every estimate at its low / high end: \(Report.fmt(range.lowerBound, 0)) - \(Report.fmt(range.upperBound, 0)) cycles\n"
        }
        let unpriced = Set(ls.filter { $0.unitCycles == 0 }.map(\.event.rawValue)).sorted()
        if !unpriced.isEmpty {
            out += "counted but priced 0 by this profile: \(unpriced.joined(separator: ", "))\n"
        }
        return out
    }

    /// The profile shipped with the tool: published single-level figures only.
    public static func defaultProfile() throws -> CostProfile {
        guard let url = Bundle.module.url(forResource: "published", withExtension: "json", subdirectory: "Profiles"),
              let data = try? Data(contentsOf: url) else {
            throw CostProfile.LoadError.unreadable(file: "Profiles/published.json", reason: "not found in the Bench resources")
        }
        return try CostProfile.decode(data, file: url.path)
    }
}
