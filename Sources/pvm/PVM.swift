import ABI
import ArgumentParser
import Bench
import L0
import L1PV
import L2Guest
import Foundation
import Transport
#if canImport(Glibc)
import Glibc
#endif

@main
struct PVM: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pvm",
        abstract: "A paravirtual nested hypervisor prototype: L0, L1 and L2 as three processes.",
        discussion: "Measures what an L2 instruction costs under the PV ABI and under emulated nested VMX.",
        subcommands: [Bench.self, Launch.self, Model.self, Stat.self, Trace.self, Calibrate.self, Chaos.self, Soak.self, Fuzz.self, Programs.self, Tier.self,
                      KVMLifecycle.self, Ring.self],
        defaultSubcommand: Bench.self)
}

/// The `pvm` executable itself: L0 starts L1 and L2 by running it again as `pvm __tier SPEC`.
func selfExecutable() -> String {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buf, buf.count - 1)
    return n > 0 ? String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
}

/// Writes an output file the user asked for (its folder was checked before the run), or fails
/// with one line naming it.
func writeOutput(_ data: Data, to path: String) throws {
    guard FileManager.default.createFile(atPath: path, contents: data) else {
        throw Failure("cannot write \(path): \(String(cString: strerror(errno)))")
    }
}

extension PVM {
    struct Bench: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run benchmark tests on each path and print ns/op and transitions per tier.",
            discussion: "Tests: " + BenchOperations.all.map(\.name).joined(separator: ", "))

        @Option(name: .long, help: "exits (the per-instruction tests), memslot (zap policies), host (virtualization enabling, one-time setup) or transport (each path's cost per hop against a raw two-process ring, and a process switch on the guest core, measured in the same run).")
        var suite: BenchSuite = .exits
        @Option(name: .long, help: "Comma-separated tests to run (default: all).")
        var test: String?
        @Option(name: .long, help: "Comma-separated paths: single, pv, nvmx, nvmx-noshadow, nvmx-evmcs, pvm-rfc (default: all of them).")
        var path: String?
        @Option(name: .long, help: "Iterations per test and path, 1-1000000000: a fixed count with --min-time-ms 0, else the ceiling for doubling (default: 1000000).")
        var iterations: UInt64?
        @Option(name: .long, help: "Double the iteration count until one run lasts this long (vmexit.c's way), 0-600000; 0 = use --iterations as is (default: 100).")
        var minTimeMs: UInt64?
        @Option(name: .long, help: "table, or vmexit (NAME VALUE lines, as vmexit.flat prints).")
        var format: OutputFormat = .table
        @Option(name: .long, help: "Also write the results as CSV to this file.")
        var csv: String?
        @Option(name: .long, help: "Also draw the results as an SVG chart to this file: per test a bar per path (log scale), then where the cycles go (linear).")
        var svg: String?
        @Option(name: .long, help: "Unmeasured iterations first, 0-1000000000 (default: 1000 when doubling, else a tenth of --iterations).")
        var warmup: UInt64?
        @Option(name: .long, parsing: .unconditional, help: "PV features L1 enables: 'all' (default), 'none', a list ('direct-cpuid,batch-map') or removals ('-direct-cpuid,-direct-msr'). Known: \(PVFeatures.names.map(\.0).joined(separator: ", ")).")
        var pvFeatures: String?
        @Option(name: .long, help: "How L1 maps L2 memory (default: eager, and every mode for the tests whose cost depends on it).")
        var l2Map: L2MapMode?
        @Flag(name: .long, help: "On pv, one row per feature set: all, each feature off, none.")
        var ablation = false
        @Option(name: .long, help: "vCPUs per stack, or a comma-separated list of counts to scale over (each 1-\(StackConfig.vcpuLimit)): every vCPU runs the test at once; with more than one, a scaling table per test and path (per-vCPU and total rate, ns per hop beside the raw ring's) (default: 1).")
        var vcpus: String?
        @Option(name: .long, help: "Also write the results as JSON to this file.")
        var json: String?
        @Option(name: .long, help: "Cost profile for the modelled-cycles column (default: the shipped published-figures profile).")
        var profile: String?
        @Option(name: .long, help: "Watchdog: seconds a tier may hold the vCPU before the stack is stopped, in (0, 3600] (default: 5).")
        var tierTimeout: Double?
        @Flag(name: .long, help: "No progress line on stderr.")
        var quiet = false
        @Option(name: .long, help: "The KVM device the host and memslot suites measure.")
        var device: String = "/dev/kvm"
        /// Tests: the memslot suite's sizes divided by this (1-1024), so it runs in seconds.
        @Option(name: .customLong("memslot-divisor"), help: .hidden)
        var memslotDivisor: Int = 1

        static let defaultIterations: UInt64 = 1_000_000, defaultMinTimeMs: UInt64 = 100

        func validate() throws {
            if let tierTimeout { guard tierTimeout > 0, tierTimeout <= 3600 else { throw ValidationError("--tier-timeout must be in (0, 3600] seconds") } }
            if let iterations { try Checks.range(iterations, 1...1_000_000_000, "--iterations") }
            if let minTimeMs { try Checks.range(minTimeMs, 0...600_000, "--min-time-ms") }
            if let warmup { try Checks.range(warmup, 0...1_000_000_000, "--warmup") }
            if let path { _ = try Checks.paths(path) }
            if let test { _ = try Checks.tests(test) }
            if let vcpus {
                let counts = try Checks.vcpuCounts(vcpus)
                if counts != [1] { try validateScaling(counts) }
            }
            if let pvFeatures { _ = try PVM.parseFeatures(pvFeatures) }
            _ = try Checks.profile(profile)
            for (option, file) in [("--csv", csv), ("--svg", svg), ("--json", json)] {
                if let file { try Checks.writable(file, option: option) }
            }
            try Checks.range(memslotDivisor, 1...1024, "--memslot-divisor")
            if memslotDivisor != 1 && suite != .memslot { throw ValidationError("--memslot-divisor is for --suite memslot") }
            if device != "/dev/kvm" && suite == .exits {
                throw ValidationError("--device is for --suite host and --suite memslot (the real KVM they measure)")
            }
            if device != "/dev/kvm" && suite == .transport {
                throw ValidationError("--device is for --suite host and --suite memslot (the real KVM they measure)")
            }
            if suite != .exits {
                // The memslot and host suites print their own table and write it with --json and
                // --csv; the options that shape the exit tests' runs and chart do not apply.
                let given = [("--test", test != nil), ("--path", path != nil && suite != .transport), ("--iterations", iterations != nil),
                             ("--warmup", warmup != nil), ("--min-time-ms", minTimeMs != nil), ("--pv-features", pvFeatures != nil),
                             ("--l2-map", l2Map != nil), ("--ablation", ablation), ("--tier-timeout", tierTimeout != nil),
                             ("--svg", svg != nil), ("--profile", profile != nil && suite == .memslot),
                             ("--format", format != .table)].filter(\.1).map(\.0)
                guard given.isEmpty else {
                    throw ValidationError("--suite \(suite.rawValue) prints its own table (and writes it with --json and --csv); "
                        + "it takes none of \(given.joined(separator: ", "))")
                }
            }
        }

        /// The runner the exit tests use, from --iterations, --min-time-ms, --warmup, --tier-timeout.
        func makeRunner() -> BenchRunner {
            let iterations = self.iterations ?? Self.defaultIterations, minTimeMs = self.minTimeMs ?? Self.defaultMinTimeMs
            let tierTimeout = self.tierTimeout ?? Double(StackConfig.defaultTierTimeoutNanos) / 1e9
            var runner = BenchRunner(tierExecutable: selfExecutable(), iterations: iterations,
                                     warmup: warmup ?? (minTimeMs > 0 ? 1_000 : iterations / 10))
            runner.minNanos = minTimeMs > 0 ? minTimeMs * 1_000_000 : nil
            runner.tierTimeoutNanos = UInt64(tierTimeout * 1e9)
            return runner
        }

        /// The scaling table: each test on each path with each vCPU count, the raw ring around them.
        func runScaling(_ counts: [Int]) throws {
            let paths = try Checks.paths(path ?? "")
            let tests = try Checks.tests(test ?? "")
            StopSignals.install()
            var progress = Progress(total: tests.count * paths.count * counts.count + 2, quiet: quiet)
            defer { progress.finish() }
            let result = try ScalingSuite.run(runner: makeRunner(), tests: tests, paths: paths, vcpuCounts: counts) { progress.step($0) }
            progress.finish()
            print(ScalingSuite.table(result), terminator: "")
            if let json { try writeOutput(Data(try ScalingSuite.json(result).utf8), to: json) }
            if let csv { try writeOutput(Data(ScalingSuite.csv(result).utf8), to: csv) }
        }

        /// `--vcpus` past one: the exit tests' scaling table, which takes only what shapes it.
        func validateScaling(_ counts: [Int]) throws {
            guard suite == .exits else { throw ValidationError("--vcpus is for the exit tests (--suite exits)") }
            try Checks.vcpus(counts.max() ?? 1, paths: try path.map { try Checks.paths($0) } ?? [])
            if path == nil { throw ValidationError("--vcpus \(vcpus ?? ""): name the paths (--path pv,nvmx)") }
            let tests = try test.map(Checks.tests) ?? []
            if tests.isEmpty { throw ValidationError("--vcpus \(vcpus ?? ""): name the tests (--test cpuid)") }
            for t in tests where BenchOperations.named(t)?.runsOnSeveralVCPUs == false {
                throw ValidationError("--vcpus \(vcpus ?? ""): \(t) runs on one vCPU (it needs fresh pages or L2's page tables of its own)")
            }
            let given = [("--format", format != .table), ("--svg", svg != nil), ("--ablation", ablation), ("--l2-map", l2Map != nil),
                         ("--pv-features", pvFeatures != nil), ("--profile", profile != nil)].filter(\.1).map(\.0)
            guard given.isEmpty else {
                throw ValidationError("--vcpus with more than one vCPU prints the scaling table (and writes it with --json and --csv); it takes none of \(given.joined(separator: ", "))")
            }
        }

        func run() throws {
            #if DEBUG
            printError("warning: this is a debug build; time it with `swift run -c release pvm bench`")
            #endif
            switch suite {
            case .exits:
                let counts = try vcpus.map(Checks.vcpuCounts) ?? [1]
                if counts != [1] { return try runScaling(counts) }
            case .transport:
                let paths = try path.map { try Checks.paths($0) } ?? [.single, .pv, .nvmx, .pvmRFC]
                var progress = Progress(total: paths.count + 2, quiet: quiet)
                defer { progress.finish() }
                let result = try TransportSuite.run(tierExecutable: selfExecutable(), paths: paths) { progress.step($0) }
                progress.finish()
                print(TransportSuite.table(result), terminator: "")
                if let json { try writeOutput(Data(try TransportSuite.json(result).utf8), to: json) }
                if let csv { try writeOutput(Data(TransportSuite.csv(result).utf8), to: csv) }
                return
            case .memslot:
                // In-process: L0's zap work on real memfds; then the same patterns on the real kernel.
                let realScenarios = RealMemslotSuite.scenarios().count
                var progress = Progress(total: MemslotZapPolicy.allCases.count + realScenarios, quiet: quiet)
                defer { progress.finish() }
                let rows = try MemslotSuite.run(scale: UInt64(memslotDivisor)) { progress.step("memslot suite: emulated L0, \($0.rawValue) zap, both scenarios") }
                var real: [RealMemslotProbe.Result] = []
                var realText: String
                do {
                    let report = try RealMemslotSuite.run(device: device, divisor: memslotDivisor) { progress.step("memslot suite: the real kernel, \($0)") }
                    real = report.results
                    realText = RealMemslotSuite.table(report)
                } catch let e as RealHostSuite.Unavailable {
                    realText = "\(e)\n"   // no /dev/kvm: one line; the emulated figures stand
                } catch {
                    realText = "real KVM measurement failed: \(error)\n"   // one line; the emulated figures stand
                }
                progress.finish()
                print("Emulated L0:")
                print(MemslotSuite.table(rows))
                print(realText, terminator: "")
                if let json { try writeOutput(Data(try SuiteFiles.json(rows, real: real).utf8), to: json) }
                if let csv { try writeOutput(Data(SuiteFiles.csv(rows, real: real).utf8), to: csv) }
                return
            case .host:
                // The real host through /dev/kvm (fresh processes), then fresh emulated L0 hosts,
                // each configuration `iterations` times.
                let iterations = 7, processes = 7, cpuCount = L0Host.machineCPUCount
                let costs = try Checks.profile(profile)   // the prices of the modelled figures
                var progress = Progress(total: processes + HostSuite.configurationCount, quiet: quiet)
                defer { progress.finish() }
                var figures: [HostFigure] = []
                var facts: KVMHostFacts?
                do {
                    let real = try RealHostSuite.run(tierExecutable: selfExecutable(), device: device, processes: processes) { i in
                        progress.step("host suite: the real KVM, fresh process \(i + 1) of \(processes)")
                    }
                    progress.finish()
                    print(RealHostSuite.table(real))
                    figures += real.figures
                    facts = real.facts
                } catch {
                    // No /dev/kvm, no permission, or a probe that failed: one line, and the
                    // emulated host still runs.
                    progress.finish()
                    print("\(error is RealHostSuite.Unavailable ? "\(error)" : "real KVM measurement failed: \(error)")\n")
                    while progress.done < processes { progress.step("host suite: (no real KVM figures)") }
                }
                let rows = try HostSuite.measure(iterations: iterations, cpuCount: cpuCount) { atLoad, setup in
                    progress.step("host suite: emulated L0, enable_virt_at_load=\(atLoad ? "Y" : "N"), one-time setup \(setup.rawValue)")
                }
                progress.finish()
                print("Emulated L0 host:")
                print(HostSuite.table(rows, profile: costs, cpuCount: cpuCount, iterations: iterations), terminator: "")
                figures += HostSuite.figures(rows, profile: costs, iterations: iterations)
                if let json { try writeOutput(Data(try SuiteFiles.json(figures, host: facts).utf8), to: json) }
                if let csv { try writeOutput(Data(SuiteFiles.csv(figures).utf8), to: csv) }
                return
            }
            let paths = try path.map { try Checks.paths($0) } ?? NestingPath.allCases
            let tests = try test.map(Checks.tests) ?? BenchOperations.all.map(\.name)
            let features = try PVM.parseFeatures(pvFeatures ?? "all")
            let runner = makeRunner()
            let mode = l2Map
            let costs = try Checks.profile(profile)
            var results: [BenchResult] = []
            var plan: [(String, BenchVariant)] = []
            for t in tests {
                var variants = BenchRunner.defaultVariants(for: t, paths: paths)
                if let mode { variants = variants.map { BenchVariant(path: $0.path, l2MapMode: mode) } }
                variants = variants.map { v in var v = v; if v.path == .pv { v.pvFeatures = features }; return v }
                if ablation && paths.contains(.pv) {
                    variants = BenchVariant.ablation(mapMode: mode ?? .eager) + variants.filter { $0.path != .pv }
                }
                var seen: [BenchVariant] = []
                for v in variants where !seen.contains(v) {
                    seen.append(v)
                    plan.append((t, v))
                }
            }
            // ^C or SIGTERM: the stack running stops in order, and what finished is reported.
            StopSignals.install()
            var interrupted: Int32?
            var progress = Progress(total: plan.count, quiet: quiet)
            defer { progress.finish() }
            for (t, v) in plan {
                if let s = StopSignals.received { interrupted = s; break }
                progress.step("\(t) on \(v.label)")
                do {
                    results.append(try runner.run(t, on: v))
                } catch {
                    // Any failure once a stop was asked for is that stop (a tier dying of the same ^C).
                    guard let s = StopSignals.received else { throw error }
                    interrupted = s
                    break
                }
            }
            progress.finish()
            if let s = interrupted {
                printError("pvm bench: \(StopReason.interrupted(signal: s)) after \(results.count) of \(plan.count) runs; reporting those")
                if results.isEmpty { throw ExitCode(128 + s) }
            }
            if format == .vmexit {
                print(Report.vmexitFormat(results), terminator: "")
            } else {
                print(Report.table(results, profile: costs), terminator: "")
                let ratios = Report.ratios(results, profile: costs)
                if !ratios.isEmpty { print("\n" + ratios, terminator: "") }
            }
            if let csv { try writeOutput(Data(Report.csv(results, profile: costs).utf8), to: csv) }
            if let svg { try writeOutput(Data(SVGChart.render(results, profile: costs).utf8), to: svg) }
            if let json { try writeOutput(Data(try Report.json(results, profile: costs).utf8), to: json) }
            if let s = interrupted { throw ExitCode(128 + s) }
        }
    }

    /// 'all', 'none', 'a,b' (exactly these) or '-a,-b' (all but these); no empty piece, no repeat.
    static func parseFeatures(_ s: String) throws -> PVFeatures {
        if s == "all" { return .all }
        if s == "none" { return [] }
        let known = PVFeatures.names.map(\.0).joined(separator: ", ")
        let parts = s.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard !s.isEmpty, !parts.contains(where: { $0.isEmpty || $0 == "-" }) else {
            throw ValidationError("--pv-features needs 'all', 'none', a comma-separated list of features or of removals (known: \(known))")
        }
        let removing = parts.allSatisfy { $0.hasPrefix("-") }
        guard removing || parts.allSatisfy({ !$0.hasPrefix("-") }) else {
            throw ValidationError("--pv-features: either list features or list removals ('-name'), not both")
        }
        var set: PVFeatures = removing ? .all : []
        var seen: Set<String> = []
        for p in parts {
            let name = removing ? String(p.dropFirst()) : p
            guard let f = PVFeatures.names.first(where: { $0.0 == name })?.1 else {
                throw ValidationError("unknown PV feature '\(name)' (known: \(known))")
            }
            guard seen.insert(name).inserted else { throw ValidationError("--pv-features names '\(name)' twice") }
            if removing { set.remove(f) } else { set.insert(f) }
        }
        return set
    }

    struct Launch: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Start the three-tier stack, run one guest program in L2, and print what happened.")

        @Option(name: .long, help: "The path to run on.")
        var path: NestingPath = .pv
        @Option(name: .long, help: "Guest program: \(GuestPrograms.all.map(\.name).joined(separator: ", ")) (see `pvm programs`).")
        var program: String = "cpuid-values"
        @Option(name: .long, parsing: .upToNextOption, help: "Arguments for the guest program, decimal or 0x-hex, space- or comma-separated (see `pvm programs`).")
        var args: [ProgramArgument] = []
        @Option(name: .customLong("host-memory-mib"), help: "Host memory in MiB (a sparse memfd), 768-65536: L1's 512 MiB memslot sits at 256 MiB.")
        var hostMemoryMiB: UInt64 = 1024
        @Option(name: .long, parsing: .unconditional, help: "PV features L1 enables (as for `pvm bench`).")
        var pvFeatures: String = "all"
        @Option(name: .long, help: "How L1 maps L2 memory.")
        var l2Map: L2MapMode = .eager
        @Option(name: .long, help: "L1's VM type.")
        var vmType = VMTypeArgument(.default)
        @Option(name: .long, help: "One-time setup (TDX-module-like).")
        var oneTimeSetup: OneTimeSetupPolicy = .off
        @Flag(name: .long, inversion: .prefixedNo, help: "Enable virtualization on every CPU when L0 loads (KVM's default) rather than at the first VM.")
        var enableVirtAtLoad = true
        @Option(name: .long, help: "Watchdog: seconds a tier may hold the vCPU before the stack is stopped, in (0, 3600].")
        var tierTimeout: Double = Double(StackConfig.defaultTierTimeoutNanos) / 1e9
        @Option(name: .long, help: "vCPUs in L1 and in L2, 1 to \(StackConfig.vcpuLimit); every vCPU runs the program with its own index.")
        var vcpus: Int = 1
        /// Tests of L0's defences: `l1=PATH` or `l2=PATH` runs PATH as that tier instead of pvm
        /// (a hostile stand-in speaking the tier protocol). Hidden: not for measuring anything.
        @Option(name: .customLong("stand-in"), parsing: .singleValue, help: .hidden)
        var standIn: [String] = []

        func validate() throws {
            guard tierTimeout > 0, tierTimeout <= 3600 else { throw ValidationError("--tier-timeout must be in (0, 3600] seconds") }
            try Checks.range(hostMemoryMiB, 768...65_536, "--host-memory-mib")
            try Checks.vcpus(vcpus, path: path)
            guard let guest = GuestPrograms.named(program) else {
                throw ValidationError("unknown guest program '\(program)' (known: \(GuestPrograms.all.map(\.name).joined(separator: ", ")); `pvm programs` says what each does)")
            }
            if let problem = guest.problem(with: args.flatMap(\.values)) { throw ValidationError("--args: \(problem)") }
            if vcpus < guest.minimumVCPUs {
                throw ValidationError("--vcpus \(vcpus): \(program) needs \(guest.minimumVCPUs) vCPUs (vCPU 0 measures, the others take its IPIs)")
            }
            if vcpus > 1 && !guest.severalVCPUs {
                throw ValidationError("--vcpus \(vcpus): \(program) runs on one vCPU (it builds L2's page tables or needs pages of its own)")
            }
            _ = try PVM.parseFeatures(pvFeatures)
            _ = try standIns()
        }

        /// `--stand-in` parsed: a tier (l1 or l2) and an executable file, each tier at most once.
        func standIns() throws -> [ABI.Tier: String] {
            var result: [ABI.Tier: String] = [:]
            for s in standIn {
                let parts = s.split(separator: "=", maxSplits: 1).map(String.init)
                guard parts.count == 2, let tier = ["l1": ABI.Tier.l1, "l2": ABI.Tier.l2][parts[0]], result[tier] == nil else {
                    throw ValidationError("--stand-in takes l1=PATH or l2=PATH, each tier once (got '\(s)')")
                }
                guard access(parts[1], X_OK) == 0 else { throw ValidationError("--stand-in \(parts[0]): '\(parts[1])' is not an executable file") }
                result[tier] = parts[1]
            }
            return result
        }

        func run() throws {
            var config = StackConfig(path: path, program: program, programArguments: args.flatMap(\.values), tierExecutable: selfExecutable())
            config.hostMemoryBytes = hostMemoryMiB << 20
            config.pvFeatures = try PVM.parseFeatures(pvFeatures)
            config.l2MapMode = l2Map
            config.vmType = vmType.type
            config.oneTimeSetup = oneTimeSetup
            config.enableVirtAtLoad = enableVirtAtLoad
            config.tierTimeoutNanos = UInt64(tierTimeout * 1e9)
            config.standIns = try standIns()
            config.vcpuCount = vcpus
            StopSignals.install()
            let result = try L0Stack(config: config).run()
            let c = result.counters
            let h = result.harness
            if h.prints.dropped > 0 { print("[L2] (\(h.prints.dropped) earlier lines dropped; L0 keeps the last \(h.prints.capacity))") }
            for line in h.prints { print("[L2] \(line)") }
            if h.syncs.dropped > 0 { print("(\(h.syncs.dropped) earlier syncs dropped; L0 keeps the last \(h.syncs.capacity))") }
            for s in h.syncs { print("sync " + s.map { "0x" + String($0, radix: 16) }.joined(separator: " ")) }
            if c.hypercalls.others > 0 { print("hypercalls beyond the first \(c.hypercalls.capacity) numbers: \(c.hypercalls.others)") }
            if let refusal = result.pvRefusal { print("L0 refused L1's request: \(refusal)") }
            print("stopped: \(result.stop)")
            print("L1 \(result.l1Status.map { "\($0)" } ?? "not started"), L2 \(result.l2Status.map { "\($0)" } ?? "not started")")
            func byReason(_ counts: [UInt64]) -> String {
                let d = TransitionCounters.byReason(counts).sorted { $0.key < $1.key }
                return d.isEmpty ? "none" : d.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
            }
            print("L2->L0 exits: " + byReason(c.l2Exits))
            print("L1->L0 exits: " + byReason(c.l1Exits))
            print("delivered to L1: " + byReason(c.deliveries))
            print("entries: L1=\(c.l1Entries) L2=\(c.l2Entries)")
            if result.perVCPU.count > 1 {
                for (i, v) in result.perVCPU.enumerated() {
                    let e = v.counters
                    print("vCPU \(i): L2->L0 exits \(e.l2Exits.reduce(0, +)), L1->L0 exits \(e.l1Exits.reduce(0, +)), entries L1=\(e.l1Entries) L2=\(e.l2Entries)")
                }
            }
            if case .interrupted(let s) = result.stop { throw ExitCode(128 + s) }
            if !result.succeeded { throw ExitCode(1) }
        }
    }

    struct Model: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "The cost model: modelled cycles per operation from counted events and a profile's prices.",
            subcommands: [Explain.self])

        struct Explain: ParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Run TEST on a path and print its cost breakdown: event, count per op, unit price, subtotal.")
            @Argument(help: "A benchmark test (see `pvm bench --help`).")
            var test: String
            @Option(name: .long, help: "The path to run on.")
            var path: NestingPath = .nvmx
            @Option(name: .long, help: "How L1 maps L2 memory.")
            var l2Map: L2MapMode = .eager
            @Option(name: .long, help: "A cost profile file (default: the shipped published-figures profile).")
            var profile: String?
            @Option(name: .long, help: "Iterations to count over (1-100000000).")
            var iterations: UInt64 = 2_000

            func validate() throws {
                guard BenchOperations.named(test) != nil else { throw ValidationError("\(BenchError.unknownTest(test))") }
                try Checks.range(iterations, 1...100_000_000, "--iterations")
                _ = try Checks.profile(profile)
            }

            func run() throws {
                let costs = try Checks.profile(profile)
                let runner = BenchRunner(tierExecutable: selfExecutable(), iterations: iterations, warmup: iterations / 10)
                let result = try runner.run(test, on: BenchVariant(path: path, l2MapMode: l2Map))
                print(CostModel.explain(result, costs), terminator: "")
            }
        }
    }

    /// Options shared by `stat` and `trace`: one test on one path, recorded.
    struct RecordedRun: ParsableArguments {
        @Argument(help: "A benchmark test (default cpuid).")
        var test: String = "cpuid"
        @Option(name: .long, help: "The path to run on.")
        var path: NestingPath = .nvmx
        @Option(name: .long, help: "Iterations to record (1-1000000).")
        var iterations: UInt64 = 200

        func validate() throws {
            guard let op = BenchOperations.named(test) else { throw ValidationError("\(BenchError.unknownTest(test))") }
            try Checks.range(iterations, 1...(op.iterationLimit ?? 1_000_000), "--iterations")
        }

        /// The recorded run, and the signal that interrupted it (nil: it finished).
        func record() throws -> (log: TransitionLog, interrupted: Int32?) {
            let (log, interrupted, _) = try recordWithCounters()
            return (log, interrupted)
        }

        /// The same, with the run's final counters (what L1 and L2 reported at its last ucall).
        func recordWithCounters() throws -> (log: TransitionLog, interrupted: Int32?, counters: TransitionCounters) {
            var config = StackConfig(path: path, program: test, programArguments: [iterations, 0, 0], tierExecutable: selfExecutable())
            config.recordTransitions = true
            StopSignals.install()
            let result = try L0Stack(config: config).run()
            if case .interrupted(let s) = result.stop, let log = result.log {
                // ^C: the stack stopped in order; what was recorded until then is still worth a report.
                printError("pvm: \(result.stop) after \(log.spans.count) run spans; reporting those")
                return (log, s, result.counters)
            }
            guard result.succeeded, let log = result.log else { throw Failure("the run did not finish: \(result.stop)") }
            return (log, nil, result.counters)
        }

        /// The exit status for a run that was interrupted (128 + the signal), once reported.
        static func finish(_ interrupted: Int32?) throws {
            if let s = interrupted { throw ExitCode(128 + s) }
        }
    }

    struct Stat: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a test and report L0's exit handling per tier and reason, like `perf kvm stat report`.")
        @OptionGroup var recorded: RecordedRun
        func run() throws {
            let (log, interrupted, counters) = try recorded.recordWithCounters()
            print(ExitStats.report(ExitStats.rows(log)), terminator: "")
            if recorded.path.usesSwitcher {
                // L0 handles none of L2's exits on this path: say what L1's switcher took instead.
                let byReason = TransitionCounters.byReason(counters.switcherExits).sorted { $0.key < $1.key }
                    .map { "\($0.key.name)=\($0.value)" }.joined(separator: " ")
                print("\npvm-rfc: L2's exits go to L1 through the switcher, not to L0; L1 counted \(counters.totalSwitcherExits) (\(byReason.isEmpty ? "none" : byReason)) over the whole run")
            }
            try RecordedRun.finish(interrupted)
        }
    }

    struct Trace: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a test and write a Chrome/Perfetto trace: one track per tier, every run span and exit.")
        @OptionGroup var recorded: RecordedRun
        @Option(name: .long, help: "The trace file to write (open it in ui.perfetto.dev).")
        var out: String
        func validate() throws { try Checks.writable(out, option: "--out") }
        func run() throws {
            let (log, interrupted) = try recorded.record()
            try writeOutput(try ChromeTrace.json(log, title: "\(recorded.test) on \(recorded.path.rawValue)"), to: out)
            print("wrote \(log.spans.count) spans to \(out)")
            try RecordedRun.finish(interrupted)
        }
    }

    struct Calibrate: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Measure this host's one-level exit costs through /dev/kvm and write a cost profile from them.")
        @Option(name: .long, help: "Where to write the profile (use it with --profile).")
        var out: String = "calibrated-profile.json"
        @Option(name: .long, help: "The KVM device.")
        var device: String = "/dev/kvm"
        @Option(name: .long, help: "Exits per run (1-10000000).")
        var iterations: Int = 20_000
        @Option(name: .long, help: "Runs per kind of exit, the median is kept (1-101).")
        var runs: Int = 5
        @Flag(name: .long, help: "No progress line on stderr.")
        var quiet = false

        func validate() throws {
            try Checks.range(iterations, 1...10_000_000, "--iterations")
            try Checks.range(runs, 1...101, "--runs")
            try Checks.writable(out, option: "--out")
        }

        func run() throws {
            let result: CalibrationResult
            var progress = Progress(total: CalibrationExitKind.allCases.count, quiet: quiet)
            defer { progress.finish() }
            do {
                result = try Calibration.run(devicePath: device, iterations: iterations, runs: runs) { kind in
                    progress.step("calibrate: \(kind.rawValue) exits, \(runs) runs of \(iterations)")
                }
                progress.finish()
            } catch {
                // No /dev/kvm, no permission, no virtualization: one line, exit 1.
                throw Failure("pvm calibrate: \(error)")
            }
            print(result.summary)
            try writeOutput(try result.profile().encoded(), to: out)
            let full = URL(fileURLWithPath: out).standardizedFileURL.path
            print("wrote \(full): use it with `pvm bench --profile \(out)` or `pvm model explain TEST --profile \(out)`")
            if comparePVM { try comparePVMRFC(result) }
        }

        @Flag(name: .customLong("pvm-rfc"), inversion: .prefixedNo, help: "Also run pvm-rfc's stacks for cpuid, inl_from_qemu, syscall and page_fault and print their model, priced from this machine's one-level figures, next to the real PVM's figures (--no-pvm-rfc: skip it).")
        var comparePVM = true

        /// The pvm-rfc model of the tests the calibration guest can compare, from real stacks.
        func comparePVMRFC(_ result: CalibrationResult) throws {
            guard let profile = result.oneLevelProfile(base: try CostModel.defaultProfile()) else {
                print("pvm-rfc against the real PVM: not compared (no native CPUID figure in this run)")
                return
            }
            let runner = BenchRunner(tierExecutable: selfExecutable(), iterations: 2_000, warmup: 200)
            var rows: [(test: String, result: BenchResult)] = []
            for test in ["cpuid", "inl_from_qemu", "syscall", "page_fault"] {
                do { rows.append((test, try runner.run(test, on: BenchVariant(path: .pvmRFC)))) } catch {
                    throw Failure("pvm calibrate: the pvm-rfc stack for \(test) failed: \(error)")
                }
            }
            print("")
            print(CalibrationResult.comparison(rows, profile: profile, real: result.realPVMNanos(for:)).joined(separator: "\n"))
        }
    }

    struct Programs: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the guest programs L2 can run, with their arguments.")
        func run() {
            for p in GuestPrograms.all {
                print("\(p.name)\t\(p.summary)")
                for (i, a) in p.arguments.enumerated() { print("    --args \(i + 1). \(a.help)") }
            }
        }
    }

    /// Internal: one VM lifecycle through /dev/kvm in this fresh process, as one JSON line (the
    /// host suite runs it in several processes). Not for people.
    struct KVMLifecycle: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "__kvm-lifecycle", shouldDisplay: false)
        @Option(name: .long) var device: String = "/dev/kvm"

        func run() throws {
            let times: KVMLifecycleTimes
            do { times = try KVMLifecycleTimes.measure(device: device) } catch { throw Failure("\(device): \(error)") }
            print(String(decoding: try JSONEncoder().encode(times), as: UTF8.self))
        }
    }

    /// Internal: the echo end of `pvm bench --suite transport`'s raw ring (descriptor 3 is its
    /// lane). Not for people.
    struct Ring: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "__ring", shouldDisplay: false)
        @Option(name: .long) var cpu: Int?
        func run() throws { RawRing.echo(cpu: cpu) }
    }

    /// Internal: how L0 starts a child tier. Not for people.
    struct Tier: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "__tier", shouldDisplay: false)
        @Argument var spec: String

        func run() throws {
            let launch = try TierLaunch(decoding: spec)
            try launch.checkSameBuild()
            switch launch.tier {
            case .l1: L1Main.run(launch)
            case .l2: L2Main.run(launch)
            case .l0: throw Failure("L0 is not a child tier")
            }
        }
    }
}
