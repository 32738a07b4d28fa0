import ABI
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import L0
import L2Guest
import Testing
import Transport

/// Least privilege through the real binary: a hostile L2 (`l2-escape`) tries to make L0's EPT02
/// writable and write it, to signal L0, and to open a file. Each attempt ends L2 (SIGSEGV or
/// the seccomp filter's SIGSYS), L0 reports which tier died and how, EPT02 is as L0 left it,
/// and nothing is left behind.
extension StackTests {
@Suite(.serialized, .timeLimit(.minutes(1))) struct SandboxTests {
    struct Attempt: CustomTestStringConvertible, Sendable {
        var escape: GuestPrograms.Escape
        var path: NestingPath
        var signal: Int32
        var testDescription: String { "\(escape) on \(path)" }
    }

    static let attempts: [Attempt] = [
        Attempt(escape: .writeEPT02, path: .nvmx, signal: SIGSEGV),
        Attempt(escape: .writeEPT02, path: .pv, signal: SIGSEGV),
        Attempt(escape: .writeEPT02, path: .single, signal: SIGSEGV),
        Attempt(escape: .signalL0, path: .nvmx, signal: SIGSYS),
        Attempt(escape: .openFile, path: .pv, signal: SIGSYS),
    ]

    @Test(arguments: attempts)
    func aHostileL2DiesAtTheBoundaryAndL0ReportsIt(_ a: Attempt) throws {
        let (result, stack) = try runStack(a.path, program: "l2-escape", args: [a.escape.rawValue])
        #expect(result.stop == .tierDied(.l2, .signaled(a.signal)), "\(result.stop)")
        #expect("\(result.stop)".contains("L2") && (a.signal != SIGSYS || "\(result.stop)".contains("allow-list")))
        let syncs = Array(result.harness.syncs)
        // L2 got as far as its attempt, and not one step further.
        #expect(syncs.first?.first == a.escape.rawValue, "\(syncs)")
        #expect(!syncs.contains { $0.count > 1 && $0[1] == GuestPrograms.escaped }, "\(syncs)")
        if a.escape == .writeEPT02 {
            // mprotect to read-write was refused: the seal took VM_MAYWRITE away.
            #expect(syncs.first?[1] == UInt64(EACCES), "\(syncs)")
            // EPT02 is L0's: the entry L2 aimed at (its ucall page, mapped and in use) still
            // points into L1's memory, not at host offset 0.
            let e = stack.vcpu.control.ept02.entries[1]
            let slot = stack.config.l1Slot
            let host = EPT02Entry.host(e).raw
            #expect(e != 0 && host >= slot.hostOffset.raw && host < slot.hostOffset.raw + slot.memorySize,
                    "EPT02[1] = 0x\(String(e, radix: 16))")
        }
        // L1 (where there is one) is stopped in order; nothing is left running.
        if a.path != .single { #expect(result.l1Status == .exited(0), "\(String(describing: result.l1Status))") }
        #expect(tierChildrenOfThisProcess().isEmpty)
    }

    /// What the sandbox answers without ending the tier: each attempt's result as L2 saw it.
    @Test(arguments: [
        (GuestPrograms.Escape.growHostMemory, UInt64(ENOSYS)),   // mremap past L1's memslot: the filter says ENOSYS
        (.punchTables, UInt64(EACCES)),                          // MADV_REMOVE on the read-only tables
        (.closeDescriptors, 0),                                   // no descriptor above 2 was open
        (.signalItself, 0),                                       // raise/abort still work
    ])
    func whatTheSandboxRefusesWithAnErrorLeavesL2Running(_ escape: GuestPrograms.Escape, _ answer: UInt64) throws {
        let (result, _) = try runStack(.nvmx, program: "l2-escape", args: [escape.rawValue])
        #expect(result.succeeded, "\(result.stop)")
        #expect(result.harness.syncs.map { Array($0.prefix(2)) } == [[escape.rawValue, answer]], "\(Array(result.harness.syncs))")
    }
}
}
