import Atomics

/// A full memory barrier (MFENCE): what a guest program's CPU executes to order its stores
/// before its later loads in the memory it shares with other vCPUs.
public enum MemoryFence {
    @inline(__always)
    public static func full() { atomicMemoryFence(ordering: .sequentiallyConsistent) }
}
