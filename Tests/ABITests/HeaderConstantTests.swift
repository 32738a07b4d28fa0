import ABI
import Testing

/// The ABI takes its numbers from linux-libc-dev; these pin the ones the stack depends on to the
/// architectural values, so a header or table mix-up shows up here and not in a benchmark.
@Suite struct HeaderConstantTests {
    @Test func exitReasonsAreTheArchitecturalNumbers() {
        #expect(ExitReason.cpuid.rawValue == 10)
        #expect(ExitReason.hlt.rawValue == 12)
        #expect(ExitReason.vmcall.rawValue == 18)
        #expect(ExitReason.vmread.rawValue == 23)
        #expect(ExitReason.vmresume.rawValue == 24)
        #expect(ExitReason.vmwrite.rawValue == 25)
        #expect(ExitReason.ioInstruction.rawValue == 30)
        #expect(ExitReason.invalidState.rawValue == 33)
        #expect(ExitReason.eptViolation.rawValue == 48)
        #expect(ExitReason.eptMisconfig.rawValue == 49)
        #expect(ExitReason.invept.rawValue == 50)
        #expect(ExitReason.failedVMEntryFlag == 0x8000_0000)
    }

    @Test func exitReasonNamesAreKVMs() {
        #expect(ExitReason.cpuid.name == "CPUID")
        #expect(ExitReason.vmresume.name == "VMRESUME")
        #expect(ExitReason(rawValue: 33 | 0x8000_0000).name == "FAILED_VMENTRY|INVALID_STATE")
        #expect(ExitReason(rawValue: 77).name == "EXIT_77")
    }

    @Test func hypercallErrorsAreKVMCodesNegated() {
        #expect(HypercallError.noSys.code == 1000)
        #expect(HypercallError.invalid.code == 22)
        #expect(HypercallError.fault.code == 14)
        #expect(HypercallError.tooBig.code == 7)
        #expect(Int64(bitPattern: HypercallError.noSys.returnValue) == -1000)
        for e in HypercallError.all {
            #expect(HypercallError.from(returnValue: e.returnValue) == e)
        }
        #expect(HypercallError.from(returnValue: 0) == nil)
        #expect(HypercallError.from(returnValue: 42) == nil)
    }

    @Test func cpuidEntryHasKVMsLayout() {
        #expect(CPUIDEntry.byteSize == 40)
        #expect(CPUIDEntry.wordOffsets == [0, 4, 8, 12, 16, 20, 24])
        #expect(CPUIDEntry.significantIndex == 1)
    }

    @Test func memslotRoundTripsThroughTheUAPIStruct() {
        let s = MemorySlot(slot: 3, flags: MemorySlot.readOnlyFlag, guestPhysAddr: L1GPA(0x10_0000),
                           memorySize: 0x20_0000, hostOffset: HostOffset(0x40_0000))
        #expect(MemorySlot(s.uapi) == s)
        #expect(s.uapi.userspace_addr == 0x40_0000)
        #expect(MemorySlot.readOnlyFlag == 2)
    }
}
