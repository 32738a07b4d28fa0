import ABI
import Foundation
import Testing
import Transport

/// CPU time this thread has used, in ns.
func threadCPUNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

final class ResultBox<T>: @unchecked Sendable {
    var value: T?
    let done = DispatchSemaphore(value: 0)
}

/// Runs `body` on its own thread and returns its result once it finishes.
func onThread<T: Sendable>(_ body: @escaping @Sendable () -> T) -> () -> T {
    let box = ResultBox<T>()
    Thread { box.value = body(); box.done.signal() }.start()
    return { box.done.wait(); return box.value! }
}

/// A one-way flag shared between test threads.
final class ManagedAtomicFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    var isSet: Bool { lock.withLock { value } }
    func set() { lock.withLock { value = true } }
}

@Suite struct HandoffTests {
    let region: SharedRegion
    let handoff: Handoff
    init() throws {
        region = try SharedRegion(create: "handoff-test", size: pageSize)
        handoff = Handoff(region: region, base: ControlOffset(0))
    }

    @Test func aWaiterWithNothingToDoSleepsInsteadOfSpinning() {
        let h = handoff
        let policy = WaitPolicy(spin: .pause, spinBudgetNanos: 2_000_000, sleepSliceNanos: 50_000_000)
        let result = onThread { () -> (WaitOutcome, UInt64) in
            let cpu0 = threadCPUNanos()
            let outcome = h.wait(for: .l2, policy: policy)
            return (outcome, threadCPUNanos() - cpu0)
        }
        usleep(400_000)                  // the stack is idle for 0.4 s
        h.pass(to: .l2)
        let (outcome, cpu) = result()
        #expect(outcome == .myTurn)
        // A spinner would have burnt ~400 ms; a sleeper burns its 2 ms budget and a few wake-ups.
        #expect(cpu < 60_000_000, "waiter used \(cpu / 1_000_000) ms of CPU in 400 ms")
    }

    @Test func aSleepingWaiterNoticesThatItsPeerIsGone() {
        let h = handoff
        let policy = WaitPolicy(spin: .yield, spinBudgetNanos: 100_000, sleepSliceNanos: 10_000_000)
        let outcome = onThread { h.wait(for: .l1, policy: policy, isPeerAlive: { false }) }()
        #expect(outcome == .peerGone)
    }

    /// A peer that keeps rewriting the turn word (never to the waiter) wakes the futex again and
    /// again, so the sleep never times out: liveness is still asked once per slice.
    @Test func aWaiterWokenOverAndOverByABabblingPeerStillNoticesItIsGone() throws {
        let h = handoff
        let policy = WaitPolicy(spin: .yield, spinBudgetNanos: 100_000, sleepSliceNanos: 10_000_000)
        let quiet = ManagedAtomicFlag()
        h.pass(to: .l1)                  // never L0's turn from here on
        // The peers claim to sleep, so every pass wakes every sleeper on the word, L0's too.
        for t in [Tier.l1, .l2] { try region.store(UInt32(1), at: HandoffLayout.sleeping(t)) }
        let babbler = onThread { () -> Int in
            var n = 0
            while !quiet.isSet { h.pass(to: n % 2 == 0 ? .l1 : .l2); n += 1 }
            return n
        }
        let box = ResultBox<WaitOutcome>()
        Thread { box.value = h.wait(for: .l0, policy: policy, isPeerAlive: { false }); box.done.signal() }.start()
        // 10 ms slices: a waiter that asks at all answers within a few; one that only asks on a
        // timeout hangs as long as the babbling lasts. 10 s is a liveness bound, not a timing.
        let answered = box.done.wait(timeout: .now() + 10) == .success
        quiet.set()
        let writes = babbler()
        if !answered { h.stop(); box.done.wait() }
        #expect(answered, "the waiter never asked whether its peer was alive")
        #expect(box.value == .peerGone)
        #expect(writes > 0)
    }

    /// A tier that held the turn while L0 stopped the stack passes it on afterwards: the stop
    /// must survive that, or every tier would wait for a turn nobody gives.
    @Test func passingTheTurnNeverErasesAStop() {
        let h = handoff
        h.pass(to: .l1)
        h.stop()
        h.pass(to: .l0)
        h.pass(to: .l2)
        let policy = WaitPolicy(spin: .yield, spinBudgetNanos: 100_000)
        #expect(h.wait(for: .l0, policy: policy) == .stop)
        #expect(h.wait(for: .l2, policy: policy) == .stop)
    }

    @Test func stopReachesEveryWaiter() {
        let h = handoff
        let policy = WaitPolicy(spin: .yield, spinBudgetNanos: 100_000)
        let w1 = onThread { h.wait(for: .l1, policy: policy) }
        let w2 = onThread { h.wait(for: .l2, policy: policy) }
        usleep(50_000)
        h.stop()
        #expect(w1() == .stop && w2() == .stop)
    }

    @Test func turnsAlternateWithoutLosingAWakeUp() {
        let h = handoff
        let policy = WaitPolicy(spin: .yield, spinBudgetNanos: 1_000)   // sleep almost at once
        let rounds = 2_000
        let peer = onThread { () -> Int in
            var n = 0
            for _ in 0..<rounds {
                guard h.wait(for: .l2, policy: policy) == .myTurn else { break }
                n += 1
                h.pass(to: .l0)
            }
            return n
        }
        for _ in 0..<rounds {
            h.pass(to: .l2)
            #expect(h.wait(for: .l0, policy: policy) == .myTurn)
        }
        #expect(peer() == rounds)
    }
}
