import ABI
import Testing
import Transport
@testable import L0

/// vmcs02's MSR bitmap: an MSR passes through to L2 only where L0 and L1 both let it.
@Suite struct L2MSRBitmapTests {
    func l2Intercepts(_ f: Fixture, _ msr: UInt32, write: Bool) throws -> Bool {
        let (byte, bit) = MSRBitmap.position(of: msr, write: write)!
        let b: UInt8 = try f.control.l2Tables.load(at: (f.layout.l2MSRBitmap(0) + byte).raw)
        return b & (1 << bit) != 0
    }

    @Test func everythingIsInterceptedBeforeAnyEntry() throws {
        let f = try Fixture(.nvmx)
        for msr in PassthroughMSRs.all + [0x3B, 0x1A0] { #expect(try l2Intercepts(f, msr, write: false)) }
    }

    @Test func anMSRL1PassesThroughReachesL2WithoutExitsAndOneItInterceptsDoesNot() throws {
        let f = try Fixture(.nvmx)
        let v = try f.loadValidVMCS12()
        // L1's bitmap: intercept everything but reads of KERNEL_GS_BASE.
        for i in stride(from: UInt64(0), to: pageSize, by: 8) { try f.store64(~0, L1GPA(Plan.msrBitmap.raw + i)) }
        let (byte, bit) = MSRBitmap.position(of: 0xC000_0102, write: false)!
        try f.store8(~(UInt8(1) << bit), L1GPA(Plan.msrBitmap.raw + byte))
        f.l1SetField(.msrBitmap, Plan.msrBitmap.raw)
        f.l1SetField(.cpuBasedVMExecControl, v[.cpuBasedVMExecControl] | CPUBased.useMSRBitmaps)
        #expect(f.vmx(.vmlaunch) == .enterL2)
        #expect(try !l2Intercepts(f, 0xC000_0102, write: false))
        #expect(try l2Intercepts(f, 0xC000_0102, write: true))
        #expect(try l2Intercepts(f, 0xC000_0100, write: false))
        #expect(f.vcpu.counters.msrBitmapMerges == 1)
    }

    @Test func withoutAnMSRBitmapInVMCS12EveryMSRIsIntercepted() throws {
        let f = try Fixture(.nvmx)
        try f.launchL2()
        for msr in PassthroughMSRs.all { #expect(try l2Intercepts(f, msr, write: false) && l2Intercepts(f, msr, write: true)) }
    }

    @Test func pvPassthroughPolicyClearsTheBitsAndOnlyForMSRsL0CanPassThrough() throws {
        let f = try Fixture(.pv)
        func policy(_ msr: UInt32, _ action: PVMSRAction, value: UInt64 = 0) throws -> UInt64 {
            try f.store64(UInt64(msr) | UInt64(action.rawValue) << 32, L1GPA(Plan.argumentPage.raw + PVMSRPolicyEntry.index))
            try f.store64(value, L1GPA(Plan.argumentPage.raw + PVMSRPolicyEntry.value))
            try f.store64(0, L1GPA(Plan.argumentPage.raw + PVMSRPolicyEntry.writableMask))
            return f.hypercall(.setMSRPolicy, 1).rax
        }
        #expect(try policy(0x3B, .passthrough) == HypercallError.invalid.returnValue)
        #expect(try policy(0xC000_0102, .passthrough, value: 0x1234) == 0)
        #expect(try !l2Intercepts(f, 0xC000_0102, write: false) && !l2Intercepts(f, 0xC000_0102, write: true))
        #expect(f.vcpu.l2PassthroughMSRs[0xC000_0102] == 0x1234)
        // Back to L1: the bits are set again.
        #expect(try policy(0xC000_0102, .passToL1) == 0)
        #expect(try l2Intercepts(f, 0xC000_0102, write: false))
    }
}
