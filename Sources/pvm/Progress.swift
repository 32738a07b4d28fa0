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
        Self.status(line)
    }

    /// One status line: on a terminal rewritten in place (cut to the terminal's width, so it
    /// never wraps), otherwise a line of its own.
    static func status(_ line: String) {
        guard isatty(2) == 1 else {
            printError(line)
            return
        }
        var size = winsize()
        let columns = ioctl(2, UInt(TIOCGWINSZ), &size) == 0 && size.ws_col > 0 ? Int(size.ws_col) : 80
        let shown = line.count < columns ? line : String(line.prefix(max(1, columns - 1)))
        clear()
        shown.withCString { p in _ = write(2, p, strlen(p)) }
    }

    /// Clears a status line left on the terminal (nothing elsewhere): carriage return, erase to
    /// the end of the line.
    static func clear() {
        guard isatty(2) == 1 else { return }
        "\r\u{1B}[K".withCString { p in _ = write(2, p, strlen(p)) }
    }

    /// Clears the line on a terminal, so what follows (the table, an error) starts on a clean
    /// one. Safe to call however the work ended (`defer`).
    func finish() {
        guard !quiet, done > 0 else { return }
        Self.clear()
    }
}
