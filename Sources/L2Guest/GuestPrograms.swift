import ABI
import Histogram
import Transport

/// A guest program, the way KVM selftests write `guest_code`: straight-line code against the
/// guest CPU, talking to the harness with sync / guestAssert / done.
public struct GuestProgram: Sendable {
    public let name: String
    public let summary: String
    /// What `--args` means for this program, in order (each optional from the end).
    public let arguments: [Argument]
    /// A rule across the arguments (nil: each argument alone decides): why they cannot go
    /// together, or nil.
    public let rule: (@Sendable ([UInt64]) -> String?)?
    public let body: @Sendable (GuestCPU, [UInt64]) -> Void
    /// Whether it can run on every vCPU of a VM with several at once (each with its vCPU
    /// index); not a program that builds L2's page tables or needs memory of its own.
    public let severalVCPUs: Bool
    /// The vCPUs it needs at least (an IPI test needs a target).
    public let minimumVCPUs: Int

    public init(name: String, summary: String, arguments: [Argument] = [], rule: (@Sendable ([UInt64]) -> String?)? = nil,
                severalVCPUs: Bool = true, minimumVCPUs: Int = 1, body: @escaping @Sendable (GuestCPU, [UInt64]) -> Void) {
        self.name = name
        self.severalVCPUs = severalVCPUs
        self.minimumVCPUs = minimumVCPUs
        self.summary = summary
        self.arguments = arguments
        self.rule = rule
        self.body = body
    }

    /// One argument: its name, what it means, its default, and what values it takes.
    public struct Argument: Sendable {
        public let name: String
        public let meaning: String
        public let defaultValue: String
        public let accepts: Accepts

        public enum Accepts: Sendable {
            case any
            case range(ClosedRange<UInt64>)
            /// An L2 guest-physical address aligned to `alignment`, below `limit`.
            case l2Address(alignment: UInt64, below: UInt64)

            var description: String {
                switch self {
                case .any: "any 64-bit value"
                case let .range(r): "in \(r.lowerBound)-\(r.upperBound)"
                case let .l2Address(a, limit): "an L2 GPA, \(a)-byte aligned, below 0x\(String(limit, radix: 16))"
                }
            }
            func accepts(_ v: UInt64) -> Bool {
                switch self {
                case .any: true
                case let .range(r): r.contains(v)
                case let .l2Address(a, limit): v % a == 0 && v < limit
                }
            }
        }

        public init(_ name: String, _ meaning: String, default defaultValue: String, accepts: Accepts) {
            self.name = name
            self.meaning = meaning
            self.defaultValue = defaultValue
            self.accepts = accepts
        }

        /// "gpa: L2 GPA to store to (an L2 GPA, 8-byte aligned, below 0x100000000; default 0x200000)"
        public var help: String { "\(name): \(meaning) (\(accepts.description); default \(defaultValue))" }
    }

    /// Why `args` cannot be this program's arguments, or nil when they can: checked before the
    /// stack starts, so a bad argument never reaches L2.
    public func problem(with args: [UInt64]) -> String? {
        guard args.count <= arguments.count else {
            return arguments.isEmpty ? "\(name) takes no arguments" : "\(name) takes at most \(arguments.count): \(arguments.map(\.name).joined(separator: ", "))"
        }
        for (a, v) in zip(arguments, args) where !a.accepts.accepts(v) {
            return "\(name): \(a.name) = \(v) (0x\(String(v, radix: 16))) is not \(a.accepts.description)"
        }
        return rule?(args)
    }
}

/// L2 GPAs below this are mappable (the stack's default EPT02 limit, `StackConfig.l2AddressLimit`).
public let l2AddressLimit: UInt64 = 4 << 30

/// The L2 GPA every program finds unmapped: above L2's RAM, below the EPT02 limit.
public let unmappedProbeGPA = L2GPA(0x8000_0000)

public enum GuestPrograms {
    public static let all: [GuestProgram] = [cpuidValues, memoryProbe, pagingProbe, instructionTour, permissionProbe, msrPolicyProbe, balloonProbe, vcpuProbe, SMPPrograms.ipiStorm, SMPPrograms.haltRing, SMPPrograms.haltAll, SMPPrograms.interruptWindowProbe, SMPPrograms.timerProbe, TLBShootdown.probe,
                                                 cpuidForever, l1IOForever, l2Escape]
        + BenchOperations.all.map { op in
            GuestProgram(name: op.name, summary: op.summary, arguments: measureLoopArguments, rule: op.iterationLimit.map { limit in
                // Every iteration (warm-up included) must be new work: at most `limit` of them, no doubling.
                { @Sendable args in
                    let iterations = args.first ?? 10_000, warmup = args.count > 1 ? args[1] : iterations / 10
                    if args.count > 2, args[2] != 0 { return "\(op.name) needs a fixed count: min-nanos must be 0" }
                    guard iterations.addingReportingOverflow(warmup).partialValue <= limit, warmup <= limit else {
                        return "\(op.name) has \(limit) fresh pages: iterations + warmup (\(iterations) + \(warmup)) must be at most \(limit)"
                    }
                    return nil
                }
            }, severalVCPUs: op.runsOnSeveralVCPUs || op.helper != nil, minimumVCPUs: op.vcpus) { cpu, args in
                if let helper = op.helper, cpu.vcpuIndex > 0 {
                    helperLoop(cpu, helper)
                } else {
                    let body = op.prepare(cpu)
                    measureLoop(cpu, args, helped: op.helper != nil, body)
                    if let helper = op.helper {
                        cpu.write64(BenchOperation.Helper.stopWord, 1)
                        helper.stop(cpu)
                    }
                }
                cpu.done()
            }
        }

    public static func named(_ name: String) -> GuestProgram? { all.first { $0.name == name } }

    /// What a measured loop takes (the benchmark tests' programs; `pvm bench` passes them).
    static let measureLoopArguments: [GuestProgram.Argument] = [
        .init("iterations", "operations measured (the ceiling when doubling)", default: "10000", accepts: .range(1...1_000_000_000)),
        .init("warmup", "operations run first, unmeasured", default: "a tenth of iterations", accepts: .range(0...1_000_000_000)),
        .init("min-nanos", "double the count until one run lasts this long; 0 = measure iterations as is", default: "0",
              accepts: .range(0...600_000_000_000)),
    ]

    /// A helper vCPU of a multi-vCPU test: ready when vCPU 0 starts its warm-up, its window
    /// open while vCPU 0 measures (and until vCPU 0 stops it).
    static func helperLoop(_ cpu: GuestCPU, _ helper: BenchOperation.Helper) {
        helper.setUp(cpu)
        cpu.rendezvous()
        var open = false
        while cpu.read64(BenchOperation.Helper.stopWord) == 0 {
            // vCPU 0 opened its window: open ours (within one of the helper's waits of it).
            if !open && cpu.read64(BenchOperation.Helper.measuringWord) != 0 {
                cpu.sync(UcallStage.measureStart, 0)
                open = true
            }
            helper.body(cpu)
        }
        if !open { cpu.sync(UcallStage.measureStart, 0) }
        cpu.sync(UcallStage.measureEnd, 0)
    }

    /// Times one operation per iteration between two syncs that bracket the measurement window.
    /// args: [iterations, warmup, minNanos]. With minNanos > 0, `iterations` is a ceiling: as
    /// vmexit.c does, the count doubles from 32 until one run lasts minNanos; that count is then
    /// measured again inside the window.
    static func measureLoop(_ cpu: GuestCPU, _ args: [UInt64], helped: Bool = false, _ op: (UInt64) -> Void) {
        let ceiling = args.count > 0 ? args[0] : 10_000
        let warmup = args.count > 1 ? args[1] : ceiling / 10
        let minNanos = args.count > 2 ? args[2] : 0
        cpu.rendezvous()                  // several vCPUs: every one is ready (an IPI's target too)
        for i in 0..<warmup { op(i) }
        var next = warmup                 // the next iteration number (first touch needs fresh ones)
        var iterations = ceiling
        if minNanos > 0 {
            var n: UInt64 = min(32, ceiling)
            while true {
                let t0 = cpu.now()
                for i in next..<(next + n) { op(i) }
                next += n
                if cpu.now() &- t0 >= minNanos || n >= ceiling { break }
                n = min(n * 2, ceiling)
            }
            iterations = n
        }
        if helped {
            cpu.write64(BenchOperation.Helper.measuringWord, 1)   // the helpers open their windows
        } else {
            cpu.rendezvous()              // several vCPUs: all measure at the same time
        }
        let first = next
        var h = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        var total: UInt64 = 0
        cpu.sync(UcallStage.measureStart, iterations)
        for i in first..<(first + iterations) {
            let t0 = cpu.now()
            op(i)
            let dt = cpu.now() &- t0
            h.record(dt)
            total &+= dt
        }
        cpu.sync(UcallStage.measureEnd, iterations)
        cpu.report(samples: iterations, min: h.min, median: h.valueAtPercentile(50), p99: h.valueAtPercentile(99),
                   max: h.max, total: total)
    }

    /// Reports what CPUID returns for a set of leaves (one sync per leaf: function, index, a, b, c, d).
    public static let cpuidValuesLeaves: [(UInt32, UInt32)] = [
        (0, 0), (1, 0), (7, 0), (0xD, 0), (0xD, 1), (0x4000_0000, 0), (0x8000_0000, 0), (0x8000_0001, 0), (0x42, 0),
    ]
    public static let cpuidValues = GuestProgram(name: "cpuid-values", summary: "reports CPUID for a fixed set of leaves") { cpu, _ in
        for (f, i) in cpuidValuesLeaves {
            let r = cpu.cpuid(f, i)
            cpu.sync(UInt64(f), UInt64(i), UInt64(r.eax), UInt64(r.ebx), UInt64(r.ecx), UInt64(r.edx))
        }
        cpu.done()
    }

    /// args: [gpa, pattern]. Stores `pattern` at L2 GPA `gpa` and reads it back; then reads an
    /// L2 GPA nothing maps (L1 must see that exit; unassigned memory reads as all ones).
    public static let memoryProbe = GuestProgram(name: "memory-probe", summary: "store to a mapped page, read an unmapped one", arguments: [
        .init("gpa", "where to store and read back (outside L2's 128 MiB of RAM nothing is there: the read-back assertion fails, on purpose)",
              default: "0x200000", accepts: .l2Address(alignment: 8, below: l2AddressLimit)),
        .init("pattern", "the value stored", default: "0x50564d21c0ffee00", accepts: .any),
    ]) { cpu, args in
        let gpa = L2GPA(args.count > 0 ? args[0] : 0x20_0000)
        let pattern = args.count > 1 ? args[1] : 0x5056_4D21_C0FF_EE00
        cpu.write64(gpa, pattern)
        let back = cpu.read64(gpa)
        cpu.guestAssert(back == pattern, "read back \(back) after storing \(pattern)")
        cpu.sync(gpa.raw, back)
        let floating = cpu.read64(unmappedProbeGPA)
        cpu.sync(unmappedProbeGPA.raw, floating)
        cpu.done()
    }

    /// Every sensitive instruction the guest CPU has, once, with its result in a sync:
    /// an MSR L1 intercepts and one it passes through (nvmx), the serial console (L1's device),
    /// a port nobody claims, HLT, and a VMCALL L1 does not implement.
    public static let instructionTour = GuestProgram(name: "instruction-tour", summary: "rdmsr/wrmsr/in/out/hlt/vmcall once each") { cpu, _ in
        let tscAdjust: UInt32 = 0x3B, kernelGSBase: UInt32 = 0xC000_0102
        cpu.wrmsr(tscAdjust, 0x1234_5678_9ABC)
        cpu.sync(UInt64(tscAdjust), cpu.rdmsr(tscAdjust))
        cpu.wrmsr(kernelGSBase, 0xFFFF_8880_0000_1000)
        cpu.sync(UInt64(kernelGSBase), cpu.rdmsr(kernelGSBase))
        for byte in "hello from L2\n".utf8 { cpu.outPort(0x3F8, UInt64(byte), size: 1) }
        cpu.sync(0x3FD, cpu.inPort(0x3FD, size: 1))          // serial LSR: transmitter empty
        cpu.sync(0x80, cpu.inPort(0x80, size: 4))            // nobody's port: all ones
        cpu.hlt()
        cpu.sync(0xF4, cpu.vmcall(0x1234))                   // unknown hypercall
        cpu.done()
    }

    /// Writes a page L1 mapped read-only and fetches from one it mapped non-executable: each is
    /// a permission fault delivered to L1, which grants the access and lets L2 retry.
    public static let permissionProbe = GuestProgram(name: "permission-probe", summary: "write a read-only page, execute a no-execute page") { cpu, _ in
        let ro = L2GPA(0x30_0000), nx = L2GPA(0x31_0000)
        cpu.write64(ro, 0xFEED)
        cpu.sync(ro.raw, cpu.read64(ro))
        cpu.write8(nx, 0xC3)
        cpu.sync(nx.raw, UInt64(cpu.fetch(nx)))
        cpu.done()
    }

    /// The MSR policies of the PV L1: TSC_ADJUST (L0 emulates), MISC_ENABLE (L1 keeps), and an
    /// MSR no CPU has (#GP). One sync each: msr, value, fault vector or 0xFF.
    public static let msrPolicyProbe = GuestProgram(name: "msr-policy-probe", summary: "an L0-emulated, an L1-handled and a #GP MSR") { cpu, _ in
        for msr: UInt32 in [0x3B, 0x1A0, 0x4B56_4DFF] {
            let w = cpu.wrmsrSafe(msr, 0xABCD)
            let (v, r) = cpu.rdmsrSafe(msr)
            cpu.sync(UInt64(msr), v, UInt64(w ?? 0xFF), UInt64(r ?? 0xFF))
        }
        cpu.done()
    }

    /// Isolation: write a pattern to a page, give the page back to L1 (L2 hypercall), read it
    /// again. args: [gpa, pattern]. syncs: before (gpa, value), hypercall result, after (gpa, value).
    public static let balloonProbe = GuestProgram(name: "balloon-probe", summary: "read a page after L1 took it away", arguments: [
        .init("gpa", "the page to give back to L1", default: "0x400000", accepts: .l2Address(alignment: pageSize, below: l2AddressLimit)),
        .init("pattern", "the value written before", default: "0x5ec2e7da7a000001", accepts: .any),
    ]) { cpu, args in
        let gpa = L2GPA(args.count > 0 ? args[0] : 0x40_0000)
        let pattern = args.count > 1 ? args[1] : 0x5EC2_E7DA_7A00_0001
        cpu.write64(gpa, pattern)
        cpu.sync(gpa.raw, cpu.read64(gpa))
        cpu.sync(cpu.vmcall(0x4C32_0001, gpa.raw))
        cpu.sync(gpa.raw, cpu.read64(gpa))
        cpu.done()
    }

    /// Every vCPU says who it is, meets the others, leaves a mark in memory they share, meets
    /// them again and sums every vCPU's mark: a vCPU that ran on another's lane, ucall block or
    /// memory shows in the syncs (KVM selftests' multi-vCPU guests check each other the same way).
    public static let vcpuProbe = GuestProgram(name: "vcpu-probe", summary: "each vCPU: its index, a rendezvous, the sum of every vCPU's mark") { cpu, _ in
        let marks = L2GPA(0x4000)
        cpu.sync(0x5C, UInt64(cpu.vcpuIndex), UInt64(cpu.vcpuCount))
        cpu.write64(marks + UInt64(cpu.vcpuIndex) * 8, 0x100 + UInt64(cpu.vcpuIndex))
        cpu.rendezvous()
        var sum: UInt64 = 0
        for i in 0..<cpu.vcpuCount { sum &+= cpu.read64(marks + UInt64(i) * 8) }
        cpu.sync(0x5D, sum)
    }

    /// CPUID until the stack is stopped or a tier is killed (for lifecycle tests).
    public static let cpuidForever = GuestProgram(name: "cpuid-forever", summary: "CPUID in an endless loop") { cpu, _ in
        cpu.sync(1)
        while true { _ = cpu.cpuid(0, 0) }
    }

    /// IN from L1's device model until the stack is stopped: every exit reaches L1 on every
    /// nested path (pv too, where L0 answers CPUID itself), so all three tiers keep taking turns.
    public static let l1IOForever = GuestProgram(name: "l1-io-forever", summary: "IN from port 0x1234 (L1's device model) in an endless loop") { cpu, _ in
        cpu.sync(1)
        while true { _ = cpu.inPort(0x1234, size: 4) }
    }

    /// What `l2-escape` tries (its one argument). The first three must end L2; the others must
    /// be answered by the kernel with the value the tests expect, and L2 goes on.
    public enum Escape: UInt64, CaseIterable, Sendable {
        /// Make the EPT02 mapping writable (mprotect: EACCES), then store into it: SIGSEGV.
        case writeEPT02 = 1
        /// Signal L0 (kill(L0, 0)): the seccomp filter kills L2 (SIGSYS).
        case signalL0 = 2
        /// Open a file (/proc/self/mem): the filter kills L2 (SIGSYS).
        case openFile = 3
        /// Grow the host-memory mapping past L1's memslot (mremap): ENOSYS from the filter.
        case growHostMemory = 4
        /// Punch a hole in L0's tables (madvise MADV_REMOVE on the read-only mapping): EACCES.
        case punchTables = 5
        /// Close every descriptor above 2: none was open (0 closed).
        case closeDescriptors = 6
        /// Signal itself (kill(self, 0), as raise and abort do): allowed, 0.
        case signalItself = 7

        /// Whether the attempt must end L2 (else the kernel answers and L2 goes on).
        public var ends: Bool { rawValue <= 3 }
    }

    /// A hostile L2 (for the tests of L0's defences): args [what] (`Escape`). It syncs (what, 0
    /// or mprotect's errno) before an attempt that must end it, and syncs (what, escaped) if it
    /// survives one; for the others it syncs (what, the kernel's answer). Then it says done.
    public static let l2Escape = GuestProgram(name: "l2-escape", summary: "a hostile L2 tries its sandbox (docs/reliability.md)", arguments: [
        .init("what", "1 write EPT02, 2 signal L0, 3 open a file, 4 grow its memory mapping, 5 punch L0's tables, 6 close descriptors, 7 signal itself",
              default: "1", accepts: .range(1...7)),
    ]) { cpu, args in
        let what = Escape(rawValue: args.first ?? 1) ?? .writeEPT02
        switch what {
        case .writeEPT02:
            let refused = cpu.ept02.probeMakeWritable()
            cpu.sync(what.rawValue, UInt64(refused))
            // Point L2's page 1 (its ucall block: mapped, in use) at host offset 0, outside L1's memory.
            cpu.ept02.probeOverwrite(frame: 1, with: EPT02Entry.make(host: HostOffset(0), permissions: EPT.rwxMask,
                                                                     generation: cpu.ept02.generation.value))
        case .signalL0:
            cpu.sync(what.rawValue, 0)
            _ = SandboxProbe.signal(SandboxProbe.parent)
        case .openFile:
            cpu.sync(what.rawValue, 0)
            _ = SandboxProbe.open("/proc/self/mem")
        case .growHostMemory:
            cpu.sync(what.rawValue, UInt64(cpu.memory.region.probeGrow()))
        case .punchTables:
            cpu.sync(what.rawValue, UInt64(cpu.tables.probePunch()))
        case .closeDescriptors:
            cpu.sync(what.rawValue, UInt64(SandboxProbe.closeDescriptors()))
        case .signalItself:
            cpu.sync(what.rawValue, UInt64(SandboxProbe.signal(SandboxProbe.me)))
        }
        if what.ends { cpu.sync(what.rawValue, escaped) }
        cpu.done()
    }
    /// What `l2-escape` syncs when an attempt that must end it got through.
    public static let escaped: UInt64 = 0xE5CA9ED
}
