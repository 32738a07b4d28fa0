@testable import Bench
@testable import Bench
import Glibc
import Testing
import Transport

/// The rings the transport suite measures against: the same-core ring runs its end on the
/// guest core and gives the calling thread its CPUs back, and a CPU it may not use is a typed
/// error, not a measurement taken somewhere else.
extension StackTests {
@Suite(.serialized, .timeLimit(.minutes(1))) struct RawRingTests {
    @Test func theSameCoreRingMeasuresOnTheGuestCoreAndGivesTheCPUsBack() throws {
        let placement = CPUPlacement.automatic()
        guard let cpu = placement.guestCPU, placement.isPinned else { return }   // one CPU: nothing to pin
        let before = CPUPlacement.allowedCPUMask
        let runs = try RawRing.measureSameCore(executable: PVMBinary.path, arguments: ["__ring", "--cpu", "\(cpu)"], cpu: cpu,
                                               roundTrips: 2_000, runs: 2)
        #expect(runs.count == 2 && runs.allSatisfy { $0 > 0 }, "\(runs)")
        #expect(CPUPlacement.allowedCPUMask == before)
    }

    /// An echo that never answers (here: a program that is not the ring's) ends the measurement
    /// with the ring's typed error, after the thread was pinned: its CPUs come back even so.
    @Test func aRingWhoseEchoDiesFailsTypedAndGivesTheCPUsBack() throws {
        let placement = CPUPlacement.automatic()
        guard let cpu = placement.guestCPU, placement.isPinned else { return }
        let before = CPUPlacement.allowedCPUMask
        #expect {
            try RawRing.measureSameCore(executable: "/bin/true", arguments: [], cpu: cpu, roundTrips: 10, runs: 1)
        } throws: { error in
            if case TransportError.ringEchoGone = error { true } else { false }
        }
        #expect(CPUPlacement.allowedCPUMask == before)
    }

    @Test func aCPUTheRingMayNotUseIsRefusedAndChangesNothing() throws {
        // A CPU this machine does not have (a thread's current mask is no guide: a stack run
        // in this process may have pinned it).
        guard sysconf(Int32(_SC_NPROCESSORS_CONF)) < 64 else { return }
        let outside = 63
        let before = CPUPlacement.allowedCPUMask
        #expect(throws: TransportError.cannotRunOnCPU(outside, errno: EINVAL)) {
            try RawRing.measureSameCore(executable: PVMBinary.path, arguments: ["__ring"], cpu: outside, roundTrips: 10, runs: 1)
        }
        #expect(CPUPlacement.allowedCPUMask == before)
    }

    /// The table says what the switch floor means only where a nested path is in it, in the
    /// run's own figure.
    @Test func theTransportTableStatesTheNestedFloorFromTheSwitchItMeasured() {
        func result(_ path: String, switchNanos: Double?) -> TransportSuite.Result {
            TransportSuite.Result(rawNanosPerHop: 200, rawRuns: [200], sameCoreSwitchNanos: switchNanos,
                                  sameCoreRuns: switchNanos.map { [$0] } ?? [],
                                  rows: [.init(path: path, test: "cpuid", medianNanos: 3000, hopsPerOp: 4, nanosPerHop: 750, overRawHop: 3.75)])
        }
        let nested = TransportSuite.table(result("nvmx", switchNanos: 1000))
        #expect(nested.contains("same-core switch: 1000 ns per hop") && nested.contains("at least 2 x 1000 = 2000 ns"), "\(nested)")
        #expect(!TransportSuite.table(result("pv", switchNanos: 1000)).contains("at least"))
        let unpinned = TransportSuite.table(result("nvmx", switchNanos: nil))
        #expect(!unpinned.contains("same-core switch") && !unpinned.contains("at least"), "\(unpinned)")
    }
}
}
