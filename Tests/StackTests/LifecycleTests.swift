import ABI
import Foundation
import L0
import Testing
import Transport

/// Processes you start, you stop: the stack's life and death through the real `pvm` binary.
/// Every test has a time limit and internal deadlines; child output goes to temp files read only
/// after L0 exited; leftover tiers are found by process (an environment token they inherit),
/// and descriptors by what they are (L0's memfds), not by pipe EOF or a global count.
extension StackTests {
@Suite(.serialized, .timeLimit(.minutes(1))) struct LifecycleTests {
    /// Starts `pvm launch` with a guest that never finishes and waits (20 s at most) for its two
    /// child tiers.
    func launchEndlessStack(path: String) throws -> (PVMProcess, l1: Int32, l2: Int32) {
        let p = try PVMProcess(["launch", "--path", path, "--program", "cpuid-forever"])
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline && p.isRunning {
            let kids = children(of: p.pid)
            if let l1 = kids.first(where: { $0.name == "pvm-l1" }), let l2 = kids.first(where: { $0.name == "pvm-l2" }) {
                return (p, l1.pid, l2.pid)
            }
            usleep(20_000)
        }
        let why = p.isRunning ? "no pvm-l1 and pvm-l2 children within 20 s" : "pvm launch exited early"
        p.cleanup()
        throw LaunchFailed(why: why)
    }
    struct LaunchFailed: Error { var why: String }

    @Test(arguments: [(Tier.l1, "nvmx"), (Tier.l2, "nvmx"), (Tier.l1, "pv"), (Tier.l2, "pv")])
    func killingATierMidRunEndsTheWholeStackWithAMessageNamingIt(victim: Tier, path: String) throws {
        let (p, l1, l2) = try launchEndlessStack(path: path)
        defer { p.cleanup() }
        // Three processes while it runs: L0 (the launcher itself) and its two children.
        #expect(processExists(p.pid) && processExists(l1) && processExists(l2))
        #expect((try? String(contentsOfFile: "/proc/\(p.pid)/comm", encoding: .utf8))?.hasPrefix("pvm-l0") == true)
        #expect(Set(processes(withToken: p.token).map(\.pid)).isSuperset(of: [p.pid, l1, l2]), "the token marks the whole stack")
        kill(victim == .l1 ? l1 : l2, SIGKILL)
        let status = p.finish(seconds: 20)
        #expect(status != nil && status != 0)
        let text = p.stderr + p.stdout
        #expect(text.contains("\(victim) (pvm-l\(victim.rawValue)) ended unexpectedly: killed by signal 9"), "\(text)")
        let left = survivingTiers(token: p.token)
        #expect(left.isEmpty, "tiers outlived L0: \(left)")
    }

    /// The watchdog: a tier that keeps the vCPU (here frozen with SIGSTOP, which waitpid does not
    /// report as an exit) ends the stack after `--tier-timeout`, with a message naming it, and
    /// the frozen tier does not outlive L0.
    @Test(arguments: [(Tier.l2, "nvmx"), (Tier.l1, "nvmx"), (Tier.l2, "pv")])
    func aTierThatHoldsTheVCPUPastTheWatchdogEndsTheStackWithAMessageNamingIt(victim: Tier, path: String) throws {
        let p = try PVMProcess(["launch", "--path", path, "--program", "cpuid-forever", "--tier-timeout", "1"])
        defer { p.cleanup() }
        let deadline = Date().addingTimeInterval(20)
        var target: Int32?
        while target == nil && Date() < deadline && p.isRunning {
            target = children(of: p.pid).first(where: { $0.name == "pvm-l\(victim.rawValue)" })?.pid
            if target == nil { usleep(20_000) }
        }
        let pid = try #require(target, "no pvm-l\(victim.rawValue) child within 20 s")
        // On nvmx every CPUID of L2 goes to L1, so a frozen L1 is given the vCPU and keeps it.
        kill(pid, SIGSTOP)
        let status = p.finish(seconds: 20)
        kill(pid, SIGCONT)
        #expect(status != nil && status != 0)
        let text = p.stderr + p.stdout
        #expect(text.contains("\(victim) (pvm-l\(victim.rawValue)) did not give the vCPU back within 1.0 s after L0 handled"), "\(text)")
        // What it was doing: the exit L0 handled before giving it the turn, by tier and name.
        #expect(text.contains(/after L0 handled L[12]'s [A-Z_]+ exit/), "\(text)")
        let left = survivingTiers(token: p.token)
        #expect(left.isEmpty, "tiers outlived L0: \(left)")
    }

    /// `pvm chaos`'s short form: random SIGKILL/SIGSTOP of a tier over a few trials, every one a
    /// clean end (status 1 naming the tier, no orphan, no leaked memfd), in its JSON report.
    @Test func chaosTrialsAllEndCleanly() throws {
        let p = try PVMProcess(["chaos", "--trials", "4", "--seed", "11", "--json"])
        defer { p.cleanup() }
        #expect(p.finish(seconds: 50) == 0, "\(p.stdout)\(p.stderr)")
        struct Report: Decodable { var trials: Int; var clean: Int; var orphans: Int; var leaked_memfds: Int
                                   var runs: [Run]; struct Run: Decodable { var signal: String; var tier: String } }
        let r = try JSONDecoder().decode(Report.self, from: Data(p.stdout.utf8))
        #expect(r.trials == 4 && r.clean == 4 && r.orphans == 0 && r.leaked_memfds == 0)
        // Seed 11 picks both signals, so both the reaper and the watchdog are exercised.
        #expect(Set(r.runs.map(\.signal)) == ["SIGKILL", "SIGSTOP"], "\(r.runs)")
        #expect(survivingTiers(token: p.token, seconds: 1).isEmpty)
    }

    /// `pvm soak`'s short form: three tiers sampled, an orderly stop at the end, no tier left.
    @Test func soakSamplesEveryTierAndStopsInOrder() throws {
        let p = try PVMProcess(["soak", "--seconds", "2", "--path", "pv", "--json"])
        defer { p.cleanup() }
        #expect(p.finish(seconds: 40) == 0, "\(p.stdout)\(p.stderr)")
        struct Report: Decodable { var counts: String; var tiers: [Tier]
                                   struct Tier: Decodable { var tier: String; var samples: Int; var max_kib: Int } }
        let r = try JSONDecoder().decode(Report.self, from: Data(p.stdout.utf8))
        #expect(Set(r.tiers.map(\.tier)) == ["pvm-l0", "pvm-l1", "pvm-l2"], "\(r.tiers)")
        #expect(r.tiers.allSatisfy { $0.samples >= 5 && $0.max_kib > 0 }, "\(r.tiers)")
        #expect(r.counts.hasPrefix("entries: L1="), "\(r.counts)")
        #expect(survivingTiers(token: p.token, seconds: 1).isEmpty)
    }

    @Test func killingL0TakesItsChildrenWithIt() throws {
        let (p, l1, l2) = try launchEndlessStack(path: "nvmx")
        defer { p.cleanup() }
        kill(p.pid, SIGKILL)
        #expect(p.finish(seconds: 20) != nil)
        // Orphans are reparented (to init or a subreaper) and their parent id says nothing: the
        // token they inherited does.
        let left = survivingTiers(token: p.token)
        #expect(left.isEmpty, "tiers outlived L0: \(left)")
        #expect(!processExists(l1) || processState(l1) == "Z")
        #expect(!processExists(l2) || processState(l2) == "Z")
    }

    /// SIGTERM (or ^C) to a launch: the stack stops in order, L0 prints what the guest did so far
    /// and exits 128 + the signal, as a shell reports a death by that signal.
    @Test(arguments: [SIGTERM, SIGINT])
    func aSignalledLaunchStopsInOrderAndReportsWhatRan(signal: Int32) throws {
        let (p, l1, l2) = try launchEndlessStack(path: "pv")
        defer { p.cleanup() }
        usleep(300_000)
        // As a terminal's ^C does: the whole group gets it; the children leave it to L0.
        for pid in [p.pid, l1, l2] { kill(pid, signal) }
        #expect(p.finish(seconds: 20) == 128 + signal)
        let name = signal == SIGINT ? "SIGINT" : "SIGTERM"
        #expect(p.stdout.contains("stopped: interrupted by \(name)"), "\(p.stdout)\(p.stderr)")
        #expect(p.stdout.contains("L1 exit status 0, L2 exit status 0"), "children stopped by L0, not by the signal: \(p.stdout)")
        #expect(p.stdout.contains("L2->L0 exits: CPUID="), "\(p.stdout)")
        let left = survivingTiers(token: p.token)
        #expect(left.isEmpty, "tiers outlived L0: \(left)")
    }

    /// ^C that reaches a child while it is still starting (before it could ignore the signal):
    /// it starts with SIGINT blocked, so it is still L0 that stops it, in order.
    @Test func aSignalDuringChildStartUpIsStillAnOrderlyStop() throws {
        let p = try PVMProcess(["launch", "--path", "nvmx", "--program", "cpuid-forever"])
        defer { p.cleanup() }
        var child: Int32?
        let deadline = Date().addingTimeInterval(20)
        while child == nil && Date() < deadline && p.isRunning {
            child = children(of: p.pid).first?.pid          // whatever it is called yet
            if child == nil { usleep(500) }
        }
        let c = try #require(child, "L0 started no child within 20 s")
        kill(c, SIGINT)
        kill(p.pid, SIGINT)
        #expect(p.finish(seconds: 20) == 128 + SIGINT, "\(p.stdout)\(p.stderr)")
        #expect(p.stdout.contains("stopped: interrupted by SIGINT"), "\(p.stdout)")
        #expect(!p.stdout.contains("killed by signal"), "a child died of the ^C: \(p.stdout)")
        #expect(survivingTiers(token: p.token).isEmpty)
    }

    /// ^C in the middle of a bench: the rows that finished are printed and written, the one running
    /// is stopped in order, and the exit status says SIGINT.
    @Test func anInterruptedBenchReportsAndWritesTheRowsThatFinished() throws {
        let json = FileManager.default.temporaryDirectory.appendingPathComponent("pvm-interrupted-\(UUID().uuidString).json")
        defer { try? FileManager.default.removeItem(at: json) }
        let p = try PVMProcess(["bench", "--test", "cpuid", "--path", "pv,nvmx", "--min-time-ms", "2000", "--json", json.path])
        defer { p.cleanup() }
        // The second stack's L1 is a new pvm-l1 child: by then the first row is done.
        var first: Int32?
        var second: [Int32] = []
        let deadline = Date().addingTimeInterval(60)
        while second.isEmpty && Date() < deadline && p.isRunning {
            let kids = children(of: p.pid)
            if let l1 = kids.first(where: { $0.name == "pvm-l1" })?.pid {
                if first == nil { first = l1 } else if l1 != first { second = [l1] + kids.filter { $0.name == "pvm-l2" }.map(\.pid) }
            }
            usleep(20_000)
        }
        try #require(!second.isEmpty, "no second stack within 60 s")
        for pid in [p.pid] + second { kill(pid, SIGINT) }
        #expect(p.finish(seconds: 30) == 128 + SIGINT, "\(p.stderr)")
        #expect(p.stderr.contains("pvm bench: interrupted by SIGINT after 1 of 2 runs; reporting those"), "\(p.stderr)")
        let rows = p.stdout.split(separator: "\n").filter { $0.hasPrefix("cpuid ") }
        #expect(rows.count == 1 && rows.first?.contains(" pv ") == true, "\(p.stdout)")
        let written = try String(contentsOf: json, encoding: .utf8)
        #expect(written.contains("\"pv\"") && !written.contains("\"nvmx\""), "\(written)")
        let left = survivingTiers(token: p.token)
        #expect(left.isEmpty, "tiers outlived L0: \(left)")
    }

    @Test func aLaunchThatFinishesExitsZeroAndLeavesNoTier() throws {
        let p = try PVMProcess(["launch", "--path", "nvmx", "--program", "cpuid-values"])
        defer { p.cleanup() }
        #expect(p.finish(seconds: 30) == 0, "\(p.stderr)")
        #expect(p.stdout.contains("stopped: guest done"), "\(p.stdout)")
        let left = survivingTiers(token: p.token, seconds: 5)
        #expect(left.isEmpty, "tiers outlived L0: \(left)")
    }

    /// The probes themselves: a memfd named like L0's shows up as a descriptor and a mapping, and
    /// goes away with its region. (So a leak check built on them can fail.)
    @Test func theMemfdProbesSeeL0sSharedMemory() throws {
        let fds = pvmMemfdDescriptors(), maps = pvmMemfdMappings()
        do {
            let region = try SharedRegion(create: "pvm-probe", size: 1 << 20)
            #expect(pvmMemfdDescriptors().count == fds.count + 1 && pvmMemfdDescriptors().contains { $0.contains("pvm-probe") })
            #expect(pvmMemfdMappings().count > maps.count)
            _ = region
        }
        #expect(pvmMemfdDescriptors() == fds)
        #expect(pvmMemfdMappings().count == maps.count)
    }

    @Test func aCompletedRunLeavesNoProcessesDescriptorsOrSharedMemory() throws {
        let fdsBefore = pvmMemfdDescriptors(), mapsBefore = pvmMemfdMappings()
        let tiersBefore = tierChildrenOfThisProcess()
        #expect(tiersBefore.isEmpty, "tiers of an earlier test still around: \(tiersBefore)")
        var pids: [Int32] = []
        var fdsDuring: [String] = []
        do {
            var config = StackConfig(path: .nvmx, program: "cpuid-values", tierExecutable: PVMBinary.path)
            config.timeoutNanos = 30_000_000_000
            let stack = try L0Stack(config: config)
            fdsDuring = pvmMemfdDescriptors()
            let result = try stack.run()
            #expect(result.succeeded)
            #expect(result.l1Status == .exited(0) && result.l2Status == .exited(0))
            pids = Array(result.tierPIDs.values)
        }
        // While the stack exists L0 holds its four shared control regions, host memory and L1's
        // memslot in it...
        #expect(fdsDuring.count == fdsBefore.count + 6, "\(fdsDuring)")
        #expect(pids.count == 2)
        // ...and after it: reaped (not even a zombie), no descriptor, no mapping left.
        #expect(pids.allSatisfy { !processExists($0) }, "\(pids.map { ($0, processState($0) ?? "-") })")
        #expect(tierChildrenOfThisProcess().isEmpty)
        #expect(pvmMemfdDescriptors() == fdsBefore)
        #expect(pvmMemfdMappings() == mapsBefore)
    }

    @Test func aTierThatCannotBeStartedGivesAClearError() throws {
        let stack = try L0Stack(config: StackConfig(path: .pv, program: "cpuid", tierExecutable: "/nonexistent/pvm"))
        do {
            _ = try stack.run()
            Issue.record("run should have thrown")
        } catch let e as StackError {
            #expect("\(e)".contains("cannot start L1 (pvm-l1)"), "\(e)")
            #expect("\(e)".contains("No such file or directory"), "\(e)")
        }
    }

    /// A tier executable whose build changed after it was resolved is refused by L0 before it
    /// starts a child, with both build IDs.
    @Test func aTierExecutableRebuiltSinceItWasResolvedIsRefused() throws {
        let real = try #require(BuildID.of(file: PVMBinary.path), "pvm has no GNU build ID")
        let config = StackConfig(path: .nvmx, program: "cpuid", tierExecutable: PVMBinary.path, tierBuild: "00c0ffee")
        do {
            _ = try L0Stack(config: config).run()
            Issue.record("run should have thrown")
        } catch StackError.otherBuild(let x, let expected, let found) {
            #expect(x == PVMBinary.path && expected == "00c0ffee" && found == real)
        }
    }

    /// A child started with a spec of another build (or launch ABI) refuses in one line, exit 1.
    @Test(arguments: ["build", "abi"])
    func aChildOfAnotherBuildRefusesToStart(differing: String) throws {
        var spec = TierLaunch(tier: .l1, parent: getpid(), path: .pv, vcpu: 0,
                              layout: ControlLayout(vcpuCount: 1, l2AddressLimit: 4 << 30),
                              l1Slot: MemorySlot(slot: 0, guestPhysAddr: L1GPA(0), memorySize: 512 << 20, hostOffset: HostOffset(256 << 20)),
                              cpu: nil)
        spec.build = try #require(BuildID.of(file: PVMBinary.path))
        if differing == "build" { spec.build = "00c0ffee" } else { spec.abi = LaunchABI.version + 7 }
        let p = try PVMProcess(["__tier", spec.encoded])
        defer { p.cleanup() }
        #expect(p.finish(seconds: 20) == 1)
        let lines = p.stderr.split(separator: "\n")
        #expect(lines.count == 1 && lines[0].contains("different builds") && lines[0].contains("refusing to start"), "\(p.stderr)")
        #expect(differing == "abi" ? lines.first?.contains("launch ABI \(LaunchABI.version + 7)") == true
                                   : lines.first?.contains("build 00c0ffee") == true, "\(p.stderr)")
    }

    @Test func hostMemoryThatCannotBeCreatedGivesAClearError() {
        var config = StackConfig(path: .pv, program: "cpuid", tierExecutable: PVMBinary.path)
        config.hostMemoryBytes = 1 << 62
        config.l1HostOffset = HostOffset(0)
        do {
            _ = try L0Stack(config: config)
            Issue.record("creating 4 EiB of host memory should fail")
        } catch let e as StackError {
            #expect("\(e)".contains("cannot create L0's shared memory"), "\(e)")
        } catch {
            Issue.record("unexpected error \(error)")
        }
    }

    @Test func l1MemoryThatDoesNotFitInHostMemoryIsRefused() {
        var config = StackConfig(path: .pv, program: "cpuid", tierExecutable: PVMBinary.path)
        config.hostMemoryBytes = 64 << 20
        #expect(throws: StackError.self) { _ = try L0Stack(config: config) }
    }

    @Test func aGuestAssertionStopsTheStackWithItsMessage() throws {
        // memory-probe asserts its read-back; an L2 GPA beyond what the PV L1 mapped reads as
        // all ones, so the assertion fails and names the value.
        var config = StackConfig(path: .pv, program: "memory-probe", programArguments: [0x4000_0000, 7], tierExecutable: PVMBinary.path)
        config.timeoutNanos = 30_000_000_000
        let result = try L0Stack(config: config).run()
        guard case .guestAssert(let message) = result.stop else {
            Issue.record("expected a guest assertion, got \(result.stop)")
            return
        }
        #expect(message.contains("read back 18446744073709551615 after storing 7"), "\(message)")
        #expect(result.l1Status == .exited(0) && result.l2Status == .exited(0))
    }
}
}

extension StackTests {
@Suite(.serialized, .timeLimit(.minutes(1))) struct HostIntegrationTests {
    @Test func aPVNestedGuestInAProtectedStateL1IsRefusedAndTheRunSaysWhy() throws {
        var config = StackConfig(path: .pv, program: "cpuid-values", tierExecutable: PVMBinary.path)
        config.vmType = .tdx
        config.oneTimeSetup = .onFirstProtectedVM
        let result = try L0Stack(config: config).run()
        guard case .host(.pvNestingRefused(_, .tdx)) = result.pvRefusal else {
            Issue.record("expected the host's protected-state refusal, got \(String(describing: result.pvRefusal))")
            return
        }
        #expect("\(result.pvRefusal!)".contains("cannot leave the TCB"))   // the reason pvm launch prints
        #expect(result.stop == .tierDied(.l1, .exited(3)))
        #expect(result.l2Status == nil)                        // L2 was never started
    }

    @Test func aVMTypeTheHostDoesNotOfferIsAClearErrorBeforeAnythingStarts() {
        var config = StackConfig(path: .pv, program: "cpuid-values", tierExecutable: PVMBinary.path)
        config.vmType = .tdx                                    // needs the one-time setup, which is off
        #expect(throws: StackError.self) { _ = try L0Stack(config: config) }
    }

    @Test func withVirtualizationEnabledOnDemandTheStackRunsAndLeavesItOff() throws {
        var config = StackConfig(path: .nvmx, program: "cpuid-values", tierExecutable: PVMBinary.path)
        config.enableVirtAtLoad = false
        let stack = try L0Stack(config: config)
        #expect(stack.host.usageCount == 1 && stack.host.enabledCPUs.count == config.cpuCount)
        let result = try stack.run()
        #expect(result.succeeded)
        #expect(stack.host.enabledCPUs.isEmpty)
    }
}
}
