import ABI

/// Walks L1's EPT12 tables (real 4-level EPT in L1 memory) for one L2 GPA, as KVM's
/// paging_tmpl.h walker does for nested EPT. Reads L1 memory only through memslots.
public struct EPT12Walker: Sendable {
    public let memory: L1MemoryAccess
    public init(memory: L1MemoryAccess) { self.memory = memory }

    public enum Result: Equatable, Sendable {
        /// A leaf maps the GPA: the L1 GPA, the AND of R/W/X along the walk, the leaf's page size.
        case mapped(L1GPA, permissions: UInt64, pageSize: UInt64)
        /// An entry with R=W=X=0 (or a table L1 memory does not hold): permissions so far.
        case notPresent(permissions: UInt64)
        /// Reserved bits, a bad memory type, or write/execute-without-read (SDM 28.3.3.1).
        case misconfigured(level: Int)
    }

    public struct Walk: Equatable, Sendable {
        public var result: Result
        public var entriesRead: Int
        /// Entries whose accessed/dirty bits the walk set (EPTP A/D enabled, a mapped result).
        public var adUpdates: Int = 0
        /// The table pages the walk read from, root first, with their level (4 = PML4 ... 1).
        public var tables: [L1GPA] = []

        public init(result: Result, entriesRead: Int, tables: [L1GPA] = []) {
            self.result = result
            self.entriesRead = entriesRead
            self.tables = tables
        }
    }

    /// Bits 51:12 hold addresses; bits 63:52 are ignored (or SPP/suppress-#VE) in this model.
    static let reservedLeaf4K: UInt64 = 0
    static func largePageReserved(level: Int) -> UInt64 {
        // Address bits below the page size, above bit 12, must be zero in a large leaf.
        level == 2 ? 0x1F_F000 : 0x3FFF_F000
    }

    /// Walks for `gpa`. With A/D enabled in the EPTP (bit 6), a walk that maps sets the accessed
    /// bit in every entry it used and, for a write, the dirty bit in the leaf (SDM 28.3.5), as the
    /// CPU would in L1's tables.
    public func walk(eptp: UInt64, gpa: L2GPA, write: Bool = false) -> Walk {
        var w = walkOnly(eptp: eptp, gpa: gpa)
        if eptp & EPT.eptpADEnable != 0, case .mapped = w.result { w.adUpdates = setAccessedDirty(gpa: gpa, tables: w.tables, write: write) }
        return w
    }

    func setAccessedDirty(gpa: L2GPA, tables: [L1GPA], write: Bool) -> Int {
        var updates = 0
        for (i, table) in tables.enumerated() {
            let level = EPT.levels - i
            let at = L1GPA(table.raw + ((gpa.raw >> UInt64(12 + 9 * (level - 1))) & (EPT.entriesPerTable - 1)) * 8)
            guard let e = try? memory.load64(at) else { continue }
            let isLeaf = i == tables.count - 1
            let new = e | EPT.accessed | (isLeaf && write ? EPT.dirty : 0)
            if new != e, (try? memory.store64(new, at)) != nil { updates += 1 }
        }
        return updates
    }

    func walkOnly(eptp: UInt64, gpa: L2GPA) -> Walk {
        var table = L1GPA(eptp & EPT.addressMask)
        var perms = EPT.rwxMask
        var read = 0
        var tables: [L1GPA] = []
        for level in stride(from: EPT.levels, through: 1, by: -1) {
            tables.append(table)
            let shift = UInt64(12 + 9 * (level - 1))
            let index = (gpa.raw >> shift) & (EPT.entriesPerTable - 1)
            guard let entryAddress = table.adding(index * 8),
                  let entry = try? memory.load64(entryAddress) else {
                return Walk(result: .notPresent(permissions: 0), entriesRead: read)
            }
            read += 1
            let rwx = entry & EPT.rwxMask
            if rwx == 0 { return Walk(result: .notPresent(permissions: 0), entriesRead: read) }
            // Write-only or write+execute without read: misconfigured.
            if rwx == EPT.write || rwx == EPT.write | EPT.execute {
                return Walk(result: .misconfigured(level: level), entriesRead: read)
            }
            perms &= rwx
            let isLeaf = level == 1 || ((level == 2 || level == 3) && entry & EPT.largePage != 0)
            if level == 4 && entry & EPT.largePage != 0 {
                return Walk(result: .misconfigured(level: level), entriesRead: read)
            }
            if isLeaf {
                let memType = (entry & EPT.memoryTypeMask) >> EPT.memoryTypeShift
                if memType == 2 || memType == 3 || memType == 7 {
                    return Walk(result: .misconfigured(level: level), entriesRead: read)
                }
                let size: UInt64 = 1 << shift
                if level > 1, entry & Self.largePageReserved(level: level) != 0 {
                    return Walk(result: .misconfigured(level: level), entriesRead: read)
                }
                let base = entry & EPT.addressMask & ~(size - 1)
                return Walk(result: .mapped(L1GPA(base | (gpa.raw & (size - 1))), permissions: perms, pageSize: size),
                            entriesRead: read, tables: tables)
            }
            // Non-leaf: bits 7:3 are reserved.
            if entry & 0xF8 != 0 { return Walk(result: .misconfigured(level: level), entriesRead: read) }
            table = L1GPA(entry & EPT.addressMask)
        }
        return Walk(result: .notPresent(permissions: 0), entriesRead: read)   // unreachable: level 1 is a leaf
    }
}
