import ABI
import ArgumentParser
import Bench
import L0
import L1PV
import L2Guest
import Foundation
import Transport
#if canImport(Glibc)
import Glibc
#endif

@main
struct PVM: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pvm",
        abstract: "A paravirtual nested hypervisor prototype: L0, L1 and L2 as three processes.",
        discussion: "Measures what an L2 instruction costs under the PV ABI and under emulated nested VMX.",
        subcommands: [Bench.self, Launch.self, Programs.self, Tier.self],
        defaultSubcommand: Bench.self)
}

/// The `pvm` executable itself: L0 starts L1 and L2 by running it again as `pvm __tier SPEC`.
func selfExecutable() -> String {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buf, buf.count - 1)
    return n > 0 ? String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
}

func parsePaths(_ list: String) throws -> [NestingPath] {
    try list.split(separator: ",").map {
        guard let p = NestingPath(rawValue: String($0)) else {
            throw ValidationError("unknown path '\($0)' (known: \(NestingPath.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        return p
    }
}

extension PVM {
    struct Bench: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run benchmark tests on each path and print ns/op and transitions per tier.")

        @Option(name: .long, help: "Test to run (default: all). Known: \(BenchTests.all.map(\.name).joined(separator: ", ")).")
        var test: String?
        @Option(name: .long, help: "Comma-separated paths: pv, nvmx, nvmx-noshadow.")
        var path: String = NestingPath.allCases.map(\.rawValue).joined(separator: ",")
        @Option(name: .long, help: "Measured iterations per test and path.")
        var iterations: UInt64 = 50_000
        @Option(name: .long, help: "Unmeasured iterations first (default: a tenth of --iterations).")
        var warmup: UInt64?
        @Option(name: .long, help: "Also write the results as JSON to this file.")
        var json: String?

        func run() throws {
            #if DEBUG
            printError("warning: this is a debug build; time it with `swift run -c release pvm bench`")
            #endif
            let paths = try parsePaths(path)
            let tests = try test.map { name -> [BenchTest] in
                guard let t = BenchTests.named(name) else { throw ValidationError("\(BenchError.unknownTest(name))") }
                return [t]
            } ?? BenchTests.all
            let runner = BenchRunner(tierExecutable: selfExecutable(), iterations: iterations, warmup: warmup ?? iterations / 10)
            var results: [BenchResult] = []
            for t in tests {
                for p in paths {
                    printError("running \(t.name) on \(p.rawValue) (\(iterations) iterations)...")
                    results.append(try runner.run(test: t, path: p))
                }
            }
            print(Report.table(results), terminator: "")
            let ratios = Report.ratios(results)
            if !ratios.isEmpty { print("\n" + ratios, terminator: "") }
            if let json {
                let text = try Report.json(results)
                do { try text.write(toFile: json, atomically: true, encoding: .utf8) } catch {
                    throw ValidationError("cannot write \(json): \(error.localizedDescription)")
                }
            }
        }
    }

    struct Launch: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Start the three-tier stack, run one guest program in L2, and print what happened.")

        @Option(name: .long, help: "pv, nvmx or nvmx-noshadow.")
        var path: String = "pv"
        @Option(name: .long, help: "Guest program (see `pvm programs`).")
        var program: String = "cpuid-values"
        @Option(name: .long, parsing: .upToNextOption, help: "Arguments for the guest program.")
        var args: [UInt64] = []
        @Option(name: .long, help: "Host memory in MiB (a sparse memfd).")
        var hostMemoryMiB: UInt64 = 1024

        func run() throws {
            guard let p = NestingPath(rawValue: path) else { throw ValidationError("unknown path '\(path)'") }
            guard GuestPrograms.named(program) != nil else {
                throw ValidationError("unknown guest program '\(program)' (see `pvm programs`)")
            }
            var config = StackConfig(path: p, program: program, programArguments: args, tierExecutable: selfExecutable())
            config.hostMemoryBytes = hostMemoryMiB << 20
            let result = try L0Stack(config: config).run()
            for line in result.harness.prints { print("[L2] \(line)") }
            for s in result.harness.syncs { print("sync " + s.map { "0x" + String($0, radix: 16) }.joined(separator: " ")) }
            print("stopped: \(result.stop)")
            print("L1 \(result.l1Status.map { "\($0)" } ?? "not started"), L2 \(result.l2Status.map { "\($0)" } ?? "not started")")
            let c = result.counters
            print("L2->L0 exits: " + TransitionCounters.byReason(c.l2Exits).sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))
            print("L1->L0 exits: " + TransitionCounters.byReason(c.l1Exits).sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))
            print("delivered to L1: " + TransitionCounters.byReason(c.deliveries).sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))
            print("entries: L1=\(c.l1Entries) L2=\(c.l2Entries)")
            if !result.succeeded { throw ExitCode(1) }
        }
    }

    struct Programs: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the guest programs L2 can run.")
        func run() {
            for p in GuestPrograms.all { print("\(p.name)\t\(p.summary)") }
        }
    }

    /// Internal: how L0 starts a child tier. Not for people.
    struct Tier: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "__tier", shouldDisplay: false)
        @Argument var spec: String

        func run() throws {
            let launch = try TierLaunch(decoding: spec)
            switch launch.tier {
            case .l1: L1Main.run(launch)
            case .l2: L2Main.run(launch)
            case .l0: throw ValidationError("L0 is not a child tier")
            }
        }
    }
}
