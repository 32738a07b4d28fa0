/// The watchdog's clock, kept off the exit path: nothing is timed per entry. It is read only when
/// L0 would sleep (once per sleep slice) and compares the entry count with what it saw last; a
/// count that has not moved since `since` means the same tier has held the turn since then (at
/// least; at most a sleep slice more than measured).
struct TurnWatchdog {
    let limitNanos: UInt64
    private var entries = UInt64.max
    private var since: UInt64 = 0

    init(limitNanos: UInt64) { self.limitNanos = limitNanos }

    /// Whether the turn given at entry number `entries` has been held past the limit at `now`.
    mutating func expired(entries e: UInt64, now: UInt64) -> Bool {
        if e != entries { entries = e; since = now }
        return now &- since >= limitNanos
    }
}
