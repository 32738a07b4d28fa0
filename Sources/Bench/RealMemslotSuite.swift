import Foundation
import Transport

/// The real kernel's side of `pvm bench --suite memslot`: the same patterns the emulated L0's
/// zap policies run, through /dev/kvm (`RealMemslotProbe`), sized to what this machine can back.
public enum RealMemslotSuite {
    public struct Report: Sendable {
        public var device: String
        public var results: [RealMemslotProbe.Result]
        /// Why the sizes are smaller than the pattern's, if they are.
        public var scaledNote: String?
    }

    /// The patterns: the ChromeOS one (a 2 GiB slot deleted and created again, 1 GiB of other
    /// memory beside it, 3 rounds) and one large slot (4 GiB) deleted once. `divisor` shrinks
    /// every size (tests; or a machine without the memory).
    public static func scenarios(divisor: Int = 1) -> [RealMemslotProbe.Scenario] {
        func size(_ b: Int) -> Int { max(2 << 20, (b / divisor) & ~((2 << 20) - 1)) }
        return [RealMemslotProbe.Scenario(name: "recreate 2 GiB", otherBytes: size(1 << 30), targetBytes: size(2 << 30), rounds: 3),
                RealMemslotProbe.Scenario(name: "delete large", otherBytes: 0, targetBytes: size(4 << 30), rounds: 1)]
    }

    /// MemAvailable from /proc/meminfo, in bytes (nil if unreadable).
    static func availableBytes() -> Int? {
        guard let text = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("MemAvailable:") }),
              let kib = Int(line.split(separator: " ").dropFirst().first ?? "") else { return nil }
        return kib * 1024
    }

    public static func run(device: String = "/dev/kvm", divisor: Int = 1, progress: (String) -> Void = { _ in }) throws -> Report {
        do { _ = try KVMDevice(path: device) } catch { throw RealHostSuite.Unavailable(reason: "\(error)") }
        // The largest scenario must fit twice over in what the machine has free; else shrink.
        var d = max(1, divisor)
        var note: String?
        if let free = availableBytes() {
            while d < 64, scenarios(divisor: d).map({ $0.otherBytes + $0.targetBytes }).max()! * 2 > free { d *= 2 }
            if d > divisor { note = "sizes divided by \(d): \(free >> 20) MiB available cannot back the full pattern twice over" }
        }
        if note == nil, d > 1 { note = "sizes divided by \(d), as asked" }
        var results: [RealMemslotProbe.Result] = []
        for s in scenarios(divisor: d) {
            progress(s.name)
            results.append(try RealMemslotProbe.run(s, device: device))
        }
        return Report(device: device, results: results, scaledNote: note)
    }

    public static func table(_ r: Report) -> String {
        var s = "Real kernel (through \(r.device); the guest stores one byte per 4 KiB page; times are medians over the rounds):\n"
        if let note = r.scaledNote { s += "  (\(note))\n" }
        s += "  " + "scenario".padding(toLength: 16, withPad: " ", startingAt: 0) + "target".leftPad(9) + "other".leftPad(9)
            + "first touch".leftPad(13) + "delete".leftPad(11) + "refault".leftPad(11) + "other mapped".leftPad(14)
            + "other after".leftPad(13) + "  kernel stats across the first delete (before it)\n"
        for x in r.results {
            let stats = RealMemslotProbe.reportedStats.compactMap { k in
                x.rounds.first?.statsAcrossDelete[k].map { "\(k) \($0 >= 0 ? "+" : "")\($0) (\(x.rounds.first?.statsBeforeDelete[k] ?? 0))" }
            }
            let delete = HostSuite.duration(UInt64(Median.of(x.rounds.map { Double($0.deleteNanos) })))
            let refault = Bench.Report.fmt(Median.of(x.rounds.map(\.targetRefaultNanosPerPage)), 0) + " ns/pg"
            let mapped = x.scenario.otherBytes > 0 ? Bench.Report.fmt(x.otherMappedNanosPerPage, 0) + " ns/pg" : "-"
            let after = x.scenario.otherBytes > 0 ? Bench.Report.fmt(Median.of(x.rounds.map(\.otherRetouchNanosPerPage)), 0) + " ns/pg" : "-"
            var line = "  " + x.scenario.name.padding(toLength: 16, withPad: " ", startingAt: 0)
            line += "\(x.scenario.targetBytes >> 20) MiB".leftPad(9) + "\(x.scenario.otherBytes >> 20) MiB".leftPad(9)
            line += (Bench.Report.fmt(x.firstTouchNanosPerPage, 0) + " ns/pg").leftPad(13) + delete.leftPad(11) + refault.leftPad(11)
            line += mapped.leftPad(14) + after.leftPad(13) + "  " + stats.joined(separator: ", ") + "\n"
            s += line
        }
        s += "  (other after: the other memory touched again after the delete and re-create; near \"other mapped\" means the\n"
            + "   kernel zapped only the deleted slot, near \"first touch\"/\"refault\" that it zapped every mapping)\n"
        return s
    }
}
