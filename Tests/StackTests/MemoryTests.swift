import ABI
import L0
import L1PV
import L2Guest
import Testing

extension StackTests {
@Suite(.serialized) struct MemoryTests {
    @Test(arguments: NestingPath.allCases)
    func guestStoreIsVisibleToL1AtTheL1GPAItMapsTo(path: NestingPath) throws {
        let gpa = L2GPA(0x20_0000), pattern: UInt64 = 0x0BAD_CAFE_1234_5678 ^ UInt64(path.rawValue.count)
        let (result, stack) = try runStack(path, program: "memory-probe", args: [gpa.raw, pattern])
        #expect(result.succeeded, "\(result.stop)")
        let l1gpa = L1MemoryPlan.backing(of: gpa)!
        #expect(try stack.vcpu.l1Memory.load64(l1gpa) == pattern)
        #expect(result.harness.syncs.first == [gpa.raw, pattern, 0, 0, 0, 0])
    }

    @Test(arguments: NestingPath.allCases)
    func accessOutsideAnythingL1MappedIsAnExitL1SeesNotACrash(path: NestingPath) throws {
        let (result, _) = try runStack(path, program: "memory-probe")
        #expect(result.succeeded, "\(result.stop)")
        // Nested: the unmapped read was delivered to L1, which completed it as unassigned memory.
        // One level: L0 (the guest's only hypervisor) completed it the same way.
        // pvm-rfc: a shadow #PF L1 completed as MMIO, through the switcher (L0 saw no L2 exit).
        if path.usesSwitcher {
            #expect(result.counters[switcher: .mmioEmulations] == 1 && result.counters.totalL2Exits == 0)
        } else {
            #expect(result.counters.deliveries[Int(ExitReason.eptViolation.rawValue)] == (path.isNested ? 1 : 0))
        }
        #expect(result.harness.syncs.last == [unmappedProbeGPA.raw, ~0, 0, 0, 0, 0])
    }
}
}
