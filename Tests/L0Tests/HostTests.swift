import ABI
import Testing
@testable import L0

/// The host model (`L0Host`): virtualization enabling per CPU under one usage count, hotplug,
/// suspend/resume, the one-time setup, VM types and the PV-nesting policy. No processes; the
/// costs are 0 except where a test measures them. `swift test --filter HostTests` runs them all.
@Suite struct HostTests {
    /// A host with free enabling, so tests are fast, and every hardware type unless told otherwise.
    static func host(cpus: Int = 4, atLoad: Bool, setup: OneTimeSetupPolicy = .off,
                     types: VMTypeMask = L0Host.defaultHardwareVMTypes,
                     failing: Set<Int> = [], failSetup: Bool = false) throws -> L0Host {
        try L0Host(cpuCount: cpus, enableVirtAtLoad: atLoad, oneTimeSetup: setup,
                   hardwareVMTypes: types, failingEnableCPUs: failing,
                   failOneTimeSetup: failSetup)
    }
    static let allCPUs: Set<Int> = [0, 1, 2, 3]
}

extension HostTests {
    @Suite struct UsageCount {
        @Test func atLoadTheHostHoldsAReferenceAndEachVMAnother() throws {
            let host = try HostTests.host(atLoad: true)
            #expect(host.usageCount == 1 && host.enabledCPUs == HostTests.allCPUs)
            let a = try host.createVM(), b = try host.createVM()
            #expect(host.usageCount == 3 && host.vms == [a, b])
            #expect(host.status.perCPUEnables == 4)   // VMs reuse what load enabled
            try host.destroyVM(a)
            try host.destroyVM(b)
            #expect(host.usageCount == 1 && host.enabledCPUs == HostTests.allCPUs)
            try host.unload()
            #expect(host.usageCount == 0 && host.enabledCPUs.isEmpty && host.status.enablingRuleHolds)
        }

        @Test func withoutAtLoadCPUsAreEnabledOnlyWhileVMsExist() throws {
            let host = try HostTests.host(atLoad: false)
            #expect(host.usageCount == 0 && host.enabledCPUs.isEmpty && host.status.perCPUEnables == 0)
            let a = try host.createVM()
            #expect(host.usageCount == 1 && host.enabledCPUs == HostTests.allCPUs)
            let b = try host.createVM()
            #expect(host.usageCount == 2 && host.status.perCPUEnables == 4)
            try host.destroyVM(a)
            #expect(host.usageCount == 1 && host.enabledCPUs == HostTests.allCPUs)
            try host.destroyVM(b)
            #expect(host.usageCount == 0 && host.enabledCPUs.isEmpty)
            #expect(host.status.perCPUDisables == 4)
            // The next first VM enables them all again.
            _ = try host.createVM()
            #expect(host.enabledCPUs == HostTests.allCPUs && host.status.perCPUEnables == 8)
        }

        @Test func destroyingAnUnknownOrDestroyedVMIsRefusedAndChangesNothing() throws {
            let host = try HostTests.host(atLoad: false)
            let vm = try host.createVM()
            try host.destroyVM(vm)
            #expect(throws: HostError.noSuchVM(vm.id)) { try host.destroyVM(vm) }
            #expect(throws: HostError.noSuchVM(99)) { try host.destroyVM(VMHandle(id: 99, type: .default)) }
            #expect(host.usageCount == 0 && host.enabledCPUs.isEmpty)
        }

        @Test func unloadIsRefusedWhileVMsExistAndEndsTheHost() throws {
            let host = try HostTests.host(atLoad: true)
            let vm = try host.createVM()
            #expect(throws: HostError.vmsStillExist(1)) { try host.unload() }
            #expect(host.usageCount == 2)
            try host.destroyVM(vm)
            try host.unload()
            #expect(throws: HostError.unloaded) { try host.createVM() }
            #expect(!host.status.loaded && host.usageCount == 0)
        }

        @Test func vmIDsAreNotReused() throws {
            let host = try HostTests.host(atLoad: true)
            let a = try host.createVM()
            try host.destroyVM(a)
            let b = try host.createVM()
            #expect(a.id != b.id)
        }
    }

    @Suite struct Rollback {
        @Test func aFailingCPURollsBackTheAttemptAndNamesTheCPU() throws {
            let host = try HostTests.host(atLoad: false, failing: [2])
            #expect(throws: HostError.enableFailed(cpu: 2)) { try host.createVM() }
            let s = host.status
            #expect(s.usageCount == 0 && s.enabledCPUs.isEmpty && s.vms.isEmpty && s.enablingRuleHolds)
            // CPUs 0 and 1 were enabled by the attempt and disabled again; 3 was never reached.
            #expect(s.perCPUEnables == 2 && s.perCPUDisables == 2)
            #expect(HostError.enableFailed(cpu: 2).description.contains("CPU 2"))

            host.setEnableFailure(cpu: 2, failing: false)
            let vm = try host.createVM()
            #expect(host.usageCount == 1 && host.enabledCPUs == HostTests.allCPUs && host.vms == [vm])
        }

        @Test func theFirstCPUFailingLeavesNothingToRollBack() throws {
            let host = try HostTests.host(atLoad: false, failing: [0])
            #expect(throws: HostError.enableFailed(cpu: 0)) { try host.createVM() }
            #expect(host.status.perCPUEnables == 0 && host.usageCount == 0)
        }

        @Test func aFailureOnlyMattersWhenAnEnableHappens() throws {
            let host = try HostTests.host(atLoad: false)
            let first = try host.createVM()
            host.setEnableFailure(cpu: 3, failing: true)
            // The count is > 0: every CPU is already on, so the second VM enables nothing.
            let second = try host.createVM()
            #expect(host.usageCount == 2)
            try host.destroyVM(first)
            try host.destroyVM(second)
            #expect(throws: HostError.enableFailed(cpu: 3)) { try host.createVM() }
            #expect(host.usageCount == 0 && host.enabledCPUs.isEmpty)
        }

        @Test func aFailingCPUAtLoadFailsTheLoad() throws {
            #expect(throws: HostError.enableFailed(cpu: 1)) { try HostTests.host(atLoad: true, failing: [1]) }
            // Without enable_virt_at_load the load enables nothing, so it cannot fail.
            let host = try HostTests.host(atLoad: false, failing: [1])
            #expect(host.usageCount == 0)
        }

        @Test func aFailedOneTimeSetupDropsTheVMsReference() throws {
            for atLoad in [true, false] {
                let host = try HostTests.host(atLoad: atLoad, setup: .onFirstProtectedVM, failSetup: true)
                let before = host.status
                #expect(throws: HostError.oneTimeSetupFailed) { try host.createVM(type: .tdx) }
                let after = host.status
                #expect(after.usageCount == before.usageCount && after.enabledCPUs == before.enabledCPUs)
                #expect(after.vms.isEmpty && !after.oneTimeSetupDone && after.enablingRuleHolds)

                host.setOneTimeSetupFailure(false)
                _ = try host.createVM(type: .tdx)
                #expect(host.status.oneTimeSetupRuns == 1 && host.status.oneTimeSetupAttempts == 2)
            }
        }

        @Test func aFailedOneTimeSetupAtLoadFailsTheLoad() {
            for atLoad in [true, false] {
                #expect(throws: HostError.oneTimeSetupFailed) {
                    try HostTests.host(atLoad: atLoad, setup: .atLoad, failSetup: true)
                }
            }
        }
    }

    @Suite struct Hotplug {
        @Test(arguments: [true, false])
        func offliningACPUWithVMsRunningDisablesItAndOnliningEnablesIt(atLoad: Bool) throws {
            let host = try HostTests.host(atLoad: atLoad)
            let vm = try host.createVM()
            try host.cpuOffline(1)
            #expect(host.enabledCPUs == [0, 2, 3] && host.onlineCPUs == [0, 2, 3])
            #expect(host.vms == [vm] && host.status.enablingRuleHolds)
            try host.cpuOnline(1)
            #expect(host.enabledCPUs == HostTests.allCPUs && host.status.enablingRuleHolds)
        }

        @Test(arguments: [true, false])
        func aCPUComesOnlineEnabledIffTheCountIsPositive(atLoad: Bool) throws {
            let host = try HostTests.host(atLoad: atLoad)
            try host.cpuOffline(2)
            try host.cpuOnline(2)
            #expect(host.enabledCPUs.contains(2) == atLoad)   // no VM: count is 1 only at load
            #expect(host.status.enablingRuleHolds)
        }

        @Test func aCPUOfflineWhenTheFirstVMIsCreatedIsEnabledWhenItComesBack() throws {
            let host = try HostTests.host(atLoad: false)
            try host.cpuOffline(3)
            let vm = try host.createVM()
            #expect(host.enabledCPUs == [0, 1, 2])
            try host.cpuOnline(3)
            #expect(host.enabledCPUs == HostTests.allCPUs)
            try host.destroyVM(vm)
            #expect(host.enabledCPUs.isEmpty && host.onlineCPUs == HostTests.allCPUs)
        }

        @Test func aCPUWhoseEnableFailsStaysOffline() throws {
            let host = try HostTests.host(atLoad: false)
            _ = try host.createVM()
            try host.cpuOffline(1)
            host.setEnableFailure(cpu: 1, failing: true)
            #expect(throws: HostError.enableFailed(cpu: 1)) { try host.cpuOnline(1) }
            #expect(!host.onlineCPUs.contains(1) && host.status.enablingRuleHolds && host.usageCount == 1)
            host.setEnableFailure(cpu: 1, failing: false)
            try host.cpuOnline(1)
            #expect(host.enabledCPUs == HostTests.allCPUs)
        }

        @Test func repeatedTransitionsAreNoOpsAndBadCPUsAreRefused() throws {
            let host = try HostTests.host(cpus: 2, atLoad: true)
            try host.cpuOnline(0)
            try host.cpuOffline(1)
            try host.cpuOffline(1)
            #expect(host.status.perCPUDisables == 1)
            #expect(throws: HostError.lastOnlineCPU(0)) { try host.cpuOffline(0) }
            #expect(throws: HostError.noSuchCPU(2, cpuCount: 2)) { try host.cpuOnline(2) }
            #expect(throws: HostError.noSuchCPU(-1, cpuCount: 2)) { try host.cpuOffline(-1) }
            #expect(host.onlineCPUs == [0] && host.enabledCPUs == [0])
        }
    }

    @Suite struct SuspendResume {
        @Test(arguments: [true, false])
        func vmsSurviveSuspendAndCPUsAreEnabledAgainOnResume(atLoad: Bool) throws {
            let host = try HostTests.host(atLoad: atLoad)
            let a = try host.createVM(), b = try host.createVM(type: .swProtected)
            let count = host.usageCount
            host.suspend()
            #expect(host.enabledCPUs.isEmpty && host.status.suspended)
            #expect(host.vms == [a, b] && host.usageCount == count)
            #expect(throws: HostError.suspended) { try host.createVM() }
            #expect(throws: HostError.suspended) { try host.destroyVM(a) }
            #expect(throws: HostError.suspended) { try host.cpuOffline(1) }
            #expect(host.resume().isEmpty)
            #expect(host.enabledCPUs == HostTests.allCPUs && host.vms == [a, b] && host.status.enablingRuleHolds)
            try host.destroyVM(a)
            try host.destroyVM(b)
            #expect(host.enabledCPUs.isEmpty != atLoad)
        }

        @Test(arguments: [true, false])
        func withoutVMsResumeRestoresWhatTheCountSays(atLoad: Bool) throws {
            let host = try HostTests.host(atLoad: atLoad)
            host.suspend()
            #expect(host.enabledCPUs.isEmpty)
            host.resume()
            #expect(host.enabledCPUs == (atLoad ? HostTests.allCPUs : []) && host.status.enablingRuleHolds)
        }

        @Test func anOfflineCPUStaysOfflineAcrossSuspend() throws {
            let host = try HostTests.host(atLoad: true)
            try host.cpuOffline(2)
            host.suspend()
            host.resume()
            #expect(host.enabledCPUs == [0, 1, 3] && host.onlineCPUs == [0, 1, 3])
        }

        @Test func aCPUThatFailsToResumeIsLeftOfflineAndReported() throws {
            let host = try HostTests.host(atLoad: false)
            let vm = try host.createVM()
            host.suspend()
            host.setEnableFailure(cpu: 3, failing: true)
            #expect(host.resume() == [3])
            #expect(host.onlineCPUs == [0, 1, 2] && host.enabledCPUs == [0, 1, 2] && host.status.enablingRuleHolds)
            #expect(host.vms == [vm])
        }

        @Test func suspendAndResumeTwiceAreNoOps() throws {
            let host = try HostTests.host(atLoad: true)
            host.suspend()
            host.suspend()
            host.resume()
            host.resume()
            #expect(host.enabledCPUs == HostTests.allCPUs && host.status.perCPUEnables == 8)
        }
    }
}
