import ABI
import Transport

/// EPT02: the table L2's MMU uses, L2 GPA page -> host page + R/W/X. L0 alone writes it, from the
/// PV map (pv path), from EPT12 walks (nvmx path) or up front (one level). L2's MMU reads it on
/// every access (`EPT02TableView.lookup`, the one translation both tiers use), so a removed
/// entry is gone before L2 runs again.
///
/// L0 also keeps what KVM keeps beside its shadow tables: which entries are present (so dropping
/// everything costs what is there), a reverse map from memslot to the L2 frames mapped into it
/// (so deleting a slot can zap exactly its mappings), and a generation (so a "fast zap" can
/// invalidate everything in O(1) and let the tables rebuild lazily).
public final class EPT02: @unchecked Sendable {
    let table: EPT02TableView
    /// Frames with an entry of the current generation.
    public private(set) var present: Set<UInt64> = []
    /// memslot id -> L2 frames whose entry points into it.
    public private(set) var reverseMap: [UInt32: Set<UInt64>] = [:]
    var slotOfFrame: [UInt64: UInt32] = [:]

    public init(_ table: EPT02TableView) { self.table = table }

    /// L2 GPAs below this can be mapped.
    public var addressLimit: L2GPA { L2GPA(table.entries.count << pageShift) }
    public var generation: UInt64 { table.generation.value }

    /// The raw entry (whatever its generation); 0 beyond the table.
    public func entry(_ gpa: L2GPA) -> UInt64 {
        let n = gpa.pageNumber
        return n < table.entries.count ? table.entries[n] : 0
    }

    /// The entry's R/W/X if it is present in the current generation, else 0.
    public func permissions(_ gpa: L2GPA) -> UInt64 {
        let e = entry(gpa)
        return EPT02Entry.isPresent(e, generation: generation) ? e & EPT.rwxMask : 0
    }

    /// Host offset for an L2 GPA, if EPT02 maps it (this generation) with every right in `access`.
    public func translate(_ gpa: L2GPA, access: UInt64 = EPT.read) -> HostOffset? {
        table.lookup(gpa, access: access)
    }

    /// Installs one page backed by memslot `memslot`. False if the GPA is beyond what EPT02 covers.
    @discardableResult
    public func install(_ gpa: L2GPA, host: HostOffset, permissions: UInt64, memslot: UInt32) -> Bool {
        let frame = gpa.pageNumber
        guard frame < table.entries.count else { return false }
        table.entries[frame] = EPT02Entry.make(host: host.pageBase, permissions: permissions, generation: generation)
        present.insert(frame)
        if let old = slotOfFrame[frame], old != memslot { reverseMap[old]?.remove(frame) }
        slotOfFrame[frame] = memslot
        reverseMap[memslot, default: []].insert(frame)
        return true
    }

    /// Installs every page of `range` backed by `memslot`, from host offset `host` on (one
    /// level's up-front mapping): one reservation instead of a rehash every doubling.
    /// False if the range reaches beyond what EPT02 covers (nothing installed then).
    @discardableResult
    public func install(_ range: AddressRange<L2GPA>, host: HostOffset, permissions: UInt64, memslot: UInt32) -> Bool {
        let first = range.start.pageNumber, count = range.length >> pageShift
        guard range.start.isPageAligned, range.length & (pageSize - 1) == 0, first <= table.entries.count,
              count <= table.entries.count - first else { return false }
        // Taken out of the object while the loop runs: uniquely held, reserved once, and no
        // exclusivity check per page.
        var present = self.present, slotOfFrame = self.slotOfFrame
        var mine = reverseMap.removeValue(forKey: memslot) ?? []
        self.present = []
        self.slotOfFrame = [:]
        present.reserveCapacity(present.count + Int(count))
        slotOfFrame.reserveCapacity(slotOfFrame.count + Int(count))
        mine.reserveCapacity(mine.count + Int(count))
        let generation = self.generation
        var frame = first
        var offset = host.pageBase
        while frame < first + count {
            table.entries[frame] = EPT02Entry.make(host: offset, permissions: permissions, generation: generation)
            present.insert(frame)
            if let old = slotOfFrame.updateValue(memslot, forKey: frame), old != memslot { reverseMap[old]?.remove(frame) }
            mine.insert(frame)
            frame += 1
            offset = offset + pageSize
        }
        self.present = present
        self.slotOfFrame = slotOfFrame
        reverseMap[memslot] = mine
        return true
    }

    func clear(frame: UInt64) {
        table.entries[frame] = 0
        present.remove(frame)
        if let s = slotOfFrame.removeValue(forKey: frame) { reverseMap[s]?.remove(frame) }
    }

    /// Removes every page `range` touches (below the address limit); returns how many were present.
    @discardableResult
    public func remove(_ range: AddressRange<L2GPA>) -> Int {
        var removed = 0
        var frame = range.start.pageNumber
        let end = min(range.end, addressLimit).raw
        while frame << pageShift < end {
            if table.entries[frame] != 0 {
                clear(frame: frame)
                removed += 1
            }
            frame += 1
        }
        return removed
    }

    /// Removes the page that holds `gpa`; returns 1 if it was present.
    @discardableResult
    public func remove(page gpa: L2GPA) -> Int {
        let frame = gpa.pageNumber
        guard frame < table.entries.count, table.entries[frame] != 0 else { return 0 }
        clear(frame: frame)
        return 1
    }

    /// Drops every entry now (INVEPT, or a fresh EPT02 root): the cost is what is present.
    public func removeAll() {
        for frame in present { table.entries[frame] = 0 }
        present.removeAll(keepingCapacity: true)
        reverseMap.removeAll(keepingCapacity: true)
        slotOfFrame.removeAll(keepingCapacity: true)
    }

    /// Targeted zap: removes exactly the entries that point into `memslot`. Returns how many.
    @discardableResult
    public func removeAll(inMemslot memslot: UInt32) -> Int {
        let frames = reverseMap.removeValue(forKey: memslot) ?? []
        for frame in frames {
            table.entries[frame] = 0
            present.remove(frame)
            slotOfFrame[frame] = nil
        }
        return frames.count
    }

    /// Fast zap (KVM's kvm_mmu_zap_all_fast): a new generation makes every entry not present at
    /// once; L0 rebuilds entries as L2 faults on them. When the 11-bit tag would wrap, old
    /// entries could look current again, so the table is really cleared then.
    public func invalidateAllFast() {
        let next = generation &+ 1
        if next & EPT02Entry.generationMask == 0 { table.entries.zeroAll() }
        table.generation.value = next
        // Fresh containers: freeing the old ones does not visit their elements.
        present = []
        reverseMap = [:]
        slotOfFrame = [:]
    }
}
