import ABI
import Transport

/// EPT02: the table L2's MMU uses, L2 GPA page -> host page + R/W/X. L0 alone writes it, from the
/// PV map (pv path) or from EPT12 walks (nvmx path). L2's MMU reads it on every access, so a
/// removed entry is gone before L2 runs again.
///
/// L0 also keeps what KVM keeps beside its shadow tables: which entries are present (so dropping
/// everything costs what is there), a reverse map from memslot to the L2 frames mapped into it
/// (so deleting a slot can zap exactly its mappings), and a generation (so a "fast zap" can
/// invalidate everything in O(1) and let the tables rebuild lazily).
public final class EPT02: @unchecked Sendable {
    let control: SharedRegion
    let layout: ControlLayout
    /// Frames with an entry of the current generation.
    public private(set) var present: Set<UInt64> = []
    /// memslot id -> L2 frames whose entry points into it.
    public private(set) var reverseMap: [UInt32: Set<UInt64>] = [:]
    var slotOfFrame: [UInt64: UInt32] = [:]

    public init(control: SharedRegion, layout: ControlLayout) {
        self.control = control
        self.layout = layout
    }

    public var addressLimit: UInt64 { layout.l2AddressLimit }
    public var generation: UInt64 { control.unchecked(load: UInt64.self, at: ControlLayout.ept02GenerationOffset) }

    @inline(__always)
    func slot(_ gpa: L2GPA) -> UInt64? {
        let n = gpa.pageNumber
        return n < layout.ept02Entries ? layout.ept02 + n * 8 : nil
    }

    /// The raw entry (whatever its generation).
    public func entry(_ gpa: L2GPA) -> UInt64 {
        guard let s = slot(gpa) else { return 0 }
        return control.unchecked(load: UInt64.self, at: s)
    }

    /// The entry's R/W/X if it is present in the current generation, else 0.
    public func permissions(_ gpa: L2GPA) -> UInt64 {
        let e = entry(gpa)
        return EPT02Entry.isPresent(e, generation: generation) ? e & EPT.rwxMask : 0
    }

    /// Host offset for an L2 GPA, if EPT02 maps it (this generation) with every right in `access`.
    public func translate(_ gpa: L2GPA, access: UInt64 = EPT.read) -> HostOffset? {
        let e = entry(gpa)
        guard EPT02Entry.isPresent(e, generation: generation), e & access == access else { return nil }
        return HostOffset(EPT02Entry.host(e).raw | gpa.offsetInPage)
    }

    /// Installs one page backed by memslot `memslot`. False if the GPA is beyond what EPT02 covers.
    @discardableResult
    public func install(_ gpa: L2GPA, host: HostOffset, permissions: UInt64, memslot: UInt32) -> Bool {
        guard let s = slot(gpa) else { return false }
        let frame = gpa.pageNumber
        control.unchecked(store: EPT02Entry.make(host: host.pageBase, permissions: permissions, generation: generation), at: s)
        present.insert(frame)
        if let old = slotOfFrame[frame], old != memslot { reverseMap[old]?.remove(frame) }
        slotOfFrame[frame] = memslot
        reverseMap[memslot, default: []].insert(frame)
        return true
    }

    func clear(frame: UInt64) {
        control.unchecked(store: UInt64(0), at: layout.ept02 + frame * 8)
        present.remove(frame)
        if let s = slotOfFrame.removeValue(forKey: frame) { reverseMap[s]?.remove(frame) }
    }

    /// Removes the pages of [gpa, +length); returns how many were present.
    @discardableResult
    public func remove(_ gpa: L2GPA, length: UInt64) -> Int {
        var removed = 0
        var p = gpa.pageBase.raw
        let end = min(gpa.raw &+ length, layout.l2AddressLimit)
        while p < end {
            if control.unchecked(load: UInt64.self, at: layout.ept02 + (p >> pageShift) * 8) != 0 {
                clear(frame: p >> pageShift)
                removed += 1
            }
            p += pageSize
        }
        return removed
    }

    /// Drops every entry now (INVEPT, or a fresh EPT02 root): the cost is what is present.
    public func removeAll() {
        for frame in present { control.unchecked(store: UInt64(0), at: layout.ept02 + frame * 8) }
        present.removeAll(keepingCapacity: true)
        reverseMap.removeAll(keepingCapacity: true)
        slotOfFrame.removeAll(keepingCapacity: true)
    }

    /// Targeted zap: removes exactly the entries that point into `memslot`. Returns how many.
    @discardableResult
    public func removeAll(inMemslot memslot: UInt32) -> Int {
        let frames = reverseMap.removeValue(forKey: memslot) ?? []
        for frame in frames {
            control.unchecked(store: UInt64(0), at: layout.ept02 + frame * 8)
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
        if next & EPT02Entry.generationMask == 0 {
            try? control.fill(0, at: layout.ept02, count: layout.ept02Entries * 8)
        }
        control.unchecked(store: next, at: ControlLayout.ept02GenerationOffset)
        // Fresh containers: freeing the old ones does not visit their elements.
        present = []
        reverseMap = [:]
        slotOfFrame = [:]
    }
}
