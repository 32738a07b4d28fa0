import ABI
import Bench
import Foundation
#if canImport(Glibc)
import Glibc
#endif
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

// MARK: subprocesses that cannot hang a test

/// A `pvm` subprocess: stdin from /dev/null, stdout and stderr each to a temp file (never a
/// Pipe: a surviving tier that inherited the write end would keep a reader blocked forever),
/// read only after the process has exited. The process and everything it starts carry a unique
/// PVM_TEST_TOKEN in their environment, so leftovers are found by process, not by pipe EOF.
/// `cleanup()` (also run by deinit) kills it if it still runs and removes the temp files.
///
/// Started with posix_spawn, not Foundation's Process: a child of Process inherits the spawning
/// thread's signal mask (SIGTERM, SIGINT, SIGHUP... blocked), so it would not behave as from a
/// shell. Here the child starts with an empty mask, default handlers and no descriptor but 0-2.
final class PVMProcess {
    let token = "pvm-test-" + UUID().uuidString
    let arguments: [String]
    let stdoutURL: URL
    let stderrURL: URL
    let pid: Int32
    /// The raw wait status once reaped.
    private var waitStatus: Int32?

    init(_ arguments: [String]) throws {
        self.arguments = arguments
        let tmp = FileManager.default.temporaryDirectory
        stdoutURL = tmp.appendingPathComponent("\(token).out")
        stderrURL = tmp.appendingPathComponent("\(token).err")

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, stdoutURL.path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_addopen(&actions, 2, stderrURL.path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        _ = Self.addCloseFrom?(&actions, 3)

        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var none = sigset_t(), all = sigset_t()
        sigemptyset(&none)
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attr, &none)
        posix_spawnattr_setsigdefault(&attr, &all)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        var env = ProcessInfo.processInfo.environment
        env["PVM_TEST_TOKEN"] = token
        let argv: [UnsafeMutablePointer<CChar>?] = ([PVMBinary.path] + arguments).map { strdup($0) } + [nil]
        let envp: [UnsafeMutablePointer<CChar>?] = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { (argv + envp).forEach { free($0) } }
        var child: pid_t = 0
        let r = posix_spawn(&child, PVMBinary.path, &actions, &attr, argv, envp)
        guard r == 0 else { throw SpawnFailed(errno: r) }
        pid = child
    }
    struct SpawnFailed: Error { var errno: Int32 }

    /// glibc's posix_spawn_file_actions_addclosefrom_np (2.34+), which Swift's Glibc module does
    /// not import: no descriptor of the test process beyond 0-2 reaches the child.
    static let addCloseFrom: (@convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32)? = {
        guard let sym = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np") else { return nil }
        return unsafeBitCast(sym, to: (@convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32).self)
    }()

    /// Reaps it if it has exited; true while it runs.
    var isRunning: Bool {
        if waitStatus != nil { return false }
        var status: Int32 = 0
        let r = waitpid(pid, &status, WNOHANG)
        if r == pid { waitStatus = status; return false }
        return r == 0
    }

    /// Polls until the process has exited or `seconds` pass; false on timeout.
    func wait(seconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while isRunning && Date() < deadline { usleep(10_000) }
        return !isRunning
    }

    /// The exit code, or 128 + the signal that ended it (as a shell reports it); nil while running.
    var exitStatus: Int32? {
        guard !isRunning, let s = waitStatus else { return nil }
        let signal = s & 0x7F
        return signal == 0 ? (s >> 8) & 0xFF : 128 + signal
    }

    /// Waits for the exit; past the deadline, records an issue, SIGKILLs and reaps it. Returns
    /// the exit status (nil after a timeout).
    @discardableResult
    func finish(seconds: Double, sourceLocation: SourceLocation = #_sourceLocation) -> Int32? {
        if wait(seconds: seconds) { return exitStatus }
        Issue.record("pvm \(arguments) did not exit within \(seconds) s; killed", sourceLocation: sourceLocation)
        kill(pid, SIGKILL)
        _ = wait(seconds: 10)
        return nil
    }

    /// What it wrote; only once it has exited.
    var stdout: String { read(stdoutURL) }
    var stderr: String { read(stderrURL) }
    private func read(_ url: URL) -> String {
        guard !isRunning else { return "<still running>" }
        return (try? String(contentsOf: url, encoding: .utf8)) ?? ""
    }

    func cleanup() {
        if isRunning {
            kill(pid, SIGKILL)
            _ = wait(seconds: 10)
        }
        try? FileManager.default.removeItem(at: stdoutURL)
        try? FileManager.default.removeItem(at: stderrURL)
    }

    deinit { cleanup() }
}

/// The whole of a /proc file (they report size 0, and Foundation's readers may stop after the
/// first 4 KiB read).
func readProcFile(_ path: String) -> [UInt8]? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 65_536)
    while true {
        let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { return n == 0 ? out : nil }
        out += buf[0..<n]
    }
}

/// A temp file path for a command's output file (`--json`, `--out`...), removed by `body`'s end.
func withTempFile<T>(_ suffix: String, _ body: (URL) throws -> T) rethrows -> T {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent("pvm-test-\(UUID().uuidString)\(suffix)")
    defer { try? FileManager.default.removeItem(at: url) }
    return try body(url)
}

/// Live (not zombie) processes whose environment carries `token`, with their `comm` names.
func processes(withToken token: String) -> [(pid: Int32, name: String)] {
    let needle = Array("PVM_TEST_TOKEN=\(token)".utf8)
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return entries.compactMap { Int32($0) }.compactMap { p in
        guard let env = readProcFile("/proc/\(p)/environ"),
              env.split(separator: 0).contains(where: { Array($0) == needle }),
              processState(p) != "Z",
              let name = try? String(contentsOfFile: "/proc/\(p)/comm", encoding: .utf8) else { return nil }
        return (p, name.trimmingCharacters(in: .whitespacesAndNewlines))
    }
}

/// `pvm-l1` / `pvm-l2` processes started by a run marked with `token` that are still alive
/// after `seconds` (PR_SET_PDEATHSIG kills them asynchronously, so give it a moment).
func survivingTiers(token: String, seconds: Double = 10) -> [(pid: Int32, name: String)] {
    let deadline = Date().addingTimeInterval(seconds)
    var left = processes(withToken: token).filter { $0.name == "pvm-l1" || $0.name == "pvm-l2" }
    while !left.isEmpty && Date() < deadline {
        usleep(20_000)
        left = processes(withToken: token).filter { $0.name == "pvm-l1" || $0.name == "pvm-l2" }
    }
    return left
}

/// The state letter of /proc/PID/stat (R, S, Z...), nil if there is no such process.
func processState(_ pid: Int32) -> String? {
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = stat.lastIndex(of: ")") else { return nil }
    return stat[stat.index(close, offsetBy: 2)...].split(separator: " ").first.map(String.init)
}

/// This process's descriptors that are L0's memfds (`/memfd:pvm-control`, `/memfd:pvm-host-memory`,
/// "(deleted)" as memfds always are). Other suites' fixtures name theirs `test-*`, so running
/// them in parallel does not perturb this count the way a global descriptor count is perturbed.
func pvmMemfdDescriptors() -> [String] {
    let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
    return fds.compactMap { try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\($0)") }
        .filter { $0.hasPrefix("/memfd:pvm-") }.sorted()
}

/// Lines of /proc/self/maps that map one of L0's memfds.
func pvmMemfdMappings() -> [String] {
    let maps = readProcFile("/proc/self/maps").map { String(decoding: $0, as: UTF8.self) } ?? ""
    return maps.split(separator: "\n").filter { $0.contains("/memfd:pvm-") }.map(String.init)
}

/// `pvm-l1` / `pvm-l2` children of this test process (reaped ones are gone; zombies count).
func tierChildrenOfThisProcess() -> [(pid: Int32, name: String)] {
    children(of: getpid()).filter { $0.name == "pvm-l1" || $0.name == "pvm-l2" }
}
