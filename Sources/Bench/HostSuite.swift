import ABI
import L0
import Transport

/// The emulated host's side of `pvm bench --suite host` (seeds/000, 001, 002): who pays for
/// enabling virtualization and for the one-time setup, on fresh `L0Host`s. The host does the
/// bookkeeping for real (usage count, rollback, VM types) and that is measured (`emulated`);
/// what the per-CPU enables and the setup would cost on hardware is not spent, it is counted and
/// priced by the cost profile (`model`): the figures a user would wait for are modelled.
public enum HostSuite {
    /// One host operation: what the emulator itself took (median, measured) and the work it did
    /// that the model prices.
    public struct Operation: Sendable, Equatable {
        public var emulatedNanos: UInt64
        /// Per-CPU enable attempts, per-CPU disables and one-time setup attempts the operation made.
        public var cpuEnables: Int
        public var cpuDisables: Int = 0
        public var setups: Int

        /// The priced part: enables, disables and setups at the profile's prices.
        public func modelledNanos(_ p: CostProfile) -> Double {
            p.nanos(.cpuVirtualizationEnable, count: cpuEnables) + p.nanos(.cpuVirtualizationDisable, count: cpuDisables)
                + p.nanos(.oneTimeSetup, count: setups)
        }
        /// What a user would wait: the priced work plus the emulator's own bookkeeping.
        public func totalNanos(_ p: CostProfile) -> Double { modelledNanos(p) + Double(emulatedNanos) }
    }

    /// One host configuration; every emulated time is a median over `iterations` fresh hosts.
    public struct Row: Sendable {
        public var enableVirtAtLoad: Bool
        public var oneTimeSetup: OneTimeSetupPolicy
        /// Creating the host ("module load").
        public var load: Operation
        /// The host's first VM, of the default type.
        public var firstVM: Operation
        /// A second default VM while the first exists.
        public var nextVM: Operation
        /// Destroying the last VM (with enableVirtAtLoad off, this disables every CPU).
        public var destroyLastVM: Operation
        /// The host's first VM being a protected-state one (TDX); nil when the setup is off, as
        /// the host then does not offer the type.
        public var firstProtectedVM: Operation?
    }

    /// The configurations, in table order.
    static let configurations: [(Bool, OneTimeSetupPolicy)] = [
        (true, .off), (false, .off),
        (true, .atLoad), (false, .atLoad),
        (true, .onFirstProtectedVM), (false, .onFirstProtectedVM),
    ]
    /// How many configurations the suite measures.
    public static var configurationCount: Int { configurations.count }

    /// `progress` is told each configuration as its hosts start (for a progress line).
    public static func measure(iterations: Int, cpuCount: Int = L0Host.machineCPUCount,
                               progress: (_ enableVirtAtLoad: Bool, OneTimeSetupPolicy) -> Void = { _, _ in }) throws(HostError) -> [Row] {
        let n = max(1, iterations)
        var rows: [Row] = []
        for (atLoad, setup) in configurations {
            progress(atLoad, setup)
            var times: [String: [UInt64]] = [:]
            var work: [String: (Int, Int, Int)] = [:]
            /// Times `body` on `host` and records the enables and setups it made.
            func timed<T>(_ name: String, _ host: () -> L0Host?, _ body: () throws(HostError) -> T) throws(HostError) -> T {
                let before = host()?.status
                let t = monotonicNanos()
                let r = try body()
                times[name, default: []].append(monotonicNanos() - t)
                let after = (r as? L0Host)?.status ?? host()?.status
                work[name] = ((after?.perCPUEnableAttempts ?? 0) - (before?.perCPUEnableAttempts ?? 0),
                              (after?.perCPUDisables ?? 0) - (before?.perCPUDisables ?? 0),
                              (after?.oneTimeSetupAttempts ?? 0) - (before?.oneTimeSetupAttempts ?? 0))
                return r
            }
            func newHost() throws(HostError) -> L0Host {
                try L0Host(cpuCount: cpuCount, enableVirtAtLoad: atLoad, oneTimeSetup: setup)
            }
            for _ in 0..<n {
                let host = try timed("load", { nil }, newHost)
                let a = try timed("first", { host }) { () throws(HostError) in try host.createVM(type: .default) }
                let b = try timed("next", { host }) { () throws(HostError) in try host.createVM(type: .default) }
                try host.destroyVM(a)
                try timed("destroy", { host }) { () throws(HostError) in try host.destroyVM(b) }

                // A second fresh host whose first VM is the protected one.
                guard setup != .off else { continue }
                let other = try newHost()
                _ = try timed("protected", { other }) { () throws(HostError) in try other.createVM(type: .tdx) }
            }
            func op(_ name: String) -> Operation? {
                guard let t = times[name], let (enables, disables, setups) = work[name] else { return nil }
                return Operation(emulatedNanos: Median.of(t), cpuEnables: enables, cpuDisables: disables, setups: setups)
            }
            rows.append(Row(enableVirtAtLoad: atLoad, oneTimeSetup: setup, load: op("load")!, firstVM: op("first")!,
                            nextVM: op("next")!, destroyLastVM: op("destroy")!, firstProtectedVM: op("protected")))
        }
        return rows
    }

    /// The table of what a user would wait (modelled), then what it shows in two lines.
    public static func table(_ rows: [Row], profile: CostProfile, cpuCount: Int, iterations: Int) -> String {
        var out = "host: \(cpuCount) CPUs; modelled: per-CPU enable \(duration(UInt64(profile.nanos(.cpuVirtualizationEnable)))), "
            + "disable \(duration(UInt64(profile.nanos(.cpuVirtualizationDisable)))), "
            + "one-time setup \(duration(UInt64(profile.nanos(.oneTimeSetup)))) (profile \(profile.name), estimates), "
            + "plus the emulated host's own work, measured (median of \(max(1, iterations)) fresh hosts)\n\n"
        let header = ["enable_virt_at_load", "one-time setup", "load", "first VM", "next VM", "destroy last VM", "first VM (tdx)"]
        let widths = [19, 21, 10, 10, 10, 15, 14]
        func line(_ cells: [String]) -> String {
            zip(cells, widths).enumerated().map { i, cw in Report.pad(cw.0, cw.1, right: i >= 2) }.joined(separator: "  ") + "\n"
        }
        func cell(_ o: Operation) -> String { duration(UInt64(o.totalNanos(profile))) }
        out += line(header)
        for r in rows {
            out += line([r.enableVirtAtLoad ? "on" : "off", r.oneTimeSetup.rawValue, cell(r.load), cell(r.firstVM),
                         cell(r.nextVM), cell(r.destroyLastVM), r.firstProtectedVM.map(cell) ?? "not offered"])
        }
        let bookkeeping = rows.flatMap { [$0.load, $0.firstVM, $0.nextVM, $0.destroyLastVM] + ($0.firstProtectedVM.map { [$0] } ?? []) }
            .map(\.emulatedNanos).max() ?? 0
        out += "(modelled: the enables, disables and setups each operation made, at the profile's prices, plus the emulator's own "
            + "bookkeeping, measured: at most \(duration(bookkeeping)) here. first VM (tdx): the first VM of another fresh "
            + "host, a protected one, not offered while the setup it needs is off)\n\n"
        if let on = row(rows, true, .off), let off = row(rows, false, .off) {
            out += "enable_virt_at_load: first VM \(cell(off.firstVM)) -> \(cell(on.firstVM)); "
                + "load \(cell(off.load)) -> \(cell(on.load))\n"
        }
        for atLoad in [true, false] {
            guard let base = row(rows, atLoad, .off), let eager = row(rows, atLoad, .atLoad),
                  let lazy = row(rows, atLoad, .onFirstProtectedVM), let lazyTDX = lazy.firstProtectedVM
            else { continue }
            out += "one-time setup (enable_virt_at_load \(atLoad ? "on" : "off")): adds "
                + "\(signed(eager.load.totalNanos(profile), base.load.totalNanos(profile))) to load at load, "
                + "\(signed(lazyTDX.totalNanos(profile), lazy.firstVM.totalNanos(profile))) to the first protected VM on demand\n"
        }
        return out
    }

    /// The rows as figures: per configuration and operation, the modelled one and the emulator's.
    public static func figures(_ rows: [Row], profile: CostProfile, iterations: Int) -> [HostFigure] {
        rows.flatMap { r -> [HostFigure] in
            let setting = "enable_virt_at_load=\(r.enableVirtAtLoad ? "Y" : "N"), one-time setup \(r.oneTimeSetup.rawValue)"
            let ops = [("load", r.load), ("first VM", r.firstVM), ("next VM", r.nextVM), ("destroy the last VM", r.destroyLastVM)]
                + (r.firstProtectedVM.map { [("first protected VM", $0)] } ?? [])
            return ops.flatMap { name, o in [
                HostFigure(source: .model, what: "\(name): \(o.cpuEnables) per-CPU enables, \(o.cpuDisables) disables, \(o.setups) one-time setups",
                           setting: setting, samples: 1, minNanos: nil, medianNanos: UInt64(o.modelledNanos(profile)), maxNanos: nil),
                HostFigure(source: .emulated, what: "\(name): the emulated host's own work", setting: setting,
                           samples: max(1, iterations), minNanos: nil, medianNanos: o.emulatedNanos, maxNanos: nil),
            ] }
        }
    }

    static func row(_ rows: [Row], _ atLoad: Bool, _ setup: OneTimeSetupPolicy) -> Row? {
        rows.first { $0.enableVirtAtLoad == atLoad && $0.oneTimeSetup == setup }
    }

    /// ns below 10 us, us below 10 ms, ms below 10 s, s above.
    static func duration(_ nanos: UInt64) -> String {
        switch nanos {
        case ..<10_000: "\(nanos) ns"
        case ..<10_000_000: Report.fmt(Double(nanos) / 1e3, 1) + " us"
        case ..<10_000_000_000: Report.fmt(Double(nanos) / 1e6, 2) + " ms"
        default: Report.fmt(Double(nanos) / 1e9, 2) + " s"
        }
    }

    /// The difference a - b, with a sign, as a duration.
    static func signed(_ a: Double, _ b: Double) -> String {
        a >= b ? "+" + duration(UInt64(a - b)) : "-" + duration(UInt64(b - a))
    }
}
