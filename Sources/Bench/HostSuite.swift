import ABI
import L0
import Transport

/// `pvm bench --suite host`: who pays for enabling virtualization and for the one-time setup,
/// measured on fresh `L0Host`s (seeds/000, 001, 002). The per-CPU enable and the setup are
/// configured costs that the host really spends, so every figure here is a clock reading around
/// a host operation: what a user of the host would wait, locks and serialization included.
public enum HostSuite {
    /// The configured costs the hosts run with.
    public struct Costs: Sendable {
        public var cpuCount: Int
        public var enableCostNanos: UInt64
        public var setupCostNanos: UInt64

        public init(cpuCount: Int = L0Host.machineCPUCount,
                    enableCostNanos: UInt64 = L0Host.defaultEnableCostNanos,
                    setupCostNanos: UInt64 = L0Host.defaultOneTimeSetupCostNanos) {
            self.cpuCount = cpuCount
            self.enableCostNanos = enableCostNanos
            self.setupCostNanos = setupCostNanos
        }
    }

    /// One host configuration; every time is a median over `iterations` fresh hosts.
    public struct Row: Sendable {
        public var enableVirtAtLoad: Bool
        public var oneTimeSetup: OneTimeSetupPolicy
        /// Creating the host ("module load").
        public var loadNanos: UInt64
        /// The host's first VM, of the default type.
        public var firstVMNanos: UInt64
        /// A second default VM while the first exists.
        public var nextVMNanos: UInt64
        /// Destroying the last VM (with enableVirtAtLoad off, this disables every CPU).
        public var destroyLastVMNanos: UInt64
        /// The host's first VM being a protected-state one (TDX); nil when the setup is off, as
        /// the host then does not offer the type.
        public var firstProtectedVMNanos: UInt64?
    }

    /// How many configurations the suite measures.
    public static var configurationCount: Int { configurations.count }

    /// The configurations, in table order.
    static let configurations: [(Bool, OneTimeSetupPolicy)] = [
        (true, .off), (false, .off),
        (true, .atLoad), (false, .atLoad),
        (true, .onFirstProtectedVM), (false, .onFirstProtectedVM),
    ]

    /// `progress` is told each configuration as its hosts start (for a progress line).
    public static func measure(iterations: Int, costs: Costs = Costs(),
                               progress: (_ enableVirtAtLoad: Bool, OneTimeSetupPolicy) -> Void = { _, _ in }) throws(HostError) -> [Row] {
        let n = max(1, iterations)
        var rows: [Row] = []
        for (atLoad, setup) in configurations {
            progress(atLoad, setup)
            var load: [UInt64] = [], first: [UInt64] = [], next: [UInt64] = []
            var destroy: [UInt64] = [], firstProtected: [UInt64] = []
            for _ in 0..<n {
                func newHost() throws(HostError) -> L0Host {
                    try L0Host(cpuCount: costs.cpuCount, enableVirtAtLoad: atLoad, enableCostNanos: costs.enableCostNanos,
                               oneTimeSetup: setup, oneTimeSetupCostNanos: costs.setupCostNanos)
                }
                var t = monotonicNanos()
                let host = try newHost()
                load.append(monotonicNanos() - t)
                t = monotonicNanos()
                let a = try host.createVM(type: .default)
                first.append(monotonicNanos() - t)
                t = monotonicNanos()
                let b = try host.createVM(type: .default)
                next.append(monotonicNanos() - t)
                try host.destroyVM(a)
                t = monotonicNanos()
                try host.destroyVM(b)
                destroy.append(monotonicNanos() - t)

                // A second fresh host whose first VM is the protected one.
                guard setup != .off else { continue }
                t = monotonicNanos()
                let other = try newHost()
                load.append(monotonicNanos() - t)
                t = monotonicNanos()
                _ = try other.createVM(type: .tdx)
                firstProtected.append(monotonicNanos() - t)
            }
            rows.append(Row(enableVirtAtLoad: atLoad, oneTimeSetup: setup, loadNanos: Median.of(load),
                            firstVMNanos: Median.of(first), nextVMNanos: Median.of(next),
                            destroyLastVMNanos: Median.of(destroy),
                            firstProtectedVMNanos: firstProtected.isEmpty ? nil : Median.of(firstProtected)))
        }
        return rows
    }

    /// The table, then what it shows in two lines.
    public static func table(_ rows: [Row], costs: Costs, iterations: Int) -> String {
        var out = "host: \(costs.cpuCount) CPUs; per-CPU enable \(duration(costs.enableCostNanos)) (serialized across CPUs, "
            + "as cpuhp bring-up); one-time setup \(duration(costs.setupCostNanos)) (TDX module init); "
            + "median of \(max(1, iterations)) fresh hosts\n\n"
        let header = ["enable_virt_at_load", "one-time setup", "load", "first VM", "next VM", "destroy last VM", "first VM (tdx)"]
        let widths = [19, 21, 10, 10, 10, 15, 14]
        func line(_ cells: [String]) -> String {
            zip(cells, widths).enumerated().map { i, cw in Report.pad(cw.0, cw.1, right: i >= 2) }.joined(separator: "  ") + "\n"
        }
        out += line(header)
        for r in rows {
            out += line([r.enableVirtAtLoad ? "on" : "off", r.oneTimeSetup.rawValue, duration(r.loadNanos),
                         duration(r.firstVMNanos), duration(r.nextVMNanos), duration(r.destroyLastVMNanos),
                         r.firstProtectedVMNanos.map(duration) ?? "not offered"])
        }
        out += "(first VM, next VM, destroy last VM: default VMs on one fresh host; first VM (tdx): the first VM of "
            + "another fresh host, a protected one, not offered while the setup it needs is off)\n\n"
        if let on = row(rows, true, .off), let off = row(rows, false, .off) {
            out += "enable_virt_at_load: first VM \(duration(off.firstVMNanos)) -> \(duration(on.firstVMNanos)); "
                + "load \(duration(off.loadNanos)) -> \(duration(on.loadNanos))\n"
        }
        for atLoad in [true, false] {
            guard let base = row(rows, atLoad, .off), let eager = row(rows, atLoad, .atLoad),
                  let lazy = row(rows, atLoad, .onFirstProtectedVM), let lazyTDX = lazy.firstProtectedVMNanos
            else { continue }
            out += "one-time setup (enable_virt_at_load \(atLoad ? "on" : "off")): adds "
                + "\(signed(eager.loadNanos, base.loadNanos)) to load at load, "
                + "\(signed(lazyTDX, lazy.firstVMNanos)) to the first protected VM on demand\n"
        }
        return out
    }

    /// Measures and formats: what `pvm bench --suite host` prints.
    public static func run(iterations: Int, costs: Costs = Costs()) throws(HostError) -> String {
        table(try measure(iterations: iterations, costs: costs), costs: costs, iterations: iterations)
    }

    static func row(_ rows: [Row], _ atLoad: Bool, _ setup: OneTimeSetupPolicy) -> Row? {
        rows.first { $0.enableVirtAtLoad == atLoad && $0.oneTimeSetup == setup }
    }

    /// ns below 10 us, us below 10 ms, ms above.
    static func duration(_ nanos: UInt64) -> String {
        switch nanos {
        case ..<10_000: "\(nanos) ns"
        case ..<10_000_000: Report.fmt(Double(nanos) / 1e3, 1) + " us"
        default: Report.fmt(Double(nanos) / 1e6, 2) + " ms"
        }
    }

    /// The difference a - b, with a sign, as a duration.
    static func signed(_ a: UInt64, _ b: UInt64) -> String {
        a >= b ? "+" + duration(a - b) : "-" + duration(b - a)
    }
}
