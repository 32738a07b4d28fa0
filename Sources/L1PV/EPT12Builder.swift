import ABI

/// Builds EPT12: real 4-level EPT tables in L1's memory, the way a KVM L1 builds the tables it
/// points vmcs12's EPT_POINTER at. Table pages come from a pool in L1 memory.
public struct EPT12Builder {
    let memory: L1Memory
    let poolEnd: L1GPA
    var next: L1GPA
    public let root: L1GPA

    public init(memory: L1Memory, pool: L1GPA, poolSize: UInt64) throws {
        self.memory = memory
        self.poolEnd = pool + poolSize
        self.next = pool
        self.root = pool
        self.next = pool + pageSize
        try memory.zero(root, length: pageSize)
    }

    /// EPTP: write-back, 4-level walk.
    public var eptp: UInt64 { root.raw | EPT.memoryTypeWB | EPT.eptpWalkLength4 }

    mutating func allocateTable() throws -> L1GPA {
        guard next < poolEnd else { throw L1Fault.outsideOwnMemory(next) }
        let t = next
        next = next + pageSize
        try memory.zero(t, length: pageSize)
        return t
    }

    /// The 4 KiB leaf slot for `l2`, if its tables exist.
    func leafSlot(_ l2: L2GPA) throws -> L1GPA? {
        var table = root
        for level in stride(from: EPT.levels, to: 1, by: -1) {
            let index = EPT.tableIndex(l2, level: level)
            let entry = try memory.load64(table + index * 8)
            guard entry & EPT.rwxMask != 0 else { return nil }
            table = L1GPA(entry & EPT.addressMask)
        }
        return table + l2.pageNumber % EPT.entriesPerTable * 8
    }

    public func isMapped(_ l2: L2GPA) throws -> Bool {
        guard let slot = try leafSlot(l2) else { return false }
        return try memory.load64(slot) & EPT.rwxMask != 0
    }

    /// Clears the 4 KiB leaf for `l2`, if its tables exist.
    public mutating func unmap(_ l2: L2GPA) throws {
        guard let slot = try leafSlot(l2) else { return }
        try memory.store64(0, slot)
    }

    /// Maps one 4 KiB L2 page to an L1 page with `permissions` (EPT R/W/X), write-back.
    public mutating func map(_ l2: L2GPA, to l1: L1GPA, permissions: UInt64 = EPT.rwxMask) throws {
        var table = root
        for level in stride(from: EPT.levels, to: 1, by: -1) {
            let index = EPT.tableIndex(l2, level: level)
            let slot = table + index * 8
            var entry = try memory.load64(slot)
            if entry & EPT.rwxMask == 0 {
                entry = EPT.entry(try allocateTable(), EPT.rwxMask)
                try memory.store64(entry, slot)
            }
            table = L1GPA(entry & EPT.addressMask)
        }
        let leaf = table + l2.pageNumber % EPT.entriesPerTable * 8
        try memory.store64(EPT.entry(l1.pageBase, permissions | EPT.memoryTypeWB << EPT.memoryTypeShift), leaf)
    }
}
