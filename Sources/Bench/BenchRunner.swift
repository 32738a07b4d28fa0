import ABI
import L0
import Transport

/// A benchmark test: a guest program that measures one small operation per iteration.
public struct BenchTest: Sendable {
    public let name: String
    public let program: String
    public let summary: String
}

public enum BenchTests {
    public static let all: [BenchTest] = [
        BenchTest(name: "cpuid", program: "cpuid", summary: "CPUID leaf 0 (vmexit.c cpuid)"),
    ]
    public static func named(_ n: String) -> BenchTest? { all.first { $0.name == n } }
}

public enum BenchError: Error, CustomStringConvertible {
    case unknownTest(String)
    case runFailed(test: String, path: NestingPath, StopReason)
    case noMeasurement(test: String, path: NestingPath)

    public var description: String {
        switch self {
        case .unknownTest(let t): "unknown test '\(t)' (known: \(BenchTests.all.map(\.name).joined(separator: ", ")))"
        case let .runFailed(t, p, r): "\(t) on \(p.rawValue) did not finish: \(r)"
        case let .noMeasurement(t, p): "\(t) on \(p.rawValue) reported no measurement window"
        }
    }
}

/// Runs each (test, path) in a fresh three-tier stack and collects the guest's latency report
/// and L0's transition counts for the measurement window.
public struct BenchRunner: Sendable {
    public var tierExecutable: String
    public var iterations: UInt64
    public var warmup: UInt64
    public var placement: CPUPlacement = .automatic()

    public init(tierExecutable: String, iterations: UInt64, warmup: UInt64) {
        self.tierExecutable = tierExecutable
        self.iterations = iterations
        self.warmup = warmup
    }

    public func run(test: BenchTest, path: NestingPath) throws -> BenchResult {
        var config = StackConfig(path: path, program: test.program, programArguments: [iterations, warmup],
                                 tierExecutable: tierExecutable)
        config.placement = placement
        let stack = try L0Stack(config: config)
        let result = try stack.run()
        guard result.succeeded else { throw BenchError.runFailed(test: test.name, path: path, result.stop) }
        guard let window = result.harness.windows.first, let latency = result.harness.reports.first else {
            throw BenchError.noMeasurement(test: test.name, path: path)
        }
        return BenchResult(test: test.name, path: path, iterations: latency.samples, latency: latency, window: window)
    }
}
