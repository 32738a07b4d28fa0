import ABI
import Bench
import Foundation
import L0
import Testing
import Transport

/// Every suite that launches real stacks runs under this one, one test at a time, so checks for
/// leftover processes, descriptors and shared memory see only their own stack.
@Suite(.serialized) enum StackTests {}

/// The `pvm` executable `swift test` built next to this test binary: it runs the child tiers.
enum PVMBinary {
    static let path: String = {
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent("pvm").path
    }()
}

/// Runs one stack to completion with a guest program.
func runStack(_ path: NestingPath, program: String, args: [UInt64] = []) throws -> (StackResult, L0Stack) {
    let stack = try L0Stack(config: StackConfig(path: path, program: program, programArguments: args, tierExecutable: PVMBinary.path))
    return (try stack.run(), stack)
}

func bench(_ path: NestingPath, test: String = "cpuid", iterations: UInt64 = 2_000, warmup: UInt64 = 100) throws -> BenchResult {
    try bench(BenchVariant(path: path), test: test, iterations: iterations, warmup: warmup)
}

func bench(_ variant: BenchVariant, test: String, iterations: UInt64 = 2_000, warmup: UInt64 = 100) throws -> BenchResult {
    try BenchRunner(tierExecutable: PVMBinary.path, iterations: iterations, warmup: warmup).run(test, on: variant)
}

/// Processes whose parent is `pid`, with their `comm` names.
func children(of pid: Int32) -> [(pid: Int32, name: String)] {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return entries.compactMap { Int32($0) }.compactMap { p in
        guard let stat = try? String(contentsOfFile: "/proc/\(p)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return nil }
        let fields = stat[stat.index(close, offsetBy: 2)...].split(separator: " ")
        guard fields.count > 1, Int32(fields[1]) == pid,
              let name = try? String(contentsOfFile: "/proc/\(p)/comm", encoding: .utf8) else { return nil }
        return (p, name.trimmingCharacters(in: .whitespacesAndNewlines))
    }
}

func processExists(_ pid: Int32) -> Bool { FileManager.default.fileExists(atPath: "/proc/\(pid)") }

func openFileDescriptorCount() -> Int {
    ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []).count
}

func perOp(_ r: BenchResult, _ reasons: [(ExitReason, Double)]) -> [String: Double] {
    Dictionary(uniqueKeysWithValues: reasons.map { ($0.0.name, $0.1) })
}
