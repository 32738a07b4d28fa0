import Foundation
import Transport
#if canImport(Glibc)
import Glibc
#endif

/// The progress line of long work (bench, fuzz, chaos, soak) on stderr: which step of how many,
/// and an estimate of the time left from the steps done so far. On a terminal it is one line
/// rewritten in place; otherwise (a log, a pipe) one line per step. `--quiet` turns it off.
struct Progress {
    let total: Int
    let quiet: Bool
    let started = Date()
    let onTerminal = isatty(2) == 1
    private(set) var done = 0

    init(total: Int, quiet: Bool) {
        self.total = total
        self.quiet = quiet
    }

    /// The estimate of the time left after `done` of `total` steps, or nil before the first.
    static func left(elapsed: TimeInterval, done: Int, total: Int) -> TimeInterval? {
        guard done > 0, total >= done else { return nil }
        return elapsed / Double(done) * Double(total - done)
    }

    static func format(_ seconds: TimeInterval) -> String {
        let s = Int(seconds.rounded())
        return s < 1 ? "under a second" : s < 90 ? "\(s) s" : s < 5400 ? "\(s / 60) min \(s % 60) s" : "\(s / 3600) h \(s % 3600 / 60) min"
    }

    /// Says that step `done + 1` (`label`) starts.
    mutating func step(_ label: String) {
        defer { done += 1 }
        guard !quiet else { return }
        let left = Self.left(elapsed: Date().timeIntervalSince(started), done: done, total: total)
        let line = "[\(done + 1)/\(total)] \(label)" + (left.map { " (\($0 < 0.5 ? "" : "about ")\(Self.format($0)) left)" } ?? "")
        if onTerminal {
            // Rewritten in place: carriage return, the line, erase to the end.
            let text = "\r" + line + "\u{1B}[K"
            text.withCString { p in _ = write(2, p, strlen(p)) }
        } else {
            printError(line)
        }
    }

    /// Ends the line on a terminal, so what follows starts on its own.
    func finish() {
        guard !quiet, onTerminal, done > 0 else { return }
        printError("\r[\(done)/\(total)] done in \(Self.format(Date().timeIntervalSince(started)))\u{1B}[K")
    }
}
