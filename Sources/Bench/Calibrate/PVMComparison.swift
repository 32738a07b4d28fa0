import ABI
import L0

/// `pvm calibrate`'s last part: the pvm-rfc path's model, priced from this machine's own
/// one-level figures, next to what the real PVM here (/dev/kvm served by kvm_pvm) measured in
/// the same run. On this machine the layers line up with the path: L0 is the hypervisor below
/// this VM, L1 is this VM running kvm_pvm, L2 is the calibration guest.
extension CalibrationResult {
    /// A profile of this machine one level deep: the world switch as published (0.10 us at this
    /// TSC rate); L1's exit handling (and L0's simple exit) from the native CPUID this VM
    /// executes, an exit to the hypervisor below, minus that world switch; L2's system call from
    /// the native getpid; the rest from `base`. nil without a native CPUID figure.
    public func oneLevelProfile(base: CostProfile) -> CostProfile? {
        guard let native, let cpuid = native.cpuidNanos else { return nil }
        typealias E = CostProfile.Event
        let round = { (x: Double) in (x * 10).rounded() / 10 }
        let switchCycles = round(Self.publishedExitRoundTripNanos * tscGHz)
        let handler = round(max(0, cpuid * tscGHz - switchCycles))
        let here = "measured by pvm calibrate in this VM (TSC \(calibrationFormat(tscGHz, 3)) GHz)"
        var prices = base.prices
        prices[E.exitRoundTrip.rawValue] = .init(cycles: switchCycles, source:
            "published, not measured: world switch ~0.10 us (PVM paper, SOSP'23) at this host's TSC rate")
        for e in [E.l0SimpleExit, .l1ExitHandling] {
            prices[e.rawValue] = .init(cycles: handler, source:
                "\(here): a native CPUID, an exit to the hypervisor below this VM, \(calibrationFormat(cpuid, 0)) ns, minus exit_round_trip")
        }
        if let s = native.syscallNanos {
            prices[E.l2Syscall.rawValue] = .init(cycles: round(s * tscGHz), source: "\(here): a getpid system call, \(calibrationFormat(s, 0)) ns")
        }
        return CostProfile(name: "this-machine-one-level", description: "This machine's one-level figures (\(here)); the rest from \"\(base.name)\".",
                           ghz: (tscGHz * 1000).rounded() / 1000, prices: prices)
    }

    /// What the real PVM measured here for a test's operation, if the calibration guest has it:
    /// its CPUID exit (in L1's kernel) and its port I/O exit (to L1's userspace VMM).
    public func realPVMNanos(for test: String) -> Double? {
        switch test {
        case "cpuid": self[.cpuid]?.nanosPerExit
        case "inl_from_qemu": self[.io]?.nanosPerExit
        default: nil
        }
    }

    /// Why a test has no real-PVM figure here.
    public static func realPVMMissing(_ test: String) -> String {
        switch test {
        case "syscall", "page_fault", "exception":
            "not measured: a PVM guest takes its syscalls and exceptions through PVM's own event entry (its PV MSRs and shared vCPU page), which the calibration guest does not implement"
        default: "not measured"
        }
    }

    /// One line per test: the pvm-rfc model (its range) and the real PVM's figure, side by side.
    public static func comparison(_ rows: [(test: String, result: BenchResult)], profile p: CostProfile,
                                  real: (String) -> Double?) -> [String] {
        var out = ["pvm-rfc's model, priced from this machine's one-level figures, against the real PVM here (ns per operation):",
                   "test             model   (estimates low-high)   real PVM   real / model"]
        for (test, r) in rows {
            let model = CostModel.cyclesPerOp(r, p) / p.ghz
            let range = CostModel.cyclesRangePerOp(r, p)
            var line = test.padding(toLength: 14, withPad: " ", startingAt: 0)
                + calibrationFormat(model, 0).leftPad(8)
                + "\(calibrationFormat(range.lowerBound / p.ghz, 0))-\(calibrationFormat(range.upperBound / p.ghz, 0))".leftPad(23)
            if let x = real(test) {
                line += calibrationFormat(x, 0).leftPad(11) + (calibrationFormat(x / max(model, 1), 2) + " x").leftPad(15)
            } else {
                line += "   " + realPVMMissing(test)
            }
            out.append(line)
        }
        return out
    }
}
