import ABI
import CPVMShim
#if canImport(Glibc)
import Glibc
#endif

/// The transport's floor, measured: two processes handing one turn back and forth through a
/// handoff lane (`Handoff`), pinned and waiting exactly as L0 and a child tier do in a stack
/// (`CPUPlacement`), with no exit in between. Per hop it is what a stack's transition costs
/// before any tier does any work: `pvm bench --suite transport` sets each path's per-hop
/// figure beside it, measured in the same run.
public enum RawRing {
    /// The echo side, in its own process (`pvm __ring`): descriptor 3 is the lane's memfd.
    /// Answers every turn given to it until the lane says stop, then exits 0.
    public static func echo(cpu: Int?) -> Never {
        let placement = CPUPlacement(l0CPU: nil, guestCPU: cpu)
        placement.apply(as: .l1)
        guard let region = try? SharedRegion(adopt: 3, name: "pvm-ring", writable: true) else { exit(2) }
        let lane = Handoff(region: region, base: ControlOffset(0))
        let policy = placement.waitPolicy(for: .l1)
        while true {
            switch lane.wait(for: .l1, policy: policy) {
            case .myTurn: lane.pass(to: .l0)
            case .stop: exit(0)
            case .peerGone: exit(1)
            case .timedOut: preconditionFailure("the echo waits with no deadline")
            }
        }
    }

    /// One ring: `executable` started as the echo (`arguments`), then `runs` runs of
    /// `roundTrips` round trips after a warm-up; ns per hop (half a round trip) of each run.
    /// This end runs as L0 does: on L0's core, spinning.
    public static func measure(executable: String, arguments: [String], placement: CPUPlacement,
                               roundTrips: Int, runs: Int) throws -> [Double] {
        placement.apply(as: .l0)
        return try ring(executable: executable, arguments: arguments, policy: placement.waitPolicy(for: .l0),
                        roundTrips: roundTrips, runs: runs)
    }

    /// The same ring with this end on the echo's core (`cpu`), yielding as a child tier waits:
    /// each hop is one process giving the core to another, what the guest core pays twice per
    /// nVMX round trip, where L1 and L2 share it (L2 exits, L1 runs; L1 resumes L2). The calling
    /// thread's CPU affinity is what it was afterwards.
    public static func measureSameCore(executable: String, arguments: [String], cpu: Int,
                                       roundTrips: Int, runs: Int) throws -> [Double] {
        var saved = pvm_cpu_set()
        let read = pvm_get_affinity(&saved)
        guard read == 0 else { throw TransportError.cannotReadAffinity(errno: -read) }
        defer { _ = pvm_set_affinity(&saved) }
        let pinned = pvm_pin_to_cpu(Int32(cpu))
        guard pinned == 0 else { throw TransportError.cannotRunOnCPU(cpu, errno: -pinned) }
        return try ring(executable: executable, arguments: arguments,
                        policy: CPUPlacement(l0CPU: nil, guestCPU: cpu).waitPolicy(for: .l1),
                        roundTrips: roundTrips, runs: runs)
    }

    static func ring(executable: String, arguments: [String], policy: WaitPolicy,
                     roundTrips: Int, runs: Int) throws -> [Double] {
        let region = try SharedRegion(create: "pvm-ring", size: pageSize)
        try region.seal(name: "pvm-ring", futureWrite: false)   // as every memfd L0 shares: no shrinking
        let lane = Handoff(region: region, base: ControlOffset(0))
        let echo = try ChildProcess(tier: .l1, path: executable, arguments: arguments, fds: [region.fd])
        defer {
            lane.stop()
            if echo.wait(timeoutNanos: 2_000_000_000) == nil { echo.killAndReap() }
        }
        let alive = { echo.poll() == nil }
        func roundTrip() throws {
            lane.pass(to: .l1)
            guard lane.wait(for: .l0, policy: policy, isPeerAlive: alive) == .myTurn else {
                throw TransportError.ringEchoGone(status: echo.poll()?.description ?? "no answer")
            }
        }
        for _ in 0..<min(roundTrips, 10_000) { try roundTrip() }
        return try (0..<runs).map { _ in
            let start = monotonicNanos()
            for _ in 0..<roundTrips { try roundTrip() }
            return Double(monotonicNanos() - start) / Double(2 * roundTrips)
        }
    }
}
