import ABI
import ArgumentParser
import Foundation
import L0
import Transport

/// `pvm fuzz`: the in-process exit fuzzer (L0's `ExitFuzzer`) over every path's backend.
struct Fuzz: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Feed every backend random hostile exits, hypercalls and L1 memory; check EPT02 and the PV map stay inside L1 memory.")

    @Option(name: .long, help: "Cases per path (1-100000000).")
    var cases: UInt64 = 100_000
    @Option(name: .long, help: "Seed.")
    var seed: UInt64 = 1
    @Option(name: .long, help: "Comma-separated paths: single, pv, nvmx, nvmx-noshadow, nvmx-evmcs, pvm-rfc.")
    var path: String = NestingPath.allCases.map(\.rawValue).joined(separator: ",")
    @Flag(name: .long, help: "Print the report as JSON.")
    var json = false
    @Flag(name: .long, help: "No progress line on stderr.")
    var quiet = false

    func validate() throws {
        guard (1...100_000_000).contains(cases) else { throw ValidationError("--cases must be in 1...100000000") }
        _ = try Checks.paths(path)
    }

    func run() throws {
        let paths = try Checks.paths(path)
        var reports: [ExitFuzzer.Report] = []
        // One step per 65,536 cases (the fuzzer's reporting grain), and an estimate per path:
        // the paths' speeds differ 30-60x (single maps its RAM for every new life).
        let grain: UInt64 = 65_536
        let stepsPerPath = Int((cases + grain - 1) / grain)
        for (i, p) in paths.enumerated() {
            var progress = Progress(total: stepsPerPath, quiet: quiet)
            defer { progress.finish() }
            let which = "fuzz \(p.rawValue) (path \(i + 1) of \(paths.count))"
            progress.step("\(which): 0 of \(cases) cases, seed \(seed)")
            var steps = 1
            reports.append(try ExitFuzzer.run(path: p, cases: cases, seed: seed) { n in
                guard steps < stepsPerPath else { return }
                steps += 1
                progress.step("\(which): \(n) of \(cases) cases")
            })
        }
        if json {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try enc.encode(reports), as: UTF8.self))
        } else {
            print("path             cases    L1 exits    L2 exits  hypercalls   stops  EPT02 checks  violations  cases/s")
            for r in reports {
                let rate = r.nanos > 0 ? Double(r.cases) / (Double(r.nanos) / 1e9) : 0
                print(r.path.padding(toLength: 14, withPad: " ", startingAt: 0) + String(r.cases).leftPad(8)
                      + String(r.l1Exits).leftPad(12) + String(r.l2Exits).leftPad(12) + String(r.hypercalls).leftPad(12)
                      + String(r.stops).leftPad(8) + String(r.ept02EntriesChecked).leftPad(14)
                      + String(r.violations.count).leftPad(12) + String(format: "%9.0f", rate))
            }
            for r in reports { for v in r.violations { print("\(r.path): \(v)") } }
        }
        if reports.contains(where: { !$0.violations.isEmpty }) { throw ExitCode(1) }
    }
}
