import ABI
import ArgumentParser
import Foundation
import L0
import Transport

/// `pvm chaos`: random SIGKILL or SIGSTOP of one tier of a running stack, over N trials, from
/// outside (as a crashing or frozen guest would look to L0). Each trial runs `pvm launch` with an
/// endless guest whose every exit reaches L1 (`l1-io-forever`), picks a tier, a signal and a moment from the seed, and then checks what the
/// stack must always do: L0 ends on its own with status 1 and a line naming the tier, within its
/// watchdog, and no tier process or L0 memfd outlives it.
struct Chaos: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Kill or freeze a random tier of a running stack, N times; report clean ends, orphans and leaked memfds.")

    @Option(name: .long, help: "Trials (1-10000).")
    var trials: Int = 20
    @Option(name: .long, help: "Seed for the tier, signal and moment of each trial.")
    var seed: UInt64 = 1
    @Option(name: .long, help: "Nested paths to run on, comma-separated: pv, nvmx, nvmx-noshadow, nvmx-evmcs, pvm-rfc.")
    var path: String = "pv,nvmx"
    @Option(name: .long, help: "The stack's watchdog, seconds in (0, 60] (what catches a frozen tier).")
    var tierTimeout: Double = 1
    @Flag(name: .long, help: "Print the report as JSON.")
    var json = false
    @Flag(name: .long, help: "No progress line on stderr.")
    var quiet = false

    func validate() throws {
        guard (1...10_000).contains(trials) else { throw ValidationError("--trials must be in 1...10000") }
        guard tierTimeout > 0, tierTimeout <= 60 else { throw ValidationError("--tier-timeout must be in (0, 60] seconds") }
        guard try Checks.paths(path).allSatisfy(\.isNested) else {
            throw ValidationError("chaos runs on nested paths (three tiers): pv, nvmx, nvmx-noshadow, nvmx-evmcs, pvm-rfc")
        }
    }

    struct Trial: Encodable {
        var path: String
        var tier: String
        var signal: String
        var delayMs: Int
        var exitStatus: Int32?
        var namedTier: Bool
        var seconds: Double
        var orphans: Int
        var leakedMemfds: Int
        var clean: Bool { exitStatus == 1 && namedTier && orphans == 0 && leakedMemfds == 0 }
    }

    func run() throws {
        let paths = try Checks.paths(path)
        var rng = FuzzRandom(seed: seed)     // the trials a seed picks
        var results: [Trial] = []
        var progress = Progress(total: trials, quiet: quiet)
        defer { progress.finish() }
        for _ in 0..<trials {
            let p = paths[Int(rng.next() % UInt64(paths.count))]
            let tier = rng.next() % 2 == 0 ? "l1" : "l2"
            let signal = rng.next() % 2 == 0 ? SIGKILL : SIGSTOP
            let delay = 100 + Int(rng.next() % 400)
            progress.step("\(p.rawValue): \(signal == SIGKILL ? "SIGKILL" : "SIGSTOP") to \(tier) after \(delay) ms")
            results.append(try trial(p, tier: tier, signal: signal, delayMs: delay))
        }
        progress.finish()
        if json {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            struct Report: Encodable { var seed: UInt64; var trials: Int; var clean: Int; var orphans: Int; var leaked_memfds: Int; var runs: [Trial] }
            let r = Report(seed: seed, trials: results.count, clean: results.filter(\.clean).count,
                           orphans: results.map(\.orphans).reduce(0, +), leaked_memfds: results.map(\.leakedMemfds).reduce(0, +), runs: results)
            print(String(decoding: try enc.encode(r), as: UTF8.self))
        } else {
            print("path           tier  signal   trials  clean  orphans  leaked memfds  longest end (s)")
            let groups = Dictionary(grouping: results) { "\($0.path)|\($0.tier)|\($0.signal)" }
            for key in groups.keys.sorted() {
                let g = groups[key]!
                let f = key.split(separator: "|").map(String.init)
                print(f[0].padding(toLength: 15, withPad: " ", startingAt: 0) + f[1].padding(toLength: 6, withPad: " ", startingAt: 0)
                      + f[2].padding(toLength: 9, withPad: " ", startingAt: 0)
                      + String(g.count).leftPad(6) + String(g.filter(\.clean).count).leftPad(7)
                      + String(g.map(\.orphans).reduce(0, +)).leftPad(9) + String(g.map(\.leakedMemfds).reduce(0, +)).leftPad(15)
                      + String(format: "%17.2f", g.map(\.seconds).max() ?? 0))
            }
            print("clean ends: \(results.filter(\.clean).count) of \(results.count) (seed \(seed))")
        }
        if results.contains(where: { !$0.clean }) { throw ExitCode(1) }
    }

    /// One stack, one signal, and what was left afterwards.
    func trial(_ path: NestingPath, tier: String, signal: Int32, delayMs: Int) throws -> Trial {
        let l0 = try WatchedLaunch(["launch", "--path", path.rawValue, "--program", "l1-io-forever", "--tier-timeout", "\(tierTimeout)"])
        let started = Date()
        // Wait for the victim tier, then let the stack run for the chosen moment.
        let name = "pvm-\(tier)"
        var victim: Int32?
        while victim == nil && l0.isRunning && Date().timeIntervalSince(started) < 20 {
            victim = l0.processes().first { $0.name == name }?.pid
            if victim == nil { usleep(10_000) }
        }
        if let victim {
            usleep(useconds_t(delayMs * 1000))
            kill(victim, signal)
        }
        let end = l0.finish(within: 10 + 3 * tierTimeout - Date().timeIntervalSince(started))
        let seconds = Date().timeIntervalSince(started)
        if let victim, signal == SIGSTOP { kill(victim, SIGCONT) }
        let text = end.output
        let upper = tier.uppercased()
        let named = text.contains("\(upper) (pvm-\(tier)) ended unexpectedly") || text.contains("\(upper) (pvm-\(tier)) did not give the vCPU back")
        // Orphans: tier processes of this token still alive (give the kernel a moment to deliver PDEATHSIG).
        var left = l0.processes()
        let deadline = Date().addingTimeInterval(5)
        while !left.isEmpty && Date() < deadline { usleep(20_000); left = l0.processes() }
        let leaked = left.map { ProcessProbe.memfdDescriptors(of: $0.pid) }.reduce(0, +)
        for p in left { kill(p.pid, SIGKILL) }
        return Trial(path: path.rawValue, tier: tier, signal: signal == SIGKILL ? "SIGKILL" : "SIGSTOP", delayMs: delayMs,
                     exitStatus: end.exitStatus,
                     namedTier: named, seconds: seconds, orphans: left.count, leakedMemfds: leaked)
    }
}

