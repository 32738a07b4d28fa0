import ABI
import Transport

/// KVM_SET_USER_MEMORY_REGION for L1's memory, as L0's userspace would issue it: create, delete,
/// move (delete + create at a new guest-physical address; a resize is the same with a new size).
/// Deleting or moving a slot drops every mapping derived from it before returning (seeds/004),
/// by the slot's policy: `MemorySlot.targetedZapFlag` asks for a targeted zap, otherwise the VM's
/// `memslotZapPolicy` decides. The core zaps EPT02; the backend drops what its path derived
/// (PV mappings, EPT12 shadows). After either, L2 can never reach the old memory.
extension L0VCPU {
    public func createMemslot(_ s: MemorySlot) throws {
        try l1Memory.memslots.add(s)
    }

    /// Deletes slot `id`; returns how many EPT02 entries were zapped at once (a fast zap drops
    /// them all by generation: that count is every entry present before).
    @discardableResult
    public func deleteMemslot(_ id: UInt32) throws -> Int {
        let gone = try l1Memory.memslots.delete(id)
        let targeted = gone.flags & MemorySlot.targetedZapFlag != 0 || memslotZapPolicy == .targeted
        let zapped: Int
        if targeted {
            zapped = ept02.removeAll(inMemslot: gone.slot)
        } else {
            zapped = ept02.present.count
            ept02.invalidateAllFast()
        }
        // Every vCPU's backend (the VM-wide ones drop their shared state once; again is a no-op).
        for b in shared.backends.isEmpty ? [backend] : shared.backends {
            b.memoryRemoved(gone.guestRange, slot: gone.slot, fastZap: !targeted, self)
        }
        counters.memslotZaps += 1
        return zapped
    }

    /// Moves slot `id` to `newBase` (same host memory): a delete, then a create.
    public func moveMemslot(_ id: UInt32, to newBase: L1GPA) throws {
        guard var s = l1Memory.memslots.slots.first(where: { $0.slot == id }) else { throw MemoryError.noSuchSlot(id) }
        s.guestPhysAddr = newBase
        var check = l1Memory.memslots
        _ = try check.delete(id)
        try check.add(s)                        // validate before changing anything
        try deleteMemslot(id)
        try createMemslot(s)
    }
}
