import Transport
import Foundation

/// The kinds of one-level exit `pvm calibrate` times through /dev/kvm, in the order it runs them.
public enum CalibrationExitKind: String, CaseIterable, Codable, Sendable {
    /// CPUID in a loop: KVM emulates it in the kernel; userspace never sees it.
    case cpuid
    /// VMCALL/VMMCALL with an unknown hypercall number: KVM answers -KVM_ENOSYS in the kernel.
    case hypercall
    /// OUT to a port nobody in the kernel claims: KVM_EXIT_IO to userspace, which resumes at once.
    case io
    /// RDMSR of an MSR the filter denies: KVM_EXIT_X86_RDMSR to userspace, which answers it.
    case msr
    /// HLT with no in-kernel irqchip: KVM_EXIT_HLT to userspace, which resumes at once. (With
    /// KVM_CREATE_IRQCHIP, HLT would block the vCPU until an interrupt: nothing to time.)
    case hlt

    /// Whether each exit of this kind comes back to this process (a userspace round trip).
    public var exitsToUserspace: Bool {
        switch self {
        case .cpuid, .hypercall: false
        case .io, .msr, .hlt: true
        }
    }

    public var label: String {
        switch self {
        case .cpuid: "in-kernel CPUID exit"
        case .hypercall: "in-kernel hypercall"
        case .io: "userspace I/O exit"
        case .msr: "userspace RDMSR exit"
        case .hlt: "userspace HLT exit"
        }
    }

    /// The per-vCPU KVM statistic that counts this kind's exits, where there is one.
    public var statisticName: String? {
        switch self {
        case .io: "io_exits"
        case .hlt: "halt_exits"
        case .cpuid, .hypercall, .msr: nil
        }
    }
}

/// One run: N iterations of the exiting instruction, timed by the guest and by this process.
public struct CalibrationRun: Codable, Equatable, Sendable {
    /// Guest TSC ticks between the RDTSCs around the loop.
    public var guestCycles: UInt64
    /// CLOCK_MONOTONIC nanoseconds from the first KVM_RUN to the guest's "done" exit.
    public var wallNanos: UInt64
    /// Exits that reached userspace during the loop (the "done" exit not counted).
    public var userspaceExits: UInt64
    /// What KVM's own binary statistics (KVM_GET_STATS_FD) counted over the run: `exits` and the
    /// kind's own counter (`io_exits`, `halt_exits`); nil when the kernel offers none.
    public var kvmStatistics: [String: UInt64]?

    public init(guestCycles: UInt64, wallNanos: UInt64, userspaceExits: UInt64, kvmStatistics: [String: UInt64]? = nil) {
        self.guestCycles = guestCycles; self.wallNanos = wallNanos; self.userspaceExits = userspaceExits
        self.kvmStatistics = kvmStatistics
    }
}

/// The cost of one exit of one kind: medians over the runs.
public struct ExitCost: Codable, Equatable, Sendable {
    public var kind: CalibrationExitKind
    public var iterations: Int
    public var runs: [CalibrationRun]
    /// Median over the runs of guest TSC cycles per iteration (the exit round trip plus the
    /// instruction and two loop instructions, which cost a few cycles).
    public var cyclesPerExit: Double
    /// Median over the runs of userspace wall time per iteration.
    public var nanosPerExit: Double

    public init(kind: CalibrationExitKind, iterations: Int, runs: [CalibrationRun], cyclesPerExit: Double, nanosPerExit: Double) {
        self.kind = kind; self.iterations = iterations; self.runs = runs
        self.cyclesPerExit = cyclesPerExit; self.nanosPerExit = nanosPerExit
    }
}

/// This machine's own one-level costs, timed in `pvm calibrate`'s process (`NativeProbe`):
/// medians over the runs, in ns. nil where the probe failed.
public struct NativeCosts: Codable, Equatable, Sendable {
    /// A CPUID executed here: on a VM it traps to the hypervisor below (a one-level exit).
    public var cpuidNanos: Double?
    /// A getpid system call (SYSCALL/SYSRET and a null handler).
    public var syscallNanos: Double?
    /// A first write to a fresh anonymous page (a minor fault).
    public var pageFaultNanos: Double?
    public var runs: Int
    public init(cpuidNanos: Double?, syscallNanos: Double?, pageFaultNanos: Double?, runs: Int) {
        self.cpuidNanos = cpuidNanos; self.syscallNanos = syscallNanos; self.pageFaultNanos = pageFaultNanos; self.runs = runs
    }
}

/// Everything `pvm calibrate` measured: what each exit kind costs on this host, one level deep.
public struct CalibrationResult: Codable, Equatable, Sendable {
    public var devicePath: String
    public var iterations: Int
    public var runsPerKind: Int
    /// The guest's TSC rate: guest cycles over wall time, median over every run.
    public var tscGHz: Double
    /// The CPU vendor KVM reports (CPUID leaf 0), which picked VMCALL or VMMCALL.
    public var vendor: String
    /// Measured kinds, in `CalibrationExitKind.allCases` order.
    public var exits: [ExitCost]
    /// Kinds that could not be measured on this host, with why (e.g. no userspace MSR exits).
    public var notMeasured: [String: String]
    /// The modules serving /dev/kvm (/sys/module): kvm_intel, kvm_amd or kvm_pvm.
    public var modules: [KVMModule]
    /// This machine's own one-level costs, measured in the same run (nil in a hand-made result).
    public var native: NativeCosts?

    public init(devicePath: String, iterations: Int, runsPerKind: Int, tscGHz: Double, vendor: String,
                exits: [ExitCost], notMeasured: [String: String], modules: [KVMModule] = [], native: NativeCosts? = nil) {
        self.devicePath = devicePath; self.iterations = iterations; self.runsPerKind = runsPerKind
        self.tscGHz = tscGHz; self.vendor = vendor; self.exits = exits; self.notMeasured = notMeasured
        self.modules = modules; self.native = native
    }

    /// What the figures are: one-level KVM exits, or (kvm_pvm) PVM's nested exits.
    public var whatWasMeasured: String {
        guard !modules.isEmpty else { return "/dev/kvm is served by no kvm_intel, kvm_amd or kvm_pvm module: what it measures is unknown" }
        return modules.map { "/dev/kvm is served by \($0.rawValue): \($0.meaning)" }.joined(separator: "; ")
    }

    /// KVM's own count of exits against the loop's, per measured kind: one line each, saying
    /// whether they agree (every iteration made at least one exit KVM counted).
    public var statisticsCheck: [String] {
        exits.compactMap { e in
            let stats = e.runs.compactMap(\.kvmStatistics)
            guard stats.count == e.runs.count, let first = stats.first else { return nil }
            let exitsPerRun = stats.map { $0["exits"] ?? 0 }
            let ok = exitsPerRun.allSatisfy { $0 >= UInt64(e.iterations) }
            let extra = first.filter { $0.key != "exits" }.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }
            return "\(e.kind.label): KVM counted \(exitsPerRun.map(String.init).joined(separator: "/")) exits per run"
                + (extra.isEmpty ? "" : " (" + extra.joined(separator: ", ") + " in the first)")
                + (ok ? ", at least one per iteration: agrees" : ", fewer than the \(e.iterations) iterations: MISMATCH")
        }
    }

    public subscript(kind: CalibrationExitKind) -> ExitCost? { exits.first { $0.kind == kind } }

    /// Guest cycles converted to nanoseconds at the measured TSC rate.
    public func nanos(cycles: Double) -> Double { cycles / tscGHz }

    /// A table for a person: one line per kind, ns (wall), cycles (guest TSC) and their ns.
    public var summary: String {
        var lines = ["exit                      iterations  runs   wall ns/exit  guest cycles/exit  (= ns at \(calibrationFormat(tscGHz, 3)) GHz)"]
        for e in exits {
            lines.append(pad(e.kind.label, 26) + lpad("\(e.iterations)", 10) + lpad("\(e.runs.count)", 6)
                         + lpad(calibrationFormat(e.nanosPerExit, 0), 15) + lpad(calibrationFormat(e.cyclesPerExit, 0), 19)
                         + lpad(calibrationFormat(nanos(cycles: e.cyclesPerExit), 0), 20))
        }
        for (k, why) in notMeasured.sorted(by: { $0.key < $1.key }) { lines.append("\(k): not measured: \(why)") }
        lines += statisticsCheck
        lines.append(whatWasMeasured)
        if let n = native {
            func f(_ x: Double?) -> String { x.map { calibrationFormat($0, 0) + " ns" } ?? "not measured" }
            lines.append("this machine's own one-level costs (median of \(n.runs) runs, in this process): native CPUID \(f(n.cpuidNanos)) (an exit to the hypervisor below), getpid system call \(f(n.syscallNanos)), first touch of a page \(f(n.pageFaultNanos))")
        }
        lines.append("TSC \(calibrationFormat(tscGHz, 3)) GHz (guest TSC cycles / wall time); vendor \(vendor); device \(devicePath)")
        return lines.joined(separator: "\n")
    }
}

/// Fixed-point formatting for the summary and the profile's source strings.
func calibrationFormat(_ x: Double, _ decimals: Int) -> String { String(format: "%.\(decimals)f", x) }

private func pad(_ s: String, _ n: Int) -> String { s + String(repeating: " ", count: max(0, n - s.count)) }
private func lpad(_ s: String, _ n: Int) -> String { String(repeating: " ", count: max(0, n - s.count)) + s }
