import Foundation
import Transport

/// `pvm launch` run as a child of chaos or soak and watched from outside: its output drained,
/// its whole stack found by an environment token (which every tier inherits, so it still marks
/// them after reparenting).
final class WatchedLaunch {
    let token = "pvm-watched-" + UUID().uuidString
    private let process = Process()
    private let reader: OutputReader

    init(_ arguments: [String]) throws {
        process.executableURL = URL(fileURLWithPath: selfExecutable())
        process.arguments = arguments
        var env = ProcessInfo.processInfo.environment
        env[ProcessProbe.tokenVariable] = token
        process.environment = env
        let out = Pipe()
        process.standardOutput = out
        process.standardError = out
        process.standardInput = FileHandle.nullDevice
        try process.run()
        reader = OutputReader(out.fileHandleForReading)
    }

    var isRunning: Bool { process.isRunning }
    var pid: Int32 { process.processIdentifier }
    /// The stack's live processes (L0 and its tiers), by token.
    func processes() -> [(pid: Int32, name: String)] { ProcessProbe.processes(withToken: token) }

    /// Waits up to `seconds` for L0 to end by itself (SIGKILL after that) and returns its exit
    /// status (nil if it did not end by itself with one) and everything it printed.
    func finish(within seconds: Double) -> (exitStatus: Int32?, output: String) {
        let deadline = Date().addingTimeInterval(max(seconds, 0))
        while process.isRunning && Date() < deadline { usleep(10_000) }
        let byItself = !process.isRunning
        if !byItself { kill(pid, SIGKILL) }
        process.waitUntilExit()
        let status = byItself && process.terminationReason == .exit ? process.terminationStatus : nil
        return (status, reader.finish())
    }
}

/// Drains a pipe on its own thread (a full pipe would block the stack being watched).
final class OutputReader: @unchecked Sendable {
    private var data = Data()
    private let done = DispatchSemaphore(value: 0)
    init(_ handle: FileHandle) {
        Thread { [self] in
            data = handle.readDataToEndOfFile()
            done.signal()
        }.start()
    }
    func finish() -> String {
        done.wait()
        return String(decoding: data, as: UTF8.self)
    }
}

/// Finding a stack's processes from outside: every process L0 starts inherits its environment,
/// so a token there marks the whole stack even after reparenting.
enum ProcessProbe {
    static let tokenVariable = "PVM_WATCH_TOKEN"

    static func processes(withToken token: String) -> [(pid: Int32, name: String)] {
        let needle = Array("\(tokenVariable)=\(token)".utf8)
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { Int32($0) }.compactMap { p in
            guard let env = FileManager.default.contents(atPath: "/proc/\(p)/environ"),
                  env.split(separator: 0).contains(where: { Array($0) == needle }),
                  let stat = try? String(contentsOfFile: "/proc/\(p)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")"), stat[stat.index(close, offsetBy: 2)] != "Z",
                  let name = try? String(contentsOfFile: "/proc/\(p)/comm", encoding: .utf8) else { return nil }
            return (p, name.trimmingCharacters(in: .whitespacesAndNewlines))
        }
    }

    /// How many of `pid`'s descriptors are L0's memfds.
    static func memfdDescriptors(of pid: Int32) -> Int {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []
        return fds.filter { ((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\($0)")) ?? "").hasPrefix("/memfd:pvm-") }.count
    }
}

