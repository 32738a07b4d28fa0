import ABI
import Transport

/// KVM_SET_USER_MEMORY_REGION for L1's memory, as L0's userspace would issue it: create, delete,
/// move (delete + create at a new guest-physical address; a resize is the same with a new size).
/// Deleting or moving a slot drops every mapping derived from it before returning (seeds/004),
/// by the slot's policy: `MemorySlot.targetedZapFlag` asks for a targeted zap, otherwise the VM's
/// `memslotZapPolicy` decides. After either, L2 can never reach the old memory.
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
        let range = AddressRange(start: gone.guestPhysAddr, length: gone.memorySize)!
        if targeted {
            zapped = ept02.removeAll(inMemslot: gone.slot)
            // EPT12 tables that lived in the slot: whatever was shadowed from them goes too.
            for (page, shadow) in nested.shadows.tables where range.contains(L1GPA(page << pageShift)) {
                for dep in shadow.dependents { ept02.remove(L2GPA(dep << pageShift), length: pageSize) }
                nested.shadows.tables[page] = nil
                nested.shadows.unsync.remove(page)
                setWriteProtected(page, false)
            }
        } else {
            zapped = ept02.present.count
            ept02.invalidateAllFast()
            for page in nested.shadows.tables.keys { setWriteProtected(page, false) }
            nested.shadows = EPT12ShadowTracker()
        }
        // The PV map may no longer point into memory L1 does not have.
        for m in pv.map.mappings {
            let l1 = AddressRange(start: m.l1, length: m.l2.length)!
            guard l1.overlaps(range) else { continue }
            let cutStart = max(l1.start, range.start), cutEnd = min(l1.end, range.end)
            let l2Start = L2GPA(m.l2.start.raw + (cutStart.raw - m.l1.raw))
            pv.map.remove(AddressRange(start: l2Start, length: cutEnd.raw - cutStart.raw)!)
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

    /// After a fast zap, PV mappings still stand: rebuild the EPT02 entry on first touch.
    func refillFromPVMap(_ exit: GuestExit) -> Bool {
        let gpa = L2GPA(exit.guestPhysicalAddress)
        guard let m = pv.map.lookup(gpa), exit.qualification & EPT.rwxMask & ~m.permissions == 0,
              let l1 = m.l1Address(for: gpa.pageBase),
              let host = try? l1Memory.memslots.translate(l1, length: pageSize),
              let slot = l1Memory.memslots.slot(containing: l1) else { return false }
        ept02.install(gpa.pageBase, host: host, permissions: m.permissions, memslot: slot.slot)
        counters.ept02Fills += 1
        return true
    }
}
