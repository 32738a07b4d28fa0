import ABI
import Testing
@testable import Transport

@Suite struct TierLaunchTests {
    @Test func launchSpecRoundTrips() throws {
        let l = TierLaunch(tier: .l2, parent: 1234, path: .nvmxNoShadow, vcpu: 0,
                           layout: ControlLayout(vcpuCount: 1, l2AddressLimit: 4 << 30),
                           l1Slot: MemorySlot(slot: 0, guestPhysAddr: L1GPA(0), memorySize: 512 << 20, hostOffset: HostOffset(256 << 20)),
                           cpu: 1, program: "cpuid", programArguments: [100, 10])
        #expect(try TierLaunch(decoding: l.encoded) == l)
        var none = l
        none.cpu = nil
        none.programArguments = []
        #expect(try TierLaunch(decoding: none.encoded) == none)
    }

    @Test func malformedSpecIsRefused() {
        #expect(throws: TierLaunch.BadSpec.self) { try TierLaunch(decoding: "tier=9,parent=1") }
        #expect(throws: TierLaunch.BadSpec.self) { try TierLaunch(decoding: "garbage") }
    }
}
