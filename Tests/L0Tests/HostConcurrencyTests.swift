import ABI
import Testing
@testable import L0

extension HostTests {
    @Suite struct Concurrency {
        /// VMs come and go on several threads while a CPU goes on and off line: the count ends
        /// where it started and the enabling rule holds.
        @Test(arguments: [true, false])
        func createDestroyAndHotplugRaceSafely(atLoad: Bool) async throws {
            let host = try HostTests.host(atLoad: atLoad, setup: .onFirstProtectedVM)
            let baseline = host.usageCount
            try await withThrowingTaskGroup(of: Void.self) { group in
                for worker in 0..<6 {
                    group.addTask {
                        for i in 0..<200 {
                            let vm = try host.createVM(type: (worker + i) % 3 == 0 ? .tdx : .default)
                            try host.destroyVM(vm)
                        }
                    }
                }
                group.addTask {
                    for _ in 0..<200 {
                        try host.cpuOffline(3)
                        try host.cpuOnline(3)
                    }
                }
                try await group.waitForAll()
            }
            let s = host.status
            #expect(s.usageCount == baseline && s.vms.isEmpty && s.enablingRuleHolds)
            #expect(s.oneTimeSetupRuns == 1 && s.onlineCPUs == HostTests.allCPUs)
        }
    }
}
