import ABI
import L0
import L2Guest
import Transport

/// One configuration of the stack a test runs on: a path, how L1 maps L2's memory, and on pv
/// the features L1 enables.
public struct BenchVariant: Sendable, Equatable {
    public var path: NestingPath
    public var pvFeatures: PVFeatures = .all
    public var l2MapMode: L2MapMode = .eager

    public init(path: NestingPath, pvFeatures: PVFeatures = .all, l2MapMode: L2MapMode = .eager) {
        self.path = path
        self.pvFeatures = pvFeatures
        self.l2MapMode = l2MapMode
    }

    /// `pv`, `pv[-direct-cpuid]`, `pv(per-page)`, `nvmx(batch)`...
    public var label: String {
        var s = path.rawValue
        if path == .pv && pvFeatures != .all {
            let off = PVFeatures.names.filter { !pvFeatures.contains($0.1) }.map { "-" + $0.0 }
            s += pvFeatures.isEmpty ? "[none]" : "[" + off.joined(separator: ",") + "]"
        }
        if l2MapMode != .eager { s += "(\(l2MapMode.rawValue))" }
        return s
    }

    /// The pv rows of an ablation: every feature, each one switched off, none.
    public static func ablation(mapMode: L2MapMode = .eager) -> [BenchVariant] {
        [BenchVariant(path: .pv, l2MapMode: mapMode)]
            + PVFeatures.names.map { BenchVariant(path: .pv, pvFeatures: PVFeatures.all.subtracting($0.1), l2MapMode: mapMode) }
            + [BenchVariant(path: .pv, pvFeatures: [], l2MapMode: mapMode)]
    }
}

public enum BenchError: Error, CustomStringConvertible {
    case unknownTest(String)
    case runFailed(test: String, variant: String, StopReason)
    case noMeasurement(test: String, variant: String)
    case oneVCPUOnly(test: String)
    case noLocalAPIC(test: String, variant: String)

    public var description: String {
        switch self {
        case .unknownTest(let t): "unknown test '\(t)' (known: \(BenchOperations.all.map(\.name).joined(separator: ", ")))"
        case let .runFailed(t, v, r): "\(t) on \(v) did not finish: \(r)"
        case let .noMeasurement(t, v): "\(t) on \(v) reported no measurement window"
        case let .noLocalAPIC(t, v): "\(t) needs a local APIC for L2 (and L0's flush hypercall, for tlb_shootdown_hypercall), which \(v) does not model"
        case .oneVCPUOnly(let t): "\(t) runs on one vCPU (it needs fresh pages or L2's page tables of its own)"
        }
    }
}

/// Runs each (test, variant) in a fresh three-tier stack and collects the guest's latency report
/// and L0's transition counts for the measurement window.
public struct BenchRunner: Sendable {
    public var tierExecutable: String
    public var iterations: UInt64
    public var warmup: UInt64
    /// With a value, `iterations` is a ceiling and the guest doubles the count until a run lasts
    /// this long (vmexit.c's way); tests that need fresh work per iteration keep a fixed count.
    public var minNanos: UInt64?
    public var placement: CPUPlacement = .automatic()
    /// The watchdog for each stack (StackConfig.tierTimeoutNanos).
    public var tierTimeoutNanos: UInt64 = StackConfig.defaultTierTimeoutNanos

    /// The tier executable's build ID, read once here: every stack checks the file still has it.
    public let tierBuild: String?

    public init(tierExecutable: String, iterations: UInt64, warmup: UInt64) {
        self.tierExecutable = tierExecutable
        self.tierBuild = BuildID.of(file: tierExecutable)
        self.iterations = iterations
        self.warmup = warmup
    }

    /// Iterations and warm-up for a test, within what the test can do (a first touch needs a
    /// fresh page each time).
    public func budget(for op: BenchOperation) -> (iterations: UInt64, warmup: UInt64) {
        guard let limit = op.iterationLimit else { return (iterations, warmup) }
        let n = min(iterations, limit)
        return (n, min(warmup, limit - n))
    }

    public func run(_ test: String, on variant: BenchVariant) throws -> BenchResult {
        try run(test, on: variant, vcpus: 1)[0]
    }

    /// `test` on every vCPU of one stack with `vcpus` of them, measured at the same time (the
    /// vCPUs meet before their measured loops): one result per vCPU, vCPU 0's first.
    public func run(_ test: String, on variant: BenchVariant, vcpus: Int) throws -> [BenchResult] {
        guard let op = BenchOperations.named(test) else { throw BenchError.unknownTest(test) }
        guard vcpus == 1 || op.runsOnSeveralVCPUs else { throw BenchError.oneVCPUOnly(test: test) }
        guard op.runs(on: variant.path, pvFeatures: variant.pvFeatures) else {
            throw BenchError.noLocalAPIC(test: test, variant: variant.label)
        }
        let (n, w) = budget(for: op)
        let doubling = op.iterationLimit == nil ? (minNanos ?? 0) : 0
        var config = StackConfig(path: variant.path, program: op.name, programArguments: [n, w, doubling], tierExecutable: tierExecutable,
                                 tierBuild: tierBuild)
        config.placement = placement
        config.tierTimeoutNanos = tierTimeoutNanos
        config.pvFeatures = variant.pvFeatures
        config.l2MapMode = variant.l2MapMode
        config.vcpuCount = max(vcpus, op.vcpus)
        let result = try L0Stack(config: config).run()
        guard result.succeeded else { throw BenchError.runFailed(test: test, variant: variant.label, result.stop) }
        if op.helper != nil {
            // One operation across vCPUs (an IPI and its target): vCPU 0's time, every vCPU's counts.
            guard let latency = result.harness.reports.first,
                  let windows = Optional(result.perVCPU.compactMap { $0.harness.windows.first }), windows.count == result.perVCPU.count else {
                throw BenchError.noMeasurement(test: test, variant: variant.label)
            }
            let window = windows.dropFirst().reduce(windows[0]) { $0.adding($1) }
            return [BenchResult(test: test, variant: variant, iterations: latency.samples, latency: latency, window: window)]
        }
        return try result.perVCPU.map { v in
            guard let window = v.harness.windows.first, let latency = v.harness.reports.first else {
                throw BenchError.noMeasurement(test: test, variant: variant.label)
            }
            return BenchResult(test: test, variant: variant, iterations: latency.samples, latency: latency, window: window)
        }
    }

    /// The variants a test runs on by default: every path; an operation whose cost depends on
    /// how L1 maps L2's memory (fresh pages), with each map mode on the nested paths.
    public static func defaultVariants(for op: BenchOperation, paths: [NestingPath]) -> [BenchVariant] {
        paths.filter { op.runs(on: $0, pvFeatures: .all) }.flatMap { p -> [BenchVariant] in
            op.dependsOnMapMode && p.hasMapModes ? L2MapMode.allCases.map { BenchVariant(path: p, l2MapMode: $0) } : [BenchVariant(path: p)]
        }
    }

    /// The same, by test name (unknown names have none).
    public static func defaultVariants(for test: String, paths: [NestingPath]) -> [BenchVariant] {
        BenchOperations.named(test).map { defaultVariants(for: $0, paths: paths) } ?? []
    }
}
