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

    static let sample = TierLaunch(tier: .l1, parent: 99, path: .pv, vcpu: 0,
                                   layout: ControlLayout(vcpuCount: 1, l2AddressLimit: 4 << 30),
                                   l1Slot: MemorySlot(slot: 0, guestPhysAddr: L1GPA(0), memorySize: 512 << 20, hostOffset: HostOffset(256 << 20)),
                                   cpu: nil)

    /// No silent defaults: every key must be there, once, and known; numbers in range.
    @Test func aSpecWithAKeyMissingUnknownRepeatedOrOutOfRangeIsRefused() throws {
        let parts = Self.sample.encoded.split(separator: ",").map(String.init)
        #expect(parts.count == TierLaunch.keys.count)
        for i in parts.indices {
            var missing = parts
            missing.remove(at: i)
            #expect(throws: TierLaunch.BadSpec.self, "without \(parts[i])") { try TierLaunch(decoding: missing.joined(separator: ",")) }
        }
        let spec = Self.sample.encoded
        for bad in [spec + ",colour=blue", spec + ",tier=1", spec.replacingOccurrences(of: "vcpu=0", with: "vcpu=99999"),
                    spec.replacingOccurrences(of: "tier=1", with: "tier=4294967297"), spec.replacingOccurrences(of: "cpu=none", with: "cpu=-1"),
                    spec.replacingOccurrences(of: "vcpus=1", with: "vcpus=0"), spec.replacingOccurrences(of: "vcpu=0", with: "vcpu=1"),
                    spec.replacingOccurrences(of: "l2limit=4294967296", with: "l2limit=4294967297"),
                    spec.replacingOccurrences(of: "l2limit=4294967296", with: "l2limit=0"),
                    spec + ","] {
            #expect(throws: TierLaunch.BadSpec.self, "\(bad)") { try TierLaunch(decoding: bad) }
        }
    }

    /// A spec from another launch ABI or build is refused by the child, naming both sides.
    @Test func aSpecFromAnotherBuildIsRefusedNamingBothVersions() throws {
        #expect(throws: Never.self) { try Self.sample.checkSameBuild() }
        var other = Self.sample
        other.build = "0123abcd"
        #expect(throws: TierLaunch.OtherBuild.self) { try other.checkSameBuild() }
        other = Self.sample
        other.abi = LaunchABI.version + 1
        let decoded = try TierLaunch(decoding: other.encoded)
        do {
            try decoded.checkSameBuild()
            Issue.record("another launch ABI was accepted")
        } catch {
            #expect(error.l0ABI == LaunchABI.version + 1 && error.tierABI == LaunchABI.version)
            #expect("\(error)".contains("launch ABI \(LaunchABI.version + 1)") && "\(error)".contains("refusing to start"))
        }
    }
}
