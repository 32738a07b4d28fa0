import ABI
@testable import L0
import Testing
import Transport

/// The ucall port: a block in L2 memory (read through EPT02) tells the harness what happened.
@Suite struct HarnessTests {
    static let block = L2GPA(0x1000)
    static let blockL1 = L1GPA(Plan.l2Backing.raw + 0x1000)

    /// A PV vCPU with L2 [0, 64 KiB) mapped to L1 `Plan.l2Backing`.
    func pvFixture() throws -> Fixture {
        let f = try Fixture(.pv)
        #expect(f.map(l2: 0, l1: Plan.l2Backing.raw, length: 0x1_0000) == 0)
        #expect(f.hypercall(.createVCPU, Plan.exitPage.raw).rax == 0)
        return f
    }

    func writeUcall(_ f: Fixture, _ cmd: UcallCommand, _ args: [UInt64] = [], message: String = "",
                    at l1: L1GPA = Self.blockL1) throws {
        try f.store64(cmd.rawValue, l1)
        for i in 0..<Ucall.argCount {
            try f.store64(i < args.count ? args[i] : 0, L1GPA(l1.raw + Ucall.argsOffset + UInt64(i) * 8))
        }
        var bytes = Array(message.utf8)
        bytes.append(0)
        try f.host.writeBytes(bytes, at: f.hostOffset(L1GPA(l1.raw + Ucall.messageOffset)).raw)
    }

    static let ucallExit = L2ExitInfo(reason: .ioInstruction,
                                     qualification: IOQualification.make(port: Ucall.port, size: 1, isIn: true),
                                     instructionLength: 1)

    func ucall(_ f: Fixture, block: L2GPA = Self.block) -> NextStep {
        f.l2Run[register: .rdi] = block.raw
        return f.l2ExitCountingEntries(Self.ucallExit)
    }

    @Test func syncIsRecordedAndL2ContinuesAfterTheOUT() throws {
        let f = try pvFixture()
        f.l2Run[register: .rip] = 0x2000
        try writeUcall(f, .sync, [1, 2, 3])
        #expect(ucall(f) == .resume(.l2))
        #expect(f.l2Run[register: .rip] == 0x2001)
        try writeUcall(f, .sync, [4])
        #expect(ucall(f) == .resume(.l2))
        #expect(Array(f.vcpu.harness.syncs) == [[1, 2, 3, 0, 0, 0], [4, 0, 0, 0, 0, 0]])
        #expect(f.vcpu.counters.totalDeliveries == 0)
    }

    @Test func doneStopsTheStackAsGuestDone() throws {
        let f = try pvFixture()
        try writeUcall(f, .done)
        #expect(ucall(f) == .stop(.guestDone))
    }

    @Test func abortStopsWithTheGuestsMessage() throws {
        let f = try pvFixture()
        try writeUcall(f, .abort, [42], message: "Guest.swift:42: x == 1")
        #expect(ucall(f) == .stop(.guestAssert("Guest.swift:42: x == 1")))
    }

    @Test func printfAndReportAreRecorded() throws {
        let f = try pvFixture()
        try writeUcall(f, .printf, message: "hello from L2")
        #expect(ucall(f) == .resume(.l2))
        try writeUcall(f, .report, [10, 1, 2, 3, 4, 50])
        #expect(ucall(f) == .resume(.l2))
        #expect(Array(f.vcpu.harness.prints) == ["hello from L2"])
        #expect(Array(f.vcpu.harness.reports) == [LatencyReport(samples: 10, minNanos: 1, medianNanos: 2, p99Nanos: 3, maxNanos: 4, totalNanos: 50)])
    }

    /// A guest chooses how much it prints: L0 keeps the last lines and counts the rest.
    @Test func guestOutputIsARingOfTheLastLinesAndACountOfDroppedOnes() throws {
        let f = try pvFixture()
        let total = Harness.printCapacity * 3 + 7
        for i in 0..<total {
            try writeUcall(f, .printf, message: "line \(i)")
            #expect(ucall(f) == .resume(.l2))
            try writeUcall(f, .sync, [0x5157, UInt64(i)])
            #expect(ucall(f) == .resume(.l2))
        }
        let prints = f.vcpu.harness.prints
        #expect(prints.count == Harness.printCapacity)
        #expect(prints.dropped == UInt64(total - Harness.printCapacity))
        #expect(prints.first == "line \(total - Harness.printCapacity)" && prints.last == "line \(total - 1)")
        #expect(f.vcpu.harness.syncs.count == total && f.vcpu.harness.syncs.dropped == 0)
    }

    @Test func anUnmappedOrStraddlingOrUnknownUcallBlockIsFatal() throws {
        let f = try pvFixture()
        if case .stop(.fatal) = ucall(f, block: L2GPA(0x10_0000)) {} else { Issue.record("unmapped block") }
        if case .stop(.fatal) = ucall(f, block: L2GPA(0x1F80)) {} else { Issue.record("block crossing a page") }
        try f.store64(0x77, Self.blockL1)
        if case .stop(.fatal) = ucall(f) {} else { Issue.record("unknown command") }
    }

    @Test func theMeasurementWindowExcludesTheUcallExitsAndTheirEntries() throws {
        let f = try pvFixture()
        try f.writeCPUIDEntries([CPUIDEntry(function: 0, eax: 1, ebx: 0, ecx: 0, edx: 0)], at: Plan.cpuidBuffer)
        #expect(f.hypercall(.setCPUID, Plan.cpuidBuffer.raw, 1).rax == 0)
        // Some traffic before the window.
        for _ in 0..<3 { _ = f.l2ExitCountingEntries(L2ExitInfo(reason: .cpuid, instructionLength: 2)) }
        try writeUcall(f, .sync, [UcallStage.measureStart])
        #expect(ucall(f) == .resume(.l2))
        for _ in 0..<5 {
            f.l2Run[register: .rax] = 0
            #expect(f.l2ExitCountingEntries(L2ExitInfo(reason: .cpuid, instructionLength: 2)) == .resume(.l2))
        }
        // One exit L1 must see: a delivery and an L1 entry inside the window.
        #expect(f.l2ExitCountingEntries(L2ExitInfo(reason: .hlt, instructionLength: 1)) == .resume(.l1))
        try writeUcall(f, .sync, [UcallStage.measureEnd])
        #expect(ucall(f) == .resume(.l2))

        #expect(f.vcpu.harness.windows.count == 1)
        let w = try #require(f.vcpu.harness.windows.first)
        #expect(w.l2Exits[Int(ExitReason.cpuid.rawValue)] == 5)
        #expect(w.l2Exits[Int(ExitReason.ioInstruction.rawValue)] == 0)
        #expect(w.l2Exits[Int(ExitReason.hlt.rawValue)] == 1)
        #expect(w.totalL2Exits == 6)
        #expect(w.l2Entries == 5)            // after each CPUID; not the one after either ucall
        #expect(w.l1Entries == 1)
        #expect(w.totalDeliveries == 1)
        #expect(f.vcpu.harness.syncs.count == 2)
    }

    @Test func theUcallWorksOnTheNestedPathThroughEPT02() throws {
        let f = try Fixture(.nvmx)
        try f.writeEPT12Path(gpa: Self.block.raw, leafLevel: 1, leaf: Fixture.eptLeaf(Self.blockL1.raw))
        try f.launchL2()
        #expect(f.l2Exit(L2ExitInfo(reason: .eptViolation, qualification: EPTViolationQualification.dataWrite,
                                   guestPhysicalAddress: L2GPA(Self.block.raw), instructionLength: 3)) == .resume(.l2))
        try writeUcall(f, .sync, [9])
        #expect(ucall(f) == .resume(.l2))
        #expect(Array(f.vcpu.harness.syncs) == [[9, 0, 0, 0, 0, 0]])
        try writeUcall(f, .done)
        #expect(ucall(f) == .stop(.guestDone))
    }
}
