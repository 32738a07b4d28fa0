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
        public var countPerOp: Double
        public var unitCycles: Double
        public var subtotal: Double { countPerOp * unitCycles }
    }

    /// The priced lines for one result's measurement window.
    public static func lines(_ r: BenchResult, _ p: CostProfile) -> [Line] {
        lines(window: r.window, iterations: r.iterations, p)
    }

    public static func lines(window w: TransitionCounters, iterations: UInt64, _ p: CostProfile) -> [Line] {
        let n = Double(max(iterations, 1))
        func per(_ x: UInt64) -> Double { Double(x) / n }
        let l1 = TransitionCounters.byReason(w.l1Exits)
        let vmAccess = (l1[.vmread] ?? 0) + (l1[.vmwrite] ?? 0)
        let hypercalls = l1[.vmcall] ?? 0
        let otherL1 = w.totalL1Exits - vmAccess - hypercalls
        let handledInL0 = w.totalL2Exits - w.totalDeliveries
        var out: [Line] = [
            Line(what: "L2 -> L0 exits and entries (world switch)", event: .exitRoundTrip, countPerOp: per(w.totalL2Exits), unitCycles: p.cycles(.exitRoundTrip)),
            Line(what: "L2 exits L0 handles itself", event: .l0SimpleExit, countPerOp: per(handledInL0), unitCycles: p.cycles(.l0SimpleExit)),
            Line(what: "exits delivered to L1, handled there", event: .l1ExitHandling, countPerOp: per(w.totalDeliveries), unitCycles: p.cycles(.l1ExitHandling)),
            Line(what: "L1 -> L0 exits and entries (world switch)", event: .exitRoundTrip, countPerOp: per(w.totalL1Exits), unitCycles: p.cycles(.exitRoundTrip)),
            Line(what: "VMREAD/VMWRITE emulated by L0", event: .l0VMXInstruction, countPerOp: per(vmAccess), unitCycles: p.cycles(.l0VMXInstruction)),
            Line(what: "PV hypercalls handled by L0", event: .l0Hypercall, countPerOp: per(hypercalls), unitCycles: p.cycles(.l0Hypercall)),
            Line(what: "other L1 exits emulated by L0 (VMRESUME, INVEPT, EPT12 write traps...)", event: .l0SimpleExit, countPerOp: per(otherL1), unitCycles: p.cycles(.l0SimpleExit)),
            Line(what: "VMCS switches (vmcs01 <-> vmcs02)", event: .vmcsSwitch, countPerOp: per(w.vmcsSwitches), unitCycles: p.cycles(.vmcsSwitch)),
            Line(what: "vmcs12 / shadow / eVMCS field accesses by L0", event: .vmcsFieldAccess,
                 countPerOp: per(w.vmcs12FieldReads + w.vmcs12FieldWrites + w.shadowVMCSFieldCopies + w.evmcsFieldCopies), unitCycles: p.cycles(.vmcsFieldAccess)),
            Line(what: "VM-entry consistency-check groups", event: .consistencyCheckGroup, countPerOp: per(w.consistencyChecks), unitCycles: p.cycles(.consistencyCheckGroup)),
            Line(what: "EPT12 entries walked by L0", event: .ept12WalkStep, countPerOp: per(w.ept12EntriesWalked), unitCycles: p.cycles(.ept12WalkStep)),
            Line(what: "EPT02 entries filled", event: .ept02Fill, countPerOp: per(w.ept02Fills), unitCycles: p.cycles(.ept02Fill)),
        ]
        out.removeAll { $0.countPerOp == 0 }
        return out
    }

    public static func cyclesPerOp(_ r: BenchResult, _ p: CostProfile) -> Double {
        lines(r, p).reduce(0) { $0 + $1.subtotal }
    }

    /// `pvm model explain`: the breakdown line by line, then the total in cycles and time.
    public static func explain(_ r: BenchResult, _ p: CostProfile) -> String {
        var out = "\(r.test) on \(r.variant.label), profile \(p.name) (\(Report.fmt(p.ghz, 2)) GHz), per operation:\n"
        out += Report.pad("event", 70) + Report.pad("count", 9, right: true) + Report.pad("x cycles", 10, right: true)
            + Report.pad("= cycles", 11, right: true) + "\n"
        let ls = lines(r, p)
        for l in ls {
            out += Report.pad(l.what, 70) + Report.pad(Report.fmt(l.countPerOp, 2), 9, right: true)
                + Report.pad(Report.fmt(l.unitCycles, 0), 10, right: true) + Report.pad(Report.fmt(l.subtotal, 0), 11, right: true) + "\n"
        }
        let total = ls.reduce(0) { $0 + $1.subtotal }
        out += Report.pad("total", 89) + Report.pad(Report.fmt(total, 0), 11, right: true)
            + "  (\(Report.fmt(total / p.ghz, 0)) ns at \(Report.fmt(p.ghz, 2)) GHz)\n"
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
