import Transport

/// Why a calibration could not run, or produced nothing to trust.
public enum CalibrationError: Error, CustomStringConvertible, Equatable {
    /// KVM is not usable here: the device cannot be opened, or a VM or vCPU cannot be created.
    case kvmUnavailable(KVMError)
    /// Another KVM call failed while setting up or running the guest.
    case kvm(KVMError)
    /// The guest stopped in a way its code does not: a bug in the guest image, or a KVM that
    /// does not run plain long-mode guests.
    case unexpectedExit(kind: CalibrationExitKind, exit: KVMExit, rip: UInt64)
    /// The exits reached userspace more or less often than the loop ran the instruction: the
    /// kind is not the one-exit-per-iteration this calibration assumes.
    case wrongExitCount(kind: CalibrationExitKind, expected: UInt64, got: UInt64)
    /// The CPUID loop did not see the leaf this VM's CPUID table holds: something other than
    /// this KVM answered CPUID (an outer hypervisor, or no exit at all), so it would time that.
    case cpuidNotFromKVM(gotEBX: UInt32, expectedEBX: UInt32)
    /// The loop did not finish in time: the guest stopped exiting (stuck in a layer below KVM's
    /// exit handling, or in a fault loop), at `rip` when it was stopped.
    case timedOut(kind: CalibrationExitKind, seconds: Double, rip: UInt64)
    case badArguments(String)

    public var description: String {
        switch self {
        case let .kvmUnavailable(e): "KVM is not usable on this host: \(e)"
        case let .kvm(e): "calibration failed: \(e)"
        case let .unexpectedExit(k, exit, rip): "calibration guest (\(k.rawValue) loop) stopped unexpectedly at rip 0x\(String(rip, radix: 16)): \(exit)"
        case let .wrongExitCount(k, e, g): "\(k.rawValue) loop: expected \(e) exits to userspace, saw \(g)"
        case let .cpuidNotFromKVM(g, e): "CPUID in the guest returned EBX 0x\(String(g, radix: 16)), not this VM's 0x\(String(e, radix: 16)): KVM did not handle it"
        case let .timedOut(k, secs, rip): "\(k.rawValue) loop: no \"done\" from the guest within \(calibrationFormat(secs, 2)) s (stopped at rip 0x\(String(rip, radix: 16)))"
        case let .badArguments(s): "calibration: \(s)"
        }
    }
}

/// `pvm calibrate`: times this host's one-level exits through the real /dev/kvm, with a tiny
/// long-mode guest (`CalibrationGuest`), and turns the figures into a cost profile
/// (`CalibrationResult.profile(base:)`). Each kind runs `runs` times `iterations` iterations
/// after a short warm-up; the figures are medians over the runs.
public enum Calibration {
    /// `progress` is told each kind of exit as its turn comes, measured or not (for a progress line).
    public static func run(devicePath: String = "/dev/kvm", iterations: Int = 20_000, runs: Int = 5,
                           progress: (CalibrationExitKind) -> Void = { _ in }) throws -> CalibrationResult {
        guard iterations > 0, runs > 0 else { throw CalibrationError.badArguments("iterations and runs must be > 0") }
        let setup = try Setup(devicePath: devicePath)

        var exits: [ExitCost] = []
        var notMeasured: [String: String] = [:]
        for kind in CalibrationExitKind.allCases {
            progress(kind)
            if let why = setup.unavailable[kind] { notMeasured[kind.rawValue] = why; continue }
            if kind == .hypercall, let why = try setup.hypercallProblem() {
                notMeasured[kind.rawValue] = why
                continue
            }
            _ = try setup.measure(kind, iterations: min(iterations, 1_000))   // warm-up: faults, caches
            let rs = try (0..<runs).map { _ in try setup.measure(kind, iterations: iterations) }
            exits.append(ExitCost(kind: kind, iterations: iterations, runs: rs,
                                  cyclesPerExit: Median.of(rs.map { Double($0.guestCycles) / Double(iterations) }),
                                  nanosPerExit: Median.of(rs.map { Double($0.wallNanos) / Double(iterations) })))
        }
        let ghz = Median.of(exits.flatMap(\.runs).map { Double($0.guestCycles) / Double(max(1, $0.wallNanos)) })
        return CalibrationResult(devicePath: devicePath, iterations: iterations, runsPerKind: runs, tscGHz: ghz,
                                 vendor: setup.vendor, exits: exits, notMeasured: notMeasured, modules: KVMModule.loaded(),
                                 native: measureNative(iterations: iterations, runs: runs))
    }

    /// This machine's own one-level costs in the same run: CPUID, a system call, a page fault.
    static func measureNative(iterations: Int, runs: Int) -> NativeCosts {
        let n = UInt64(min(iterations, 20_000)), pages: UInt64 = 4_096
        func median(_ probe: () -> Double?) -> Double? {
            _ = probe()                                                  // warm-up
            let xs = (0..<runs).compactMap { _ in probe() }
            return xs.count == runs ? Median.of(xs) : nil
        }
        return NativeCosts(cpuidNanos: median { NativeProbe.cpuidNanos(count: n) },
                           syscallNanos: median { NativeProbe.syscallNanos(count: n) },
                           pageFaultNanos: median { NativeProbe.pageFaultNanos(pages: pages) }, runs: runs)
    }
}

/// The VM, its one vCPU and its memory, set up once for every kind.
private struct Setup {
    let vm: KVMVirtualMachine
    let vcpu: KVMVCPU
    let vendor: String
    let amd: Bool
    /// Kinds this KVM cannot run, with why.
    var unavailable: [CalibrationExitKind: String] = [:]

    init(devicePath: String) throws {
        // Opening the device and creating the VM and vCPU decide whether KVM is usable at all.
        let device: KVMDevice
        do {
            device = try KVMDevice(path: devicePath)
            vm = try device.createVM(memoryBytes: CalibrationGuest.memoryBytes)
            vcpu = try vm.createVCPU()
        } catch let e as KVMError { throw CalibrationError.kvmUnavailable(e) }

        do {
            var cpuid = try device.supportedCPUID()
            let leaf0 = cpuid.first { $0.function == 0 }
            vendor = leaf0.map { String(decoding: [$0.ebx, $0.edx, $0.ecx].flatMap(Self.bytes), as: UTF8.self) } ?? "unknown"
            amd = vendor == "AuthenticAMD" || vendor == "HygonGenuine"
            // Mark the signature leaf so the CPUID loop can tell KVM answered it.
            if let i = cpuid.firstIndex(where: { $0.function == CalibrationGuest.cpuidLeaf }) {
                cpuid[i].ebx = CalibrationGuest.cpuidMarkerEBX
            } else {
                cpuid.append(KVMCPUIDEntry(function: CalibrationGuest.cpuidLeaf, index: 0, flags: 0, eax: 0,
                                           ebx: CalibrationGuest.cpuidMarkerEBX, ecx: 0, edx: 0))
            }
            // Before KVM_SET_SREGS: KVM refuses EFER.LME unless the guest's CPUID has long mode.
            try vcpu.setCPUID(cpuid)
            try vcpu.setSystemState(CalibrationGuest.systemState)
            for (gpa, bytes) in CalibrationGuest.image { try vm.write(bytes, at: gpa) }
            for kind in CalibrationExitKind.allCases {
                try vm.write(CalibrationGuest.code(kind, amd: amd), at: CalibrationGuest.entry(kind))
            }
        } catch let e as KVMError { throw CalibrationError.kvm(e) }

        do {
            try vm.enableUserSpaceMSRExitsOnFilter()
            try vm.denyReads(ofMSR: CalibrationGuest.filteredMSR)
        } catch let e as KVMError {
            unavailable[.msr] = "\(e)"
        }
    }

    private static func bytes(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }

    /// Runs one loop of `iterations` and times it; checks the exits it saw were the expected ones.
    func measure(_ kind: CalibrationExitKind, iterations: Int, limitNanos: UInt64? = nil) throws -> CalibrationRun {
        do {
            var regs = KVMRegisters()
            regs.rip = CalibrationGuest.entry(kind)
            regs.rdi = UInt64(iterations)
            regs.rsi = CalibrationGuest.result
            regs.rsp = CalibrationGuest.stackTop
            regs.rflags = 0x2   // IF = 0: no interrupt ends a HLT but KVM's exit
            try vcpu.setRegisters(regs)

            // Generous: 1 s, plus 100 us per iteration (the slowest exit here takes ~10 us).
            let limit = limitNanos ?? 1_000_000_000 + UInt64(iterations) * 100_000
            let statsBefore = try? vcpu.statistics()
            let (userspaceExits, wall) = try vcpu.withTimeLimit(nanos: limit) {
                let start = monotonicNanos()
                let n = try runToDone(kind, limit: limit)
                return (n, monotonicNanos() - start)
            }

            let expected: UInt64 = kind.exitsToUserspace ? UInt64(iterations) : 0
            guard userspaceExits == expected else {
                throw CalibrationError.wrongExitCount(kind: kind, expected: expected, got: userspaceExits)
            }
            if kind == .cpuid {
                let ebx = UInt32(truncatingIfNeeded: try vm.load64(at: CalibrationGuest.result + 16))
                guard ebx == CalibrationGuest.cpuidMarkerEBX else {
                    throw CalibrationError.cpuidNotFromKVM(gotEBX: ebx, expectedEBX: CalibrationGuest.cpuidMarkerEBX)
                }
            }
            // KVM's own count over the run, to confirm the loop's (the "done" exit included).
            var counted: [String: UInt64]?
            if let before = statsBefore, let after = try? vcpu.statistics() {
                counted = [:]
                for key in ["exits", kind.statisticName].compactMap({ $0 }) where after[key] != nil {
                    counted?[key] = (after[key] ?? 0) &- (before[key] ?? 0)
                }
            }
            return CalibrationRun(guestCycles: try vm.load64(at: CalibrationGuest.result), wallNanos: wall,
                                  userspaceExits: userspaceExits, kvmStatistics: counted)
        } catch let e as KVMError { throw CalibrationError.kvm(e) }
    }

    /// KVM_RUN until the guest's "done" OUT, resuming each exit the loop is meant to cause;
    /// returns how many of those reached userspace.
    private func runToDone(_ kind: CalibrationExitKind, limit: UInt64) throws -> UInt64 {
        var userspaceExits: UInt64 = 0
        while true {
            let exit = try vcpu.run()
            switch exit {
            case .io(port: CalibrationGuest.donePort, isOut: true, _, _, _):
                return userspaceExits
            case .timedOut:
                throw CalibrationError.timedOut(kind: kind, seconds: Double(limit) / 1e9, rip: (try? vcpu.registers().rip) ?? 0)
            case .io(port: CalibrationGuest.benchPort, isOut: true, _, _, _) where kind == .io,
                 .hlt where kind == .hlt:
                userspaceExits += 1   // nothing to emulate: KVM already stepped past the instruction
            case let .rdmsr(index, _) where kind == .msr && index == CalibrationGuest.filteredMSR:
                vcpu.answerRDMSR(0)
                userspaceExits += 1
            default:
                throw CalibrationError.unexpectedExit(kind: kind, exit: exit, rip: (try? vcpu.registers().rip) ?? 0)
            }
        }
    }

    /// One hypercall first: measure only if KVM answers -KVM_ENOSYS, its in-kernel "unknown
    /// hypercall" reply, and answers at all. Anything else means another layer has the instruction
    /// (on this project's machine, a KVM that is itself paravirtual, the guest never comes back).
    func hypercallProblem() throws -> String? {
        let instruction = amd ? "VMMCALL" : "VMCALL"
        do {
            // A quarter of a second for one hypercall: a handled one takes microseconds.
            _ = try measure(.hypercall, iterations: 1, limitNanos: 250_000_000)
        } catch let CalibrationError.timedOut(_, seconds, rip) {
            return "the guest did not come back from \(instruction) (rip 0x\(String(rip, radix: 16))) within \(calibrationFormat(seconds, 2)) s: this KVM does not complete the hypercall"
        } catch let e as CalibrationError {
            guard case .unexpectedExit = e else { throw e }
            return "\(instruction): \(e)"
        }
        let rax: UInt64
        do { rax = try vm.load64(at: CalibrationGuest.result + 8) } catch let e as KVMError { throw CalibrationError.kvm(e) }
        let enosys = UInt64(bitPattern: -1000)   // -KVM_ENOSYS (<linux/kvm_para.h>; Bench cannot import the shim)
        return rax == enosys ? nil : "\(instruction) returned RAX 0x\(String(rax, radix: 16)), not -KVM_ENOSYS: KVM did not handle it in its kernel"
    }
}
