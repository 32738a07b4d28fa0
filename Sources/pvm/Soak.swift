import ABI
import ArgumentParser
import Foundation
import Transport

/// `pvm soak`: one stack running an endless guest for a while, with each tier's resident memory
/// sampled from /proc, and the slope of each (least squares). A flat line is the claim: a stack
/// that runs for hours must not grow with the number of exits.
struct Soak: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run one stack for a while, sample each tier's RSS, and report its slope (KiB/s) and the exits done.")

    @Option(name: .long, help: "How long to run, seconds (1-86400).")
    var seconds: Double = 30
    @Option(name: .long, help: "single, pv, nvmx, nvmx-noshadow or nvmx-evmcs.")
    var path: String = "nvmx"
    @Option(name: .long, help: "Guest program (an endless one: l1-io-forever or cpuid-forever).")
    var program: String = "l1-io-forever"
    @Option(name: .long, help: "Sampling interval, milliseconds (10-10000).")
    var intervalMs: Int = 100
    @Flag(name: .long, help: "Print the report as JSON.")
    var json = false
    @Flag(name: .long, help: "No progress line on stderr.")
    var quiet = false

    func validate() throws {
        guard seconds >= 1, seconds <= 86_400 else { throw ValidationError("--seconds must be in 1...86400") }
        guard (10...10_000).contains(intervalMs) else { throw ValidationError("--interval-ms must be in 10...10000") }
        guard NestingPath(rawValue: path) != nil else {
            throw ValidationError("unknown path '\(path)' (known: \(NestingPath.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        guard ["l1-io-forever", "cpuid-forever"].contains(program) else {
            throw ValidationError("--program must be an endless guest: l1-io-forever or cpuid-forever")
        }
    }

    struct TierSeries: Encodable {
        var tier: String
        var samples: Int
        var first_kib: Int
        var last_kib: Int
        var max_kib: Int
        var slope_kib_per_s: Double
    }

    func run() throws {
        let l0 = try WatchedLaunch(["launch", "--path", path, "--program", program])
        let started = Date()
        var series: [String: [(t: Double, kib: Int)]] = [:]
        var lastProgress = started
        while l0.isRunning, Date().timeIntervalSince(started) < seconds {
            let t = Date().timeIntervalSince(started)
            for (pid, name) in l0.processes() {
                guard ["pvm-l0", "pvm-l1", "pvm-l2"].contains(name), let kib = ProcessProbe.residentKiB(of: pid) else { continue }
                series[name, default: []].append((t, kib))
            }
            if !quiet, Date().timeIntervalSince(lastProgress) >= 5 {
                Progress.status(String(format: "soak: %.0f of %.0f s (%.0f s left)", t, seconds, max(0, seconds - t)))
                lastProgress = Date()
            }
            usleep(useconds_t(intervalMs * 1000))
        }
        if !quiet { Progress.clear() }
        let ranToTheEnd = l0.isRunning
        if ranToTheEnd { kill(l0.pid, SIGINT) }      // the orderly stop, with its counts
        let end = l0.finish(within: 20)
        let text = end.output
        guard ranToTheEnd, end.exitStatus == 128 + SIGINT else {
            throw Failure("soak: the stack did not run for \(seconds) s and stop on SIGINT: \(text.split(separator: "\n").last ?? "")")
        }
        let exits = text.split(separator: "\n").first { $0.hasPrefix("entries: ") }.map(String.init) ?? ""
        let report = series.keys.sorted().map { name -> TierSeries in
            let s = series[name]!
            return TierSeries(tier: name, samples: s.count, first_kib: s.first!.kib, last_kib: s.last!.kib,
                              max_kib: s.map(\.kib).max()!, slope_kib_per_s: Self.slope(s))
        }
        if json {
            struct Report: Encodable { var path: String; var program: String; var seconds: Double; var counts: String; var tiers: [TierSeries] }
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try enc.encode(Report(path: path, program: program, seconds: seconds, counts: exits, tiers: report)), as: UTF8.self))
        } else {
            print("tier     samples   first KiB    last KiB     max KiB   slope KiB/s")
            for r in report {
                print(r.tier.padding(toLength: 8, withPad: " ", startingAt: 0) + String(r.samples).leftPad(8)
                      + String(r.first_kib).leftPad(12) + String(r.last_kib).leftPad(12) + String(r.max_kib).leftPad(12)
                      + String(format: "%14.3f", r.slope_kib_per_s))
            }
            print("\(path), \(program), \(Int(seconds)) s: \(exits)")
        }
    }

    /// Least-squares slope of kib over t (0 with fewer than two distinct times).
    static func slope(_ s: [(t: Double, kib: Int)]) -> Double {
        guard s.count >= 2 else { return 0 }
        let n = Double(s.count)
        let mt = s.map(\.t).reduce(0, +) / n
        let mk = s.map { Double($0.kib) }.reduce(0, +) / n
        let num = s.map { ($0.t - mt) * (Double($0.kib) - mk) }.reduce(0, +)
        let den = s.map { ($0.t - mt) * ($0.t - mt) }.reduce(0, +)
        return den > 0 ? num / den : 0
    }
}

extension ProcessProbe {
    /// VmRSS of `pid` in KiB, from /proc/PID/status.
    static func residentKiB(of pid: Int32) -> Int? {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }) else { return nil }
        return Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "")
    }
}
