import Transport

/// Spends `nanos` of CPU time on the calling thread. The host model's costs (VMXON on a CPU, TDX
/// module initialisation) are spent, not added up, so a benchmark measures them with a clock
/// like any other latency, locks and all. Busy-waiting rather than sleeping: the real work keeps
/// a CPU busy, and a sleep's wake-up slack would dwarf a microsecond-scale cost.
func busyWait(nanos: UInt64) {
    guard nanos > 0 else { return }
    let end = monotonicNanos() &+ nanos
    while monotonicNanos() < end {}
}
