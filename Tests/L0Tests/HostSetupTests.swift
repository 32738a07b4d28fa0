import ABI
import Testing
@testable import L0

extension HostTests {
    @Suite struct OneTimeSetupTiming {
        @Test func offMeansNeverAndTheTypesThatNeedItAreNotOffered() throws {
            let host = try HostTests.host(atLoad: true)
            #expect(!host.supportedVMTypes.contains(.tdx))
            #expect(throws: HostError.vmTypeNeedsOneTimeSetup(.tdx)) { try host.createVM(type: .tdx) }
            _ = try host.createVM()
            _ = try host.createVM(type: .swProtected)
            #expect(host.status.oneTimeSetupAttempts == 0 && host.usageCount == 3)
        }

        @Test(arguments: [true, false])
        func atLoadItRunsOnceBeforeAnyVM(atLoad: Bool) throws {
            let host = try HostTests.host(atLoad: atLoad, setup: .atLoad)
            #expect(host.status.oneTimeSetupRuns == 1)
            // Without enable_virt_at_load, virtualization was on only for the setup's duration.
            #expect(host.usageCount == (atLoad ? 1 : 0) && host.enabledCPUs.isEmpty != atLoad)
            #expect(host.status.perCPUEnables == 4)
            _ = try host.createVM(type: .tdx)
            _ = try host.createVM(type: .tdx)
            #expect(host.status.oneTimeSetupRuns == 1 && host.status.oneTimeSetupAttempts == 1)
        }

        @Test(arguments: [true, false])
        func onDemandItRunsOnceAtTheFirstProtectedVM(atLoad: Bool) throws {
            let host = try HostTests.host(atLoad: atLoad, setup: .onFirstProtectedVM)
            #expect(host.status.oneTimeSetupAttempts == 0)
            let plain = try host.createVM(type: .swProtected)
            #expect(host.status.oneTimeSetupAttempts == 0)
            let first = try host.createVM(type: .tdx)
            #expect(host.status.oneTimeSetupRuns == 1)
            for vm in [plain, first] { try host.destroyVM(vm) }
            _ = try host.createVM(type: .tdx)
            #expect(host.status.oneTimeSetupRuns == 1 && host.status.oneTimeSetupAttempts == 1)
        }
    }

    /// The costs are spent, so a clock sees them. Lower bounds only: a busy machine can only add.
    @Suite struct Costs {
        static func timed<T>(_ body: () throws -> T) rethrows -> (T, UInt64) {
            let start = ContinuousClock.now
            let r = try body()
            let d = ContinuousClock.now - start
            return (r, UInt64(d.components.seconds) * 1_000_000_000 + UInt64(d.components.attoseconds / 1_000_000_000))
        }

        @Test func enablingCostIsPaidByTheLoadOrByTheFirstVM() throws {
            let cost: UInt64 = 1_000_000, cpus = 4
            let (eager, loadNanos) = try Self.timed {
                try L0Host(cpuCount: cpus, enableVirtAtLoad: true, enableCostNanos: cost)
            }
            #expect(loadNanos >= UInt64(cpus) * cost)
            _ = try eager.createVM()
            #expect(eager.status.perCPUEnables == cpus)   // the first VM enabled nothing

            let lazy = try L0Host(cpuCount: cpus, enableVirtAtLoad: false, enableCostNanos: cost)
            let (_, firstVMNanos) = try Self.timed { try lazy.createVM() }
            #expect(firstVMNanos >= UInt64(cpus) * cost)
        }

        @Test func theOneTimeSetupCostIsPaidOnce() throws {
            let cost: UInt64 = 5_000_000
            let host = try L0Host(cpuCount: 2, enableCostNanos: 0, oneTimeSetup: .onFirstProtectedVM,
                                  oneTimeSetupCostNanos: cost)
            let (_, first) = try Self.timed { try host.createVM(type: .tdx) }
            let (_, second) = try Self.timed { try host.createVM(type: .tdx) }
            #expect(first >= cost && second < first)
        }
    }
}
