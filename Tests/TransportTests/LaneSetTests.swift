import ABI
import Foundation
import Testing
import Transport

/// L0's wait on several vCPUs' lanes at once (`LaneSet`).
@Suite struct LaneSetTests {
    let region: SharedRegion
    let lanes: [Handoff]
    init() throws {
        let r = try SharedRegion(create: "lane-set-test", size: 4 * pageSize)
        region = r
        lanes = (0..<4).map { Handoff(region: r, base: ControlOffset(UInt64($0) * pageSize)) }
        for l in lanes { l.pass(to: .l2) }
    }

    /// Whichever lane hands L0 the turn is the one the wait returns, asleep or spinning; a lane
    /// already L0's is found at once.
    @Test(arguments: [0, 3], [false, true])
    func theWaitReturnsTheLaneThatGaveL0TheTurn(_ which: Int, _ afterSleep: Bool) {
        let ls = lanes
        // A 5 s sleep slice: only the wake-up from `pass` can end a sleep in time.
        let policy = WaitPolicy(spin: .yield, spinBudgetNanos: 50_000, sleepSliceNanos: 5_000_000_000)
        let result = onThread { () -> ((WaitOutcome, Int), UInt64) in
            let r = LaneSet.wait(for: .l0, on: ls, from: 1, policy: policy)
            return (r, monotonicNanos())
        }
        if afterSleep { usleep(100_000) }          // the waiter is in futex_waitv by now
        let passed = monotonicNanos()
        lanes[which].pass(to: .l0)
        let ((outcome, i), returned) = result()
        #expect(outcome == .myTurn && i == which)
        #expect(returned &- passed < 1_000_000_000, "woken \((returned &- passed) / 1_000_000) ms after the pass: the wake-up was lost")
    }

    /// Sleeping on four lanes costs no CPU to speak of; a stop on any lane ends the wait.
    @Test func aSleepingWaiterUsesLittleCPUAndSeesAStop() {
        let ls = lanes
        let policy = WaitPolicy(spin: .pause, spinBudgetNanos: 1_000_000, sleepSliceNanos: 50_000_000)
        let result = onThread { () -> ((WaitOutcome, Int), UInt64) in
            let cpu0 = threadCPUNanos()
            let r = LaneSet.wait(for: .l0, on: ls, from: 0, policy: policy)
            return (r, threadCPUNanos() - cpu0)
        }
        usleep(300_000)
        lanes[2].stop()
        let ((outcome, i), cpu) = result()
        #expect(outcome == .stop && i == 2)
        #expect(cpu < 60_000_000, "waiter used \(cpu / 1_000_000) ms of CPU in 300 ms")
    }

    /// A wait with `until` (L0's next timer of a halted vCPU) ends `.timedOut` once the clock
    /// passes it, spinning or asleep, on one lane or several, and not before; a turn already
    /// given wins over a deadline already passed.
    @Test(arguments: [0 as UInt64, 200_000_000], [1, 4])
    func aWaitWithADeadlineEndsAtIt(_ spinBudget: UInt64, _ laneCount: Int) {
        let ls = Array(lanes.prefix(laneCount))
        // A 5 s sleep slice: only the deadline can end the sleep in time.
        let policy = WaitPolicy(spin: .yield, spinBudgetNanos: spinBudget, sleepSliceNanos: 5_000_000_000)
        let start = monotonicNanos()
        let until = start + 30_000_000
        let outcome = laneCount == 1 ? ls[0].wait(for: .l0, policy: policy, until: until)
            : LaneSet.wait(for: .l0, on: ls, from: 0, policy: policy, until: until).0
        let end = monotonicNanos()
        #expect(outcome == .timedOut)
        #expect(end >= until, "ended \((until - end) / 1000) us early")
        #expect(end - start < 1_000_000_000, "ended \((end - start) / 1_000_000) ms after it began: the deadline was missed")
        ls[0].pass(to: .l0)
        let given = laneCount == 1 ? ls[0].wait(for: .l0, policy: policy, until: 1)
            : LaneSet.wait(for: .l0, on: ls, from: 0, policy: policy, until: 1).0
        #expect(given == .myTurn)
    }

    /// Every lane ready at once: a wait from each starting point takes the first at or after
    /// it, so a busy vCPU cannot starve the others.
    @Test func theScanStartsWhereItIsToldSoNoLaneStarves() {
        for l in lanes { l.pass(to: .l0) }
        for start in 0..<4 {
            let (_, i) = LaneSet.wait(for: .l0, on: lanes, from: start, policy: WaitPolicy(spin: .yield, spinBudgetNanos: 0))
            #expect(i == start)
        }
    }

    @Test func aSleepingWaiterNoticesThatItsPeersAreGone() {
        let ls = lanes
        let policy = WaitPolicy(spin: .yield, spinBudgetNanos: 10_000, sleepSliceNanos: 10_000_000)
        let (outcome, _) = onThread { LaneSet.wait(for: .l0, on: ls, from: 0, policy: policy, isPeerAlive: { false }) }()
        #expect(outcome == .peerGone)
    }
}
