import ABI
import Foundation
import L0
import Testing
import Transport

/// Processes you start, you stop: the stack's life and death through the real `pvm` binary.
extension StackTests {
@Suite(.serialized) struct LifecycleTests {
    /// Starts `pvm launch` with a guest that never finishes and waits for its two child tiers.
    func launchEndlessStack(path: String) throws -> (Process, Pipe, l1: Int32, l2: Int32) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: PVMBinary.path)
        p.arguments = ["launch", "--path", path, "--program", "cpuid-forever"]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            let kids = children(of: p.processIdentifier)
            if let l1 = kids.first(where: { $0.name == "pvm-l1" }), let l2 = kids.first(where: { $0.name == "pvm-l2" }) {
                return (p, out, l1.pid, l2.pid)
            }
            usleep(20_000)
        }
        p.terminate()
        throw LaunchTimeout()
    }
    struct LaunchTimeout: Error {}

    func waitForExit(_ p: Process, seconds: Double = 20) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while p.isRunning && Date() < deadline { usleep(20_000) }
        return !p.isRunning
    }

    @Test(arguments: [(Tier.l1, "nvmx"), (Tier.l2, "nvmx"), (Tier.l1, "pv"), (Tier.l2, "pv")])
    func killingATierMidRunEndsTheWholeStackWithAMessageNamingIt(victim: Tier, path: String) throws {
        let (p, out, l1, l2) = try launchEndlessStack(path: path)
        // Three processes while it runs: L0 (the launcher itself) and its two children.
        #expect(processExists(p.processIdentifier) && processExists(l1) && processExists(l2))
        #expect((try? String(contentsOfFile: "/proc/\(p.processIdentifier)/comm", encoding: .utf8))?.hasPrefix("pvm-l0") == true)
        kill(victim == .l1 ? l1 : l2, SIGKILL)
        let exited = waitForExit(p)
        #expect(exited)
        if !exited { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(p.terminationStatus != 0)
        #expect(text.contains("\(victim) (pvm-l\(victim.rawValue)) ended unexpectedly: killed by signal 9"), "\(text)")
        #expect(!processExists(l1) && !processExists(l2))
    }

    @Test func killingL0TakesItsChildrenWithIt() throws {
        let (p, _, l1, l2) = try launchEndlessStack(path: "nvmx")
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        let deadline = Date().addingTimeInterval(10)
        while (processExists(l1) || processExists(l2)) && Date() < deadline { usleep(20_000) }
        // Orphans are reparented and reaped by init; either way they must be gone.
        #expect(!processExists(l1) && !processExists(l2))
    }

    @Test func aCompletedRunLeavesNoProcessesDescriptorsOrSharedMemory() throws {
        let shmBefore = Set((try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm")) ?? [])
        let fdsBefore = openFileDescriptorCount()
        var pids: [Int32] = []
        do {
            let (result, _) = try runStack(.nvmx, program: "cpuid-values")
            #expect(result.succeeded)
            #expect(result.l1Status == .exited(0) && result.l2Status == .exited(0))
            pids = Array(result.tierPIDs.values)
        }
        #expect(pids.count == 2)
        // Reaped: not even a zombie is left (other suites' stacks may be running meanwhile).
        #expect(pids.allSatisfy { !processExists($0) })
        #expect(openFileDescriptorCount() == fdsBefore)
        #expect(Set((try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm")) ?? []) == shmBefore)
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
        let (result, _) = try runStack(.pv, program: "memory-probe", args: [0x4000_0000, 7])
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
@Suite(.serialized) struct HostIntegrationTests {
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
