import ABI
@testable import L0
import Testing
import Transport

/// CPUID from L2 on the PV path: answered by L0 from the table L1 registered, or delivered.
@Suite struct PVCPUIDTests {
    static let maxBasic: UInt32 = 0xD
    static let entries: [CPUIDEntry] = [
        CPUIDEntry(function: 0, eax: maxBasic, ebx: 0x756E_6547, ecx: 0x6C65_746E, edx: 0x4965_6E69),
        CPUIDEntry(function: 1, eax: 0x0009_06EA, ebx: 0x11, ecx: 0x22, edx: 0x33),
        CPUIDEntry(function: 4, eax: 0x44, ebx: 0x45, ecx: 0x46, edx: 0x47),
        CPUIDEntry(function: 7, index: 0, flags: CPUIDEntry.significantIndex, eax: 0, ebx: 0x1111, ecx: 0, edx: 0),
        CPUIDEntry(function: 7, index: 1, flags: CPUIDEntry.significantIndex, eax: 0, ebx: 0x2222, ecx: 0, edx: 0),
        CPUIDEntry(function: 0xD, index: 0, flags: CPUIDEntry.significantIndex, eax: 0xD0, ebx: 0xD1, ecx: 0xD2, edx: 0xD3),
        CPUIDEntry(function: 0xD, index: 1, flags: CPUIDEntry.significantIndex, eax: 0xE0, ebx: 0xE1, ecx: 0xE2, edx: 0xE3),
        CPUIDEntry(function: 0x8000_0000, eax: 0x8000_0008, ebx: 0, ecx: 0, edx: 0),
        CPUIDEntry(function: 0x8000_0001, eax: 0, ebx: 0, ecx: 0x121, edx: 0x2C10_0800),
    ]

    func registeredFixture() throws -> Fixture {
        let f = try Fixture(.pv)
        try f.writeCPUIDEntries(Self.entries, at: Plan.cpuidBuffer)
        let r = f.hypercall(.setCPUID, Plan.cpuidBuffer.raw, UInt64(Self.entries.count))
        #expect(r.outcome == .resume(.l1))
        #expect(r.rax == HypercallError.success)
        return f
    }

    @Test func l2CPUIDIsAnsweredByL0FromTheRegisteredTableAndSkipsTheInstruction() throws {
        let f = try registeredFixture()
        f.l2Run[register: .rip] = 0x1000
        let outcome = f.l2CPUID(function: 1, length: 2)
        #expect(outcome == .resume(.l2))
        #expect(f.l2CPUIDResult == [0x0009_06EA, 0x11, 0x22, 0x33])
        #expect(f.l2Run[register: .rip] == 0x1002)
        #expect(f.vcpu.counters.totalDeliveries == 0)
        #expect(f.vcpu.counters.l2Exits[Int(ExitReason.cpuid.rawValue)] == 1)
    }

    @Test func cpuidUsesOnlyEAXAndECXAndZeroExtendsTheResult() throws {
        let f = try registeredFixture()
        f.l2Run[register: .rbx] = ~0
        f.l2Run[register: .rdx] = ~0
        #expect(f.l2CPUID(function: 0xFFFF_FFFF_0000_0007, index: 0xABCD_0000_0000_0001) == .resume(.l2))
        #expect(f.l2CPUIDResult == [0, 0x2222, 0, 0])
    }

    @Test func indexSignificantEntriesMatchOnTheSubleafAndOthersIgnoreIt() throws {
        let f = try registeredFixture()
        _ = f.l2CPUID(function: 7, index: 0)
        #expect(f.l2CPUIDResult == [0, 0x1111, 0, 0])
        _ = f.l2CPUID(function: 7, index: 1)
        #expect(f.l2CPUIDResult == [0, 0x2222, 0, 0])
        // An index-significant leaf with no entry for this subleaf reads as zeros.
        _ = f.l2CPUID(function: 7, index: 5)
        #expect(f.l2CPUIDResult == [0, 0, 0, 0])
        // Leaf 4 is not index-significant here: any subleaf gets the one entry.
        _ = f.l2CPUID(function: 4, index: 9)
        #expect(f.l2CPUIDResult == [0x44, 0x45, 0x46, 0x47])
    }

    @Test func basicLeafAboveTheMaximumAnswersAsTheMaximumBasicLeafWithTheSameIndex() throws {
        let f = try registeredFixture()
        _ = f.l2CPUID(function: 0x20, index: 1)
        #expect(f.l2CPUIDResult == [0xE0, 0xE1, 0xE2, 0xE3])
        _ = f.l2CPUID(function: 0x3FFF_FFFF, index: 0)
        #expect(f.l2CPUIDResult == [0xD0, 0xD1, 0xD2, 0xD3])
        // In range but without an entry: zeros.
        _ = f.l2CPUID(function: 0xA)
        #expect(f.l2CPUIDResult == [0, 0, 0, 0])
        // An extended leaf in range but without an entry: zeros.
        _ = f.l2CPUID(function: 0x8000_0005)
        #expect(f.l2CPUIDResult == [0, 0, 0, 0])
        _ = f.l2CPUID(function: 0x8000_0001)
        #expect(f.l2CPUIDResult == [0, 0, 0x121, 0x2C10_0800])
    }

    /// KVM (get_out_of_range_cpuid_entry) and the SDM: a leaf above the maximum of its class
    /// (here the extended class, max 0x8000_0008) answers as the maximum basic leaf.
    @Test func extendedLeafAboveTheMaximumExtendedLeafAnswersAsTheMaximumBasicLeaf() throws {
        let f = try registeredFixture()
        _ = f.l2CPUID(function: 0x8000_0009, index: 1)
        do {
            #expect(f.l2CPUIDResult == [0xE0, 0xE1, 0xE2, 0xE3])
        }
    }

    @Test func beforeATableIsRegisteredL2CPUIDIsDeliveredToL1ThroughTheExitPage() throws {
        let f = try Fixture(.pv)
        let created = f.hypercall(.createVCPU, Plan.exitPage.raw)
        #expect(created.rax == 0)   // the vCPU id
        f.l2Run[register: .rip] = 0x1000
        f.l2Run[register: .rbx] = 0x5555
        f.l1Run[register: .rax] = 0x77
        let outcome = f.l2CPUID(function: 1, index: 3, length: 2)
        #expect(outcome == .resume(.l1))
        #expect(f.vcpu.counters.deliveries[Int(ExitReason.cpuid.rawValue)] == 1)
        // L0 did not emulate it: L2's RIP and registers are untouched.
        #expect(f.l2Run[register: .rip] == 0x1000)
        #expect(f.l2Run[register: .rax] == 1)
        // The exit page holds the exit and L2's registers; L1's enter-L2 call returns 0.
        let page = try f.runPage(at: Plan.exitPage)
        #expect(page.exitReason == .cpuid)
        #expect(page[RunPage.instructionLength] == 2)
        #expect(page[register: .rax] == 1)
        #expect(page[register: .rcx] == 3)
        #expect(page[register: .rbx] == 0x5555)
        #expect(page[register: .rip] == 0x1000)
        #expect(f.l1Run[register: .rax] == 0)
    }

    @Test func withoutDirectCPUIDL2CPUIDIsAlwaysDelivered() throws {
        let f = try Fixture(.pv, negotiating: [])
        #expect(f.hypercall(.createVCPU, Plan.exitPage.raw).rax == 0)
        #expect(f.l2CPUID(function: 0) == .resume(.l1))
        #expect(try f.runPage(at: Plan.exitPage).exitReason == .cpuid)
    }

    @Test func withoutAnExitPageADeliveredExitStopsTheStack() throws {
        let f = try Fixture(.pv)
        if case .stop(.fatal) = f.l2CPUID(function: 1) {} else { Issue.record("expected a fatal stop") }
    }

    /// GuestExit's contract: handlers take the exit value, so a made-up exit must be what L1 sees.
    @Test func aDeliveredPVExitCarriesTheExitValueHandedToL0() throws {
        let f = try Fixture(.pv)
        _ = f.hypercall(.createVCPU, Plan.exitPage.raw)
        f.l2Run.exitReason = .hlt            // stale contents of L2's run page
        let outcome = f.vcpu.handleL2Exit(L2ExitInfo(reason: .cpuid, instructionLength: 2))
        #expect(outcome == .resume(.l1))
        let page = try f.runPage(at: Plan.exitPage)
        do {
            #expect(page.exitReason == .cpuid)
            #expect(page[RunPage.instructionLength] == 2)
        }
    }

    @Test func aFailedSetCPUIDKeepsThePreviousTable() throws {
        let f = try registeredFixture()
        #expect(f.hypercall(.setCPUID, Plan.cpuidBuffer.raw, 257).rax == HypercallError.tooBig.returnValue)
        #expect(f.hypercall(.setCPUID, Plan.slotSize - 8, 1).rax == HypercallError.fault.returnValue)
        #expect(f.pv.cpuid == CPUIDTable(Self.entries))
        #expect(f.l2CPUID(function: 1) == .resume(.l2))
    }

    @Test func setCPUIDRejectsMoreThan256EntriesWithE2BIG() throws {
        let f = try Fixture(.pv)
        let r = f.hypercall(.setCPUID, Plan.cpuidBuffer.raw, 257)
        #expect(r.rax == HypercallError.tooBig.returnValue)
        #expect(f.pv.cpuid == nil)
        // Exactly 256 (KVM_MAX_CPUID_ENTRIES) is fine.
        #expect(f.hypercall(.setCPUID, Plan.cpuidBuffer.raw, 256).rax == 0)
        #expect(f.pv.cpuid?.entries.count == 256)
    }

    @Test func setCPUIDWithABufferOutsideL1MemoryFaults() throws {
        let f = try Fixture(.pv)
        // Entirely outside, straddling the end of the slot, and wrapping past 2^64.
        for gpa in [Plan.slotSize, Plan.slotSize - CPUIDEntry.byteSize, UInt64.max - 8] {
            let r = f.hypercall(.setCPUID, gpa, 2)
            #expect(r.rax == HypercallError.fault.returnValue, "gpa 0x\(String(gpa, radix: 16))")
        }
        #expect(f.pv.cpuid == nil)
        // The last whole entry of L1 memory is readable.
        #expect(f.hypercall(.setCPUID, Plan.slotSize - CPUIDEntry.byteSize, 1).rax == 0)
    }
}
