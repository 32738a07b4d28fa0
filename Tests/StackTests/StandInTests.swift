import ABI
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import L0
import Testing
import Transport

/// Hostile tiers through the real binary: `pvm launch --stand-in l1=SCRIPT` (or `l2=`) runs a
/// shell script as that tier, handed exactly what a real tier gets (descriptor 3 its exchange
/// region: its handoff lane at 0, its run page at 4096). The script sends bad hypercalls, exits
/// with garbage, gives the turn to the wrong tier or keeps silent. Whatever it does, `pvm`
/// ends with one clear "stopped:" line naming the tier and exits 1: no crash (that would be
/// 132/134/139), no hang, no orphan, no memfd left.
extension StackTests {
@Suite(.serialized, .timeLimit(.minutes(2))) struct StandInTests {
    static let layout = ControlLayout(vcpuCount: 1, l2AddressLimit: 4 << 30)
    static let run = layout.runPage(0).raw
    static func reg(_ r: Register) -> UInt64 { run + RunPage.offset(of: r) }

    /// One step of a stand-in: a store into its exchange region, a wait for its turn, a log of
    /// a u64 it reads back, or giving the turn to a tier.
    enum Step {
        case store(UInt64, UInt64, bytes: Int = 8)
        case waitForTurn
        case log(String, UInt64)
        case give(UInt32)
    }

    struct Scenario: CustomTestStringConvertible, Sendable {
        var name: String
        var tier: Tier
        var path: NestingPath
        var steps: @Sendable (Tier) -> [Step]
        var exitsWith: Int32? = 7
        /// What the "stopped:" line must say.
        var stopped: String
        /// What the script's log must hold (name -> value), read back after the run.
        var logged: [String: UInt64] = [:]
        var testDescription: String { "\(tier) on \(path): \(name)" }
    }

    /// A VMCALL from the stand-in L1 (number in RAX, arguments in RBX, RCX, RDX).
    static func hypercall(_ nr: PVHypercall, _ a0: UInt64, _ a1: UInt64, _ a2: UInt64) -> [Step] {
        [.store(run + RunPage.exitReason, UInt64(ExitReason.vmcall.rawValue), bytes: 4),
         .store(run + RunPage.instructionLength, 3), .store(reg(.rax), nr.rawValue),
         .store(reg(.rbx), a0), .store(reg(.rcx), a1), .store(reg(.rdx), a2), .give(Tier.l0.rawValue), .waitForTurn]
    }

    /// The crash from issue 11's text: an MMIO read whose access size is 2^63.
    static let hugeAccessSize: @Sendable (Tier) -> [Step] = { _ in
        [.waitForTurn,
         .store(run + RunPage.exitReason, UInt64(ExitReason.eptViolation.rawValue), bytes: 4),
         .store(run + RunPage.guestPhysicalAddress, 0xFEB0_0000), .store(run + RunPage.exitQualification, EPTViolationQualification.dataRead),
         .store(run + RunPage.instructionLength, 3), .store(run + RunPage.instructionInfo, 1 << 63),
         .store(reg(.rip), 0x1000), .give(Tier.l0.rawValue), .waitForTurn, .log("rip", reg(.rip))]
    }

    static let scenarios: [Scenario] = [
        Scenario(name: "registerL0Ports with a count that wraps", tier: .l1, path: .pv, steps: { _ in
            [.waitForTurn]
                + hypercall(.negotiate, PVABIVersion.current.packed, PVFeatures.all.rawValue, 0x1000) + [.log("negotiate", reg(.rax))]
                + hypercall(.registerL0Ports, 1, UInt64.max, PVL0Device.latch.rawValue) + [.log("register", reg(.rax))]
        }, stopped: "L1 (pvm-l1) ended unexpectedly: exit status 7",
           logged: ["negotiate": 0, "register": HypercallError.invalid.returnValue]),
        Scenario(name: "MMIO with an access size of 2^63", tier: .l2, path: .single, steps: hugeAccessSize,
                 stopped: "L2 (pvm-l2) ended unexpectedly: exit status 7", logged: ["rip": 0x1003]),
        Scenario(name: "MMIO with an access size of 2^63, for the real L1", tier: .l2, path: .pv, steps: hugeAccessSize,
                 stopped: "L2 (pvm-l2) ended unexpectedly: exit status 7", logged: ["rip": 0x1003]),
        Scenario(name: "MMIO with an access size of 2^63, for the real L1", tier: .l2, path: .nvmx, steps: hugeAccessSize,
                 stopped: "L2 (pvm-l2) ended unexpectedly: exit status 7", logged: ["rip": 0x1003]),
        Scenario(name: "an exit with garbage everywhere", tier: .l2, path: .nvmx, steps: { _ in
            [.waitForTurn] + (0..<64).map { .store(run + UInt64($0) * 8, ~0) } + [.give(Tier.l0.rawValue), .waitForTurn]
        }, exitsWith: nil, stopped: "L2 exited with a reason no CPU reports (0xffffffff", logged: [:]),
        Scenario(name: "gives the turn to L1 on its own lane", tier: .l2, path: .pv, steps: { _ in
            [.waitForTurn, .give(Tier.l1.rawValue)]
        }, exitsWith: nil, stopped: "L2 (pvm-l2) did not give the vCPU back"),
        Scenario(name: "keeps silent", tier: .l2, path: .single, steps: { _ in [.waitForTurn] },
                 exitsWith: nil, stopped: "L2 (pvm-l2) did not give the vCPU back"),
        Scenario(name: "says stop on its lane", tier: .l1, path: .nvmx, steps: { _ in
            [.waitForTurn, .give(HandoffLayout.stopValue)]
        }, exitsWith: nil, stopped: FatalError.stopFromGuest.description),
    ]

    static func script(_ s: Scenario, log: String) -> String {
        func escaped(_ v: UInt64, _ n: Int) -> String {
            (0..<n).map { String(format: "\\x%02x", UInt8(truncatingIfNeeded: v >> (8 * UInt64($0)))) }.joined()
        }
        var text = """
            #!/bin/bash
            # A stand-in \(s.tier): \(s.name).
            X=/proc/self/fd/3
            echo "pid $$" > \(log)

            """
        for step in s.steps(s.tier) {
            switch step {
            case let .store(offset, value, bytes):
                text += "printf '\(escaped(value, bytes))' | dd of=$X bs=1 seek=\(offset) conv=notrunc status=none\n"
            case .waitForTurn:
                text += "until [ \"$(od -An -tu4 -j \(HandoffLayout.turn) -N4 $X | tr -d ' ')\" = \"\(s.tier.rawValue)\" ]; do sleep 0.01; done\n"
            case let .log(name, offset):
                text += "echo \"\(name) $(od -An -tu8 -j \(offset) -N8 $X | tr -d ' ')\" >> \(log)\n"
            case let .give(turn):
                text += "printf '\(escaped(UInt64(turn), 4))' | dd of=$X bs=1 seek=\(HandoffLayout.turn) conv=notrunc status=none\n"
            }
        }
        text += s.exitsWith.map { "exit \($0)\n" } ?? "exec sleep 60\n"
        return text
    }

    @Test(arguments: scenarios)
    func aStandInTierEndsPvmWithOneClearLineAndExit1(_ s: Scenario) throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("pvm-stand-in-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let scriptURL = dir.appendingPathComponent("stand-in"), logURL = dir.appendingPathComponent("log")
        try Self.script(s, log: logURL.path).write(to: scriptURL, atomically: true, encoding: .utf8)
        chmod(scriptURL.path, 0o755)

        let token = UUID().uuidString
        let p = Process()
        p.executableURL = URL(fileURLWithPath: PVMBinary.path)
        p.arguments = ["launch", "--path", s.path.rawValue, "--program", "cpuid-forever", "--tier-timeout", "1.5",
                       "--stand-in", "\(s.tier == .l1 ? "l1" : "l2")=\(scriptURL.path)"]
        p.environment = ProcessInfo.processInfo.environment.merging(["PVM_STAND_IN_TOKEN": token]) { $1 }
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()

        #expect(p.terminationReason == .exit && p.terminationStatus == 1, "\(s.name): exit \(p.terminationStatus)\n\(text)")
        let stopped = text.split(separator: "\n").filter { $0.hasPrefix("stopped: ") }
        #expect(stopped.count == 1 && stopped[0].contains(s.stopped), "\(s.name):\n\(text)")
        #expect(!text.contains("Fatal error") && !text.contains("Backtrace"), "\(text)")
        if s.path != .single && s.tier == .l2 {
            // The real L1 took the stand-in's exits and was stopped in order, not crashed.
            #expect(text.contains("L1 exit status 0"), "\(text)")
        }
        let log = (try? String(contentsOf: logURL, encoding: .utf8)) ?? ""
        var values: [String: UInt64] = [:]
        for line in log.split(separator: "\n") {
            let parts = line.split(separator: " ")
            if parts.count == 2, let v = UInt64(parts[1]) { values[String(parts[0])] = v }
        }
        for (name, value) in s.logged { #expect(values[name] == value, "\(name): \(log)") }
        // Nothing of this stack is left: no process carries its token, so no memfd is held either.
        #expect(processesCarrying(token: token).isEmpty, "\(processesCarrying(token: token))")
        if let pid = values["pid"] { #expect(!processExists(Int32(pid)) || processState(Int32(pid)) == "Z") }
    }

    /// Processes whose environment carries `PVM_STAND_IN_TOKEN=token` (pvm and its tiers inherit it).
    func processesCarrying(token: String) -> [Int32] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { Int32($0) }.filter { pid in
            guard let env = FileManager.default.contents(atPath: "/proc/\(pid)/environ") else { return false }
            return String(decoding: env, as: UTF8.self).contains("PVM_STAND_IN_TOKEN=\(token)")
        }
    }
}
}
