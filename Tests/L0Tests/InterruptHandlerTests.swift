import ABI
import GuestDevices
@testable import L0
import Testing
import Transport

/// L0's interrupt and TLB handlers with made-up exits (no processes): hostile values end in a
/// documented answer, never a trap in L0.
@Suite struct InterruptHandlerTests {
    func wrmsr(_ f: Fixture, _ msr: UInt32, _ value: UInt64) -> NextStep {
        f.l2Run[register: .rcx] = UInt64(msr)
        f.l2Run[register: .rdx] = value >> 32
        f.l2Run[register: .rax] = value & 0xFFFF_FFFF
        return f.l2Exit(L2ExitInfo(reason: .msrWrite, instructionLength: 2))
    }

    /// A steal-time GPA that wraps past 2^64 (found by a cold review: it trapped L0), one past
    /// what EPT02 covers, and reserved bits: none registers an area; reserved bits are #GP.
    @Test(arguments: [NestingPath.single, .pv])
    func aHostileStealTimeGPAIsRefusedWithoutATrap(_ path: NestingPath) throws {
        let f = try Fixture(path)
        #expect(wrmsr(f, KVMStealTime.msr, 0xFFFF_FFFF_FFFF_FFC1) == .resume(.l2))
        #expect(f.vcpu.shared.stealTime.allSatisfy { $0 == nil })
        #expect(wrmsr(f, KVMStealTime.msr, f.layout.l2AddressLimit | 1) == .resume(.l2))
        #expect(f.vcpu.shared.stealTime.allSatisfy { $0 == nil })
        #expect(wrmsr(f, KVMStealTime.msr, 0x7000 | 0x3) == .resume(.l2))
        #expect(f.l2Run[RunPage.eventInjection] == 1 << 31 | 3 << 8 | 1 << 11 | 13, "reserved bits: #GP")
        f.l2Run[RunPage.eventInjection] = 0
        #expect(wrmsr(f, KVMStealTime.msr, 0x7000 | 1) == .resume(.l2))
        #expect(f.vcpu.shared.stealTime.first == L2GPA(0x7000))
    }

    /// ICRs with every garbage vector, mode and destination, and PV IPIs with every bitmap:
    /// accepted, dropped or refused, never a trap; a flush hypercall naming vCPUs the VM does
    /// not have is -KVM_EINVAL.
    @Test func garbageIPIsAndFlushesAreDroppedOrRefused() throws {
        let f = try Fixture(.single)
        for value: UInt64 in [0, 0xF, 0xFF, ~0, 0x4_00FF, 0xFFFF_FFFF_0000_00B0, 0x3 << 18 | 0xB0, 0x7 << 8 | 0x30] {
            #expect(wrmsr(f, LocalAPICMSR.icr, value) == .resume(.l2))
            #expect(wrmsr(f, LocalAPICMSR.selfIPI, value) == .resume(.l2))
        }
        for (low, high, minID) in [(UInt64.max, UInt64.max, UInt64.max), (1, 0, UInt64.max - 1), (0, 1 << 63, 0)] {
            f.l2Run[register: .rax] = KVMHypercall.sendIPI
            f.l2Run[register: .rbx] = low; f.l2Run[register: .rcx] = high
            f.l2Run[register: .rdx] = minID; f.l2Run[register: .rsi] = 0xB0
            #expect(f.l2Exit(L2ExitInfo(reason: .vmcall, instructionLength: 3)) == .resume(.l2))
        }
        f.l2Run[register: .rax] = L2Hypercall.flushTLB.rawValue
        f.l2Run[register: .rbx] = ~0
        #expect(f.l2Exit(L2ExitInfo(reason: .vmcall, instructionLength: 3)) == .resume(.l2))
        #expect(f.l2Run[register: .rax] == HypercallError.invalid.returnValue)
    }
}
