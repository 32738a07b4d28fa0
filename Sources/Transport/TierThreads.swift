import Atomics
#if canImport(Glibc)
import Glibc
#endif

/// The threads of a child tier with several vCPUs: one per vCPU past the first (the process's
/// own thread runs vCPU 0). They are started before the tier enters its sandbox, which then
/// holds for all of them, and each waits at a gate until the tier opens it, so no vCPU runs a
/// guest instruction outside the sandbox.
public final class TierThreads: @unchecked Sendable {
    let gate = ManagedAtomic<Bool>(false)
    /// Threads that have got as far as their own code: past glibc's thread start (rseq,
    /// set_robust_list), which the sandbox would refuse.
    let running = ManagedAtomic<Int>(0)

    public init() {}

    /// Starts `body(i)` on a thread of its own for each `i` in `vcpus`, each held at the gate,
    /// and returns once every one of them is running its own code.
    public func start(_ vcpus: Range<Int>, _ body: @escaping @Sendable (Int) -> Void) {
        for i in vcpus {
            let work = Work { [gate, running] in
                running.wrappingIncrement(ordering: .releasing)
                while !gate.load(ordering: .acquiring) { sched_yield() }
                body(i)
            }
            var thread = pthread_t()
            // The closure box is retained for the thread, which takes it back (and releases it).
            let argument = Unmanaged.passRetained(work).toOpaque()
            let r = pthread_create(&thread, nil, { arg in
                let work = Unmanaged<Work>.fromOpaque(arg!).takeRetainedValue()
                work.body()
                return nil
            }, argument)
            precondition(r == 0, "cannot start vCPU \(i)'s thread: \(String(cString: strerror(r)))")
            pthread_detach(thread)
        }
        while running.load(ordering: .acquiring) < vcpus.count { sched_yield() }
    }

    /// Lets every started thread run (once the sandbox is entered).
    public func open() { gate.store(true, ordering: .releasing) }

    final class Work {
        let body: () -> Void
        init(_ body: @escaping () -> Void) { self.body = body }
    }
}
