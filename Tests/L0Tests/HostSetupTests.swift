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

    /// Nothing is spent: the host counts the work the model prices. Who does it is the point of
    /// the seeds: the load with enable_virt_at_load, else the first VM; the setup once.
    @Suite struct CountedWork {
        @Test func enablingIsDoneByTheLoadOrByTheFirstVM() throws {
            let cpus = 4
            let eager = try L0Host(cpuCount: cpus, enableVirtAtLoad: true)
            #expect(eager.status.perCPUEnableAttempts == cpus)
            _ = try eager.createVM()
            #expect(eager.status.perCPUEnableAttempts == cpus)   // the first VM enabled nothing

            let lazy = try L0Host(cpuCount: cpus, enableVirtAtLoad: false)
            #expect(lazy.status.perCPUEnableAttempts == 0)
            _ = try lazy.createVM()
            #expect(lazy.status.perCPUEnableAttempts == cpus)
        }

        @Test func theOneTimeSetupIsAttemptedOnce() throws {
            let host = try L0Host(cpuCount: 2, oneTimeSetup: .onFirstProtectedVM)
            _ = try host.createVM(type: .tdx)
            _ = try host.createVM(type: .tdx)
            #expect(host.status.oneTimeSetupAttempts == 1 && host.status.oneTimeSetupRuns == 1)
        }
    }
}
