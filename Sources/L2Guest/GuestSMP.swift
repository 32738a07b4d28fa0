import ABI
#if canImport(Glibc)
import Glibc
#endif

/// What a guest program with several vCPUs uses to work together, in L2's own RAM (as KVM
/// selftests' multi-vCPU guests use shared globals): a rendezvous all vCPUs reach before any
/// goes on, so the vCPUs of a benchmark measure at the same time.
extension GuestCPU {
    /// One u64 per vCPU: how many rendezvous that vCPU has reached.
    static let rendezvousArea = L2GPA(0x3000)

    /// Waits until every vCPU has reached as many rendezvous as this one. Plain loads and stores
    /// (aligned 8-byte accesses are atomic on x86); the wait is PAUSE, which lets the host run
    /// another vCPU thread (no exit: this CPU model has no pause-loop exiting).
    public func rendezvous() {
        guard vcpuCount > 1 else { return }
        asKernel {
            let mine = Self.rendezvousArea + UInt64(vcpuIndex) * 8
            let generation = read64(mine) &+ 1
            write64(mine, generation)
            for i in 0..<vcpuCount {
                while read64(Self.rendezvousArea + UInt64(i) * 8) < generation { pause() }
            }
        }
    }

    /// PAUSE in a spin loop.
    public func pause() { sched_yield() }
}
