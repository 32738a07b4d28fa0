import Atomics
#if canImport(Glibc)
import Glibc
#endif

/// A lock between L1's vCPU threads (L1's own business: L0 never sees it). A test-and-set that
/// yields while taken: the holder may be waiting on L0 for a hypercall, and L1's threads share
/// one core.
final class L1Lock: @unchecked Sendable {
    private let taken = ManagedAtomic<Bool>(false)

    func withLock<T>(_ body: () throws -> T) rethrows -> T {
        while !taken.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged { sched_yield() }
        defer { taken.store(false, ordering: .releasing) }
        return try body()
    }
}
