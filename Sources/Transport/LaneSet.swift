import ABI
import Atomics
import CPVMShim
#if canImport(Glibc)
import Glibc
#endif

/// L0's wait on the lanes of several vCPUs at once: with N vCPUs L0 is one thread that runs N
/// state machines, so it waits for whichever lane hands it the turn first. It spins over the
/// lanes as `Handoff.wait` spins over one, then sleeps in futex_waitv(2) on all of them: a child
/// that passes a lane to a sleeping L0 wakes that lane's word, as it always did.
public enum LaneSet {
    /// Waits until one of `lanes` is `me`'s turn (or says stop), looking first at `start` and
    /// round from there so no lane is starved. Returns the outcome and the lane it came from.
    /// `until` as in `Handoff.wait`: `.timedOut` once the clock passes it.
    public static func wait(for me: Tier, on lanes: [Handoff], from start: Int, policy: WaitPolicy,
                            until: UInt64 = .max, isPeerAlive: () -> Bool = { true }) -> (WaitOutcome, Int) {
        precondition(!lanes.isEmpty && lanes.count <= Int(PVM_FUTEX_WAITV_MAX), "\(lanes.count) lanes")
        let mine = me.rawValue
        let n = lanes.count
        @inline(__always) func scan() -> (WaitOutcome, Int)? {
            for k in 0..<n {
                let i = (start + k) % n
                let v = lanes[i].turn.load(ordering: .acquiring)
                if v == mine { return (.myTurn, i) }
                if v == HandoffLayout.stopValue { return (.stop, i) }
            }
            return nil
        }
        if let r = scan() { return r }

        let began = monotonicNanos()
        var rounds: UInt32 = 0
        while true {
            switch policy.spin {
            case .pause: pvm_cpu_relax()
            case .yield: sched_yield()
            }
            if let r = scan() { return r }
            rounds &+= 1
            if rounds & 15 == 0 {
                let now = monotonicNanos()
                if now >= until { return (.timedOut, start % n) }
                if now &- began > policy.spinBudgetNanos { break }
            }
        }

        // Sleep: raise L0's flag on every lane, look once more (a child that passed before it
        // saw a flag is seen here), then sleep on every turn word at the value just read.
        let me = Int(mine)
        var lastCheck = monotonicNanos()
        let words: [UnsafeMutablePointer<UInt32>?] = lanes.map { $0.turnAddress }
        var seen = [UInt32](repeating: 0, count: n)
        defer { for l in lanes { l.sleeping[me].store(0, ordering: .sequentiallyConsistent) } }
        while true {
            for l in lanes { l.sleeping[me].store(1, ordering: .sequentiallyConsistent) }
            for i in 0..<n {
                let v = lanes[i].turn.load(ordering: .sequentiallyConsistent)
                if v == mine { return (.myTurn, i) }
                if v == HandoffLayout.stopValue { return (.stop, i) }
                seen[i] = v
            }
            let r = words.withUnsafeBufferPointer { w in
                seen.withUnsafeBufferPointer { s in
                    pvm_futex_waitv(w.baseAddress, s.baseAddress, Int32(n), Handoff.slice(policy, until: until))
                }
            }
            let now = monotonicNanos()
            if now >= until { return scan() ?? (.timedOut, start % n) }
            if r == -ETIMEDOUT || now &- lastCheck >= UInt64(max(policy.sleepSliceNanos, 0)) {
                lastCheck = now
                if !isPeerAlive() { return (.peerGone, start % n) }
            }
            if let r = scan() { return r }
        }
    }
}
