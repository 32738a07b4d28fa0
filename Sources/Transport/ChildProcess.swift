import ABI
import CPVMShim
#if canImport(Glibc)
import Glibc
#endif

/// How a tier process ended.
public enum ExitStatus: Equatable, Sendable, CustomStringConvertible {
    case exited(Int32)
    case signaled(Int32)

    public var isSuccess: Bool { self == .exited(0) }
    public var description: String {
        switch self {
        case .exited(let c): "exit status \(c)"
        case .signaled(SIGSYS): "killed by signal \(SIGSYS) (a system call outside the tier sandbox's allow-list)"
        case .signaled(let s): "killed by signal \(s) (\(String(cString: strsignal(s))))"
        }
    }
}

/// A tier process L0 started (L1 or L2). L0 reaps it; nobody else does.
public final class ChildProcess: @unchecked Sendable {
    public let tier: Tier
    public let pid: pid_t
    public private(set) var status: ExitStatus?

    /// Starts `path` with `arguments`; `fds[i]` becomes descriptor 3+i in the child.
    public init(tier: Tier, path: String, arguments: [String], fds: [Int32]) throws {
        self.tier = tier
        let argv = [path] + arguments
        // strdup'd C strings live until posix_spawn returns; freed right after.
        var cargs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) }
        cargs.append(nil)
        defer { for p in cargs { free(p) } }
        let pid = fds.withUnsafeBufferPointer { f in
            pvm_spawn(path, cargs, f.baseAddress, Int32(f.count))
        }
        guard pid > 0 else { throw TransportError.spawnFailed(path: path, errno: -pid) }
        self.pid = pid
    }

    /// Non-blocking: the exit status if the process has ended (and reaps it), else nil.
    @discardableResult
    public func poll() -> ExitStatus? {
        if let status { return status }
        var raw: Int32 = 0
        let r = waitpid(pid, &raw, WNOHANG)
        if r == pid { status = Self.decode(raw) }
        return status
    }

    public func kill(_ signal: Int32 = SIGKILL) {
        if poll() == nil { _ = Glibc.kill(pid, signal) }
    }

    /// Waits up to `timeoutNanos` for the process to end; nil if it is still running.
    @discardableResult
    public func wait(timeoutNanos: UInt64) -> ExitStatus? {
        let deadline = monotonicNanos() + timeoutNanos
        while poll() == nil {
            if monotonicNanos() > deadline { return nil }
            usleep(1000)
        }
        return status
    }

    /// Ends the process for certain: SIGKILL, then reap.
    public func killAndReap() {
        guard poll() == nil else { return }
        kill(SIGKILL)
        var raw: Int32 = 0
        if waitpid(pid, &raw, 0) == pid { status = Self.decode(raw) }
    }

    static func decode(_ raw: Int32) -> ExitStatus {
        // The WIFEXITED/WEXITSTATUS/WTERMSIG macros, which Swift cannot import.
        let sig = raw & 0x7F
        return sig == 0 ? .exited((raw >> 8) & 0xFF) : .signaled(sig)
    }
}

/// What a tier process does first: take its name, die with its parent, take its CPU.
public enum TierProcess {
    /// The name `ps` shows for a tier: pvm-l0, pvm-l1, pvm-l2.
    public static func name(of tier: Tier) -> String { "pvm-l\(tier.rawValue)" }

    public static func setName(_ tier: Tier) {
        _ = pvm_set_process_name(name(of: tier))
    }

    /// A child tier must not outlive L0: the kernel kills it when its parent dies. Returns false
    /// if the parent is already gone (the race PR_SET_PDEATHSIG leaves open).
    public static func dieWithParent(expectedParent: pid_t) -> Bool {
        _ = pvm_die_with_parent()
        return getppid() == expectedParent
    }

}

/// Where each tier runs. L0 is the hub every transition goes through, so it gets a core of its
/// own and waits by spinning; L1 and L2 never run at the same time, so they share the other
/// core and wait by yielding to each other. That keeps at most one pure spinner per core.
public struct CPUPlacement: Sendable, Equatable {
    public let l0CPU: Int?
    public let guestCPU: Int?

    public static let unpinned = CPUPlacement(l0CPU: nil, guestCPU: nil)

    public init(l0CPU: Int?, guestCPU: Int?) {
        self.l0CPU = l0CPU
        self.guestCPU = guestCPU
    }

    /// The CPUs the calling thread may run on, bit i for CPU i (0 if the kernel would not say).
    public static var allowedCPUMask: UInt64 { pvm_allowed_cpus() }

    /// Two distinct allowed CPUs if there are two; otherwise no pinning.
    public static func automatic() -> CPUPlacement {
        let mask = allowedCPUMask
        let cpus = (0..<64).filter { mask & (1 << UInt64($0)) != 0 }
        guard cpus.count >= 2 else { return .unpinned }
        return CPUPlacement(l0CPU: cpus[0], guestCPU: cpus[1])
    }

    public var isPinned: Bool { l0CPU != nil && guestCPU != nil }

    public func cpu(for tier: Tier) -> Int? { tier == .l0 ? l0CPU : guestCPU }

    /// Where `tier` runs on `path`. On pvm-rfc L1 and L2 hand the vCPU to each other without
    /// L0, so they take the two cores (L2 beside L0, which sleeps), not one core between them.
    public func cpu(for tier: Tier, path: NestingPath) -> Int? {
        path.usesSwitcher && tier == .l2 ? l0CPU : cpu(for: tier)
    }

    /// L0's wait policy on `path`: on pvm-rfc L0 is idle while L1 and L2 run (L2 shares its core),
    /// so it yields briefly and then sleeps instead of spinning.
    public func l0WaitPolicy(on path: NestingPath) -> WaitPolicy {
        path.usesSwitcher ? WaitPolicy(spin: .yield, spinBudgetNanos: 50_000) : waitPolicy(for: .l0)
    }

    /// Pins the calling process as `tier`; false if the kernel refused.
    @discardableResult
    public func apply(as tier: Tier) -> Bool {
        guard let c = cpu(for: tier) else { return true }
        return pvm_pin_to_cpu(Int32(c)) == 0
    }

    /// The wait policy that goes with this placement. A child tier with several vCPUs has that
    /// many threads on its core, most of them waiting at any time: each yields for a short
    /// while and then sleeps, so only the vCPUs that have work keep the core busy.
    public func waitPolicy(for tier: Tier, vcpus: Int = 1) -> WaitPolicy {
        if vcpus > 1 && tier != .l0 {
            return WaitPolicy(spin: .yield, spinBudgetNanos: 200_000)
        }
        if isPinned {
            return tier == .l0
                ? WaitPolicy(spin: .pause, spinBudgetNanos: 2_000_000)
                : WaitPolicy(spin: .yield, spinBudgetNanos: 2_000_000)
        }
        // One core or unknown: everybody yields, nobody holds the core.
        return WaitPolicy(spin: .yield, spinBudgetNanos: 1_000_000)
    }
}
