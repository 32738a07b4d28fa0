import ABI
import Foundation
import L0
import Testing
import Transport

/// A stand-in L1 that speaks the tier protocol badly: a shell script started as the tier
/// executable, which gets L1's memfds as descriptors 3 (its exchange region), 4 (L0's tables
/// for it) and 5 (host memory) like a real child and writes into its exchange region through
/// /proc/self/fd/3 (its handoff lane, its run page). Whatever it writes, L0 ends with a typed
/// stop reason: no trap, no hang, no orphan.
extension StackTests {
@Suite(.serialized, .timeLimit(.minutes(1))) struct HostileTierTests {
    /// What the stand-in does once L0 has handed it the vCPU, as (control-memory offset, bytes).
    struct Scribble: CustomTestStringConvertible, Sendable {
        var name: String
        var writes: [(offset: UInt64, bytes: [UInt8])]
        var exitsAfterwards = false
        /// What L0 must say: a check of the stop reason.
        var expected: @Sendable (StopReason) -> Bool
        var testDescription: String { name }
    }

    static let layout = StackConfig(path: .nvmx, program: "cpuid-forever", tierExecutable: "/bin/false").layout
    static var turn: UInt64 { layout.handoff(0).raw + HandoffLayout.turn }
    static var l1Run: UInt64 { layout.runPage(0).raw }
    static func le(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }

    static func timedOut(_ r: StopReason) -> Bool { if case .fatal(.tierTimeout(.l1, _, _)) = r { true } else { false } }

    static let scribbles: [Scribble] = [
        Scribble(name: "says stop in its handoff lane", writes: [(turn, le(UInt64(HandoffLayout.stopValue), 4))],
                 expected: { $0 == .fatal(.stopFromGuest) }),
        Scribble(name: "gives the turn to a tier that does not exist", writes: [(turn, le(9, 4))], expected: timedOut),
        Scribble(name: "exits with a reason no CPU has", writes: [(l1Run + RunPage.exitReason, le(0xFFFF, 4)), (turn, le(0, 4))],
                 expected: { $0 == .fatal(.impossibleExit(.l1, ExitReason(rawValue: 0xFFFF))) }),
        Scribble(name: "exits as a failed entry with garbage everywhere",
                 writes: [(l1Run, [UInt8](repeating: 0xFF, count: 512)), (turn, le(0, 4))],
                 expected: { $0 == .fatal(.impossibleExit(.l1, ExitReason(rawValue: 0xFFFF_FFFF))) }),
        // L0 answers it (VMfail or a fault) and gives the turn back; the stand-in then keeps it.
        Scribble(name: "VMREADs with an instruction info of all ones",
                 writes: [(l1Run + RunPage.exitReason, le(UInt64(ExitReason.vmread.rawValue), 4)),
                          (l1Run + RunPage.instructionInfo, le(~0, 8)), (l1Run + RunPage.instructionLength, le(~0, 8)),
                          (turn, le(0, 4))],
                 expected: { timedOut($0) && "\($0)".contains("after L0 handled L1's VMREAD exit") }),
        // Without giving the turn back, so the death is all L0 can see (deterministically).
        Scribble(name: "scribbles on its run page and dies", writes: [(l1Run, [UInt8](repeating: 0xA5, count: 64))],
                 exitsAfterwards: true, expected: { $0 == .tierDied(.l1, .exited(3)) }),
    ]

    @Test(arguments: scribbles)
    func aHostileL1EndsTheStackWithATypedReasonAndLeavesNothingBehind(_ s: Scribble) throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("pvm-hostile-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let script = dir.appendingPathComponent("stand-in-l1")
        // It waits for its turn as a tier would (the turn word says L1), however slow the machine.
        var text = "#!/bin/bash\n# A stand-in L1: \(s.name).\n"
            + "until [ \"$(od -An -tu4 -j \(Self.turn) -N4 /proc/self/fd/3 | tr -d ' ')\" = \"\(Tier.l1.rawValue)\" ]; do sleep 0.02; done\n"
        for w in s.writes {
            let bytes = w.bytes.map { String(format: "\\x%02x", $0) }.joined()
            text += "printf '\(bytes)' | dd of=/proc/self/fd/3 bs=1 seek=\(w.offset) conv=notrunc status=none\n"
        }
        text += s.exitsAfterwards ? "exit 3\n" : "exec sleep 30\n"
        try text.write(to: script, atomically: true, encoding: .utf8)
        chmod(script.path, 0o755)

        var config = StackConfig(path: .nvmx, program: "cpuid-forever", tierExecutable: script.path)
        config.tierTimeoutNanos = 1_500_000_000
        let result = try L0Stack(config: config).run()
        #expect(!result.succeeded)
        #expect(s.expected(result.stop), "\(s.name): \(result.stop)")
        // The stand-in was reaped by L0's shutdown, whatever it was doing.
        #expect(result.l1Status != nil, "\(s.name): L1 not reaped")
        if let pid = result.tierPIDs[.l1] { #expect(!processExists(pid) || processState(pid) == "Z") }
    }

    /// The stand-in L1 goes for what it was not given: a write(2) into L0's tables (descriptor
    /// 4, sealed against writing), a truncation of its exchange region and of host memory
    /// (sealed against shrinking, which would make L0's next access a SIGBUS). Every attempt is
    /// refused by the kernel; the stand-in then dies and L0 says so.
    @Test func aHostileL1CannotWriteL0sTablesOrShrinkSharedMemory() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("pvm-hostile-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let script = dir.appendingPathComponent("stand-in-l1"), results = dir.appendingPathComponent("results")
        let text = """
            #!/bin/bash
            # A stand-in L1 that attacks the memory it was handed.
            until [ "$(od -An -tu4 -j \(Self.turn) -N4 /proc/self/fd/3 | tr -d ' ')" = "\(Tier.l1.rawValue)" ]; do sleep 0.02; done
            { printf '\\xff' | dd of=/proc/self/fd/4 bs=1 seek=\(ControlLayout.ept02GenerationOffset.raw) conv=notrunc status=none 2>&1 && echo "tables written"
              truncate -s 0 /proc/self/fd/3 2>&1 && echo "exchange truncated"
              truncate -s 0 /proc/self/fd/5 2>&1 && echo "host memory truncated"; } > \(results.path)
            exit 3

            """
        try text.write(to: script, atomically: true, encoding: .utf8)
        chmod(script.path, 0o755)
        var config = StackConfig(path: .nvmx, program: "cpuid-forever", tierExecutable: script.path)
        config.tierTimeoutNanos = 1_500_000_000
        let stack = try L0Stack(config: config)
        let generationBefore = stack.vcpu.control.ept02.generation.value
        let result = try stack.run()
        #expect(result.stop == .tierDied(.l1, .exited(3)), "\(result.stop)")
        let said = try String(contentsOf: results, encoding: .utf8)
        #expect(!said.contains("written") && !said.contains("truncated"), "\(said)")
        #expect(said.components(separatedBy: "Operation not permitted").count - 1 == 3, "\(said)")
        #expect(stack.vcpu.control.ept02.generation.value == generationBefore)
    }
}
}
