import ABI

/// What the shadow MMU reads and writes in L1's memory: L2's page tables (in L2's RAM, which L1
/// backs) and its own shadow pages. nil / false: outside L1's memory.
public protocol ShadowMMUMemory {
    func load(_ gpa: L1GPA) -> UInt64?
    @discardableResult func store(_ gpa: L1GPA, _ value: UInt64) -> Bool
}

/// L1's shadow MMU for L2 on pvm-rfc, after KVM's (mmu.c, paging_tmpl.h; kvm-nested-work.md):
/// shadow tables translate L2's guest-virtual addresses straight to L1 GPAs, built from L2's own
/// tables on demand.
///
/// - A fault walks L2's tables (setting their accessed/dirty flags), then fills the shadow path
///   down to one leaf entry. A shadow page shadows one L2 table (keyed by the table's L2 GPA and
///   level), or, for L2 without paging or a guest 2 MiB page, a range of addresses ("direct").
/// - Every L2 page that a shadow page shadows is write-protected: leaf shadow entries mapping it
///   lose W (found through the reverse map). A write to it faults: a leaf table goes unsync
///   (writable to L2, synced again at the next CR3 load or INVLPG), any other table has the
///   write emulated and the affected shadow entry zapped; three emulated writes in a row zap
///   the shadow page (write flooding).
/// - A clean guest page (D = 0) is mapped read-only, so the first write faults and sets D.
/// - CR3 loads switch roots through a cache of the last roots (KVM keeps 3 previous ones),
///   building a root on a miss, then sync every unsync page.
/// - When its pool runs low it zaps everything and starts again (kvm_mmu_zap_all).
///
/// Pure over `ShadowMMUMemory`: tested with made-up tables and no process (ShadowMMUTests).
public final class ShadowMMU {
    public typealias Bit = PageWalk.Bit

    /// How L2 GPAs map to L1 GPAs (L1's memory for L2).
    public struct Backing {
        public var translate: (L2GPA) -> L1GPA?
        public init(translate: @escaping (L2GPA) -> L1GPA?) { self.translate = translate }
    }

    /// What a fault comes to.
    public enum FaultOutcome: Equatable, Sendable {
        /// The shadow maps it now: L2 retries.
        case fixed
        /// L2's own tables do not allow it: deliver #PF with this error code to L2. (A table
        /// outside L2's RAM is this model's reserved-bit #PF: the walk cannot read it.)
        case inject(errorCode: UInt32)
        /// A non-canonical address: deliver #GP to L2.
        case injectGeneralProtection
        /// Not L2 RAM: the access is emulated (a device, or unassigned).
        case mmio(L2GPA)
        /// A write to a write-protected L2 page table that L1 must emulate: L1 stores the value
        /// at this L2 GPA, then calls `emulatedWrite(at:)`, and L2 goes on after the instruction.
        case emulateWrite(L2GPA)
    }

    /// One shadow page: what it shadows, and where it is.
    struct Key: Hashable {
        /// The L2 table page it shadows, or (direct) the first L2 GPA it covers.
        var base: UInt64
        var level: Int
        var direct: Bool
        /// The rights L2's entries above this page allow (`Rights`), as KVM's role.access: two
        /// paths to one L2 table with different rights get different shadow pages, so a leaf
        /// filled for one never serves the other.
        var rights: UInt8 = Rights.all
    }

    /// Rights accumulated over a walk's entries: W and U while every entry has them, XD once one
    /// has it.
    enum Rights {
        static let write: UInt8 = 1, user: UInt8 = 2, executeDisable: UInt8 = 4
        static let all: UInt8 = write | user
        static func of<S: Sequence>(_ entries: S) -> UInt8 where S.Element == UInt64 {
            var r = all
            for e in entries {
                if e & Bit.writable == 0 { r &= ~write }
                if e & Bit.user == 0 { r &= ~user }
                if e & Bit.executeDisable != 0 { r |= executeDisable }
            }
            return r
        }
        /// The rights of two stretches of one walk: W and U if both have them, XD if either does.
        static func combine(_ a: UInt8, _ b: UInt8) -> UInt8 {
            (a & b & all) | ((a | b) & executeDisable)
        }
    }
    struct ShadowPage {
        let key: Key
        let page: L1GPA
        var unsync = false
        var emulatedWrites = 0
        /// Shadow entries (addresses) pointing to this page.
        var parents: Set<L1GPA> = []
    }

    let memory: ShadowMMUMemory
    let backing: Backing
    let count: (SwitcherCounter, UInt64) -> Void
    /// L1 GPA pages for shadow tables.
    private var free: [L1GPA]
    private let poolPages: Int
    private var pages: [Key: ShadowPage] = [:]
    private var keyOfPage: [L1GPA: Key] = [:]
    /// L2 table pages with shadow pages, and which.
    private var shadowed: [L2GPA: Set<Key>] = [:]
    /// Leaf shadow entries mapping each L2 page (KVM's rmap), and each leaf entry's L2 page.
    private var rmap: [L2GPA: Set<L1GPA>] = [:]
    private var leafTarget: [L1GPA: L2GPA] = [:]
    /// The current root (what the L2 CPU walks) and the cache of previous ones, by guest CR3
    /// (0: L2 without paging).
    public private(set) var root: L1GPA
    /// L2's CR3 as it last loaded it (0: no paging yet).
    public private(set) var rootCR3: UInt64 = 0
    private var previousRoots: [(cr3: UInt64, key: Key)] = []
    public static let previousRootCapacity = 3
    /// Set when an entry lost rights or went away since the last `takeFlushRequest()`.
    private var flushNeeded = false
    /// L2 pages L1 took back (balloon): never mapped again.
    private var removed: Set<L2GPA> = []

    public init(memory: ShadowMMUMemory, pool: AddressRange<L1GPA>, backing: Backing,
                count: @escaping (SwitcherCounter, UInt64) -> Void) {
        self.memory = memory
        self.backing = backing
        self.count = count
        self.free = Array(pool.pages).reversed()
        self.poolPages = free.count
        self.root = L1GPA(0)
        self.root = page(for: Self.rootKey(cr3: 0)).page
    }

    static func rootKey(cr3: UInt64) -> Key {
        cr3 == 0 ? Key(base: 0, level: 4, direct: true) : Key(base: cr3 & Bit.addressMask, level: 4, direct: false)
    }

    /// Whether the L2 CPU must flush its TLB (and clears the request).
    public func takeFlushRequest() -> Bool {
        defer { flushNeeded = false }
        if flushNeeded { count(.tlbFlushes, 1) }
        return flushNeeded
    }

    // MARK: shadow pages

    /// The shadow page for `key`, made (zeroed, and its L2 table write-protected) if new.
    private func page(for key: Key) -> ShadowPage {
        if let sp = pages[key] { return sp }
        let p = free.popLast()!        // callers keep the pool from running dry (`reserve`)
        for i in 0..<UInt64(512) { memory.store(p + i * 8, 0) }
        let sp = ShadowPage(key: key, page: p)
        pages[key] = sp
        keyOfPage[p] = key
        if !key.direct {
            let gfn = L2GPA(key.base)
            shadowed[gfn, default: []].insert(key)
            writeProtect(gfn)
        }
        return sp
    }

    /// Leaf entries mapping `gfn` lose W.
    private func writeProtect(_ gfn: L2GPA) {
        var did = false
        for spte in rmap[gfn] ?? [] {
            guard let e = memory.load(spte), e & Bit.writable != 0 else { continue }
            memory.store(spte, e & ~Bit.writable)
            did = true
        }
        if did { count(.writeProtects, 1); flushNeeded = true }
    }

    /// A leaf shadow entry goes away (`flush`: L2's whole TLB must forget it; INVLPG's own
    /// entry needs no more than the INVLPG the L2 CPU does itself).
    private func clearLeaf(_ spte: L1GPA, flush: Bool = true) {
        if let gfn = leafTarget.removeValue(forKey: spte) {
            rmap[gfn]?.remove(spte)
            if rmap[gfn]?.isEmpty == true { rmap[gfn] = nil }
        }
        memory.store(spte, 0)
        if flush { flushNeeded = true }
    }

    /// Zaps one shadow page: its entries, its links from parents, its place in the cache.
    private func zap(_ key: Key) {
        guard let sp = pages.removeValue(forKey: key) else { return }
        keyOfPage[sp.page] = nil
        for i in 0..<UInt64(512) {
            let spte = sp.page + i * 8
            guard let e = memory.load(spte), e & Bit.present != 0 else { continue }
            if key.level == 1 || leafTarget[spte] != nil {
                clearLeaf(spte)
            } else if let child = keyOfPage[L1GPA(e & Bit.addressMask)] {
                pages[child]?.parents.remove(spte)
                memory.store(spte, 0)
            }
        }
        for parent in sp.parents { memory.store(parent, 0) }
        if !key.direct {
            shadowed[L2GPA(key.base)]?.remove(key)
            if shadowed[L2GPA(key.base)]?.isEmpty == true { shadowed[L2GPA(key.base)] = nil }
        }
        previousRoots.removeAll { $0.key == key }
        free.append(sp.page)
        flushNeeded = true
        count(.shadowPageZaps, 1)
        if sp.page == root {
            // The current root went: build it again (L2 is between instructions).
            root = page(for: Self.rootKey(cr3: rootCR3)).page
            count(.rootBuilds, 1)
        }
    }

    /// Makes sure a fill can take what it needs (4 pages): else zap everything, as KVM does
    /// when its shadow pages run out, and build the current root again.
    private func reserve() {
        guard free.count < 8 else { return }
        for key in Array(pages.keys) where pages[key] != nil { zap(key) }
        if pages.isEmpty || keyOfPage[root] == nil {
            root = page(for: Self.rootKey(cr3: rootCR3)).page
        }
    }

    // MARK: faults

    /// A shadow fault at `gva` for `access`, under the CR3 L2 last loaded (0: no paging).
    public func fault(_ gva: L2GVA, _ access: PageWalk.Access) -> FaultOutcome {
        reserve()
        let cr3 = rootCR3
        // 1. L2's own translation, as its CPU would do it (A/D flags set in L2's tables).
        var tables: [L2GPA] = []
        var entries: [UInt64] = []
        var addrs: [L2GPA] = []
        let gpa: L2GPA, pageBytes: UInt64
        if cr3 == 0 {
            gpa = L2GPA(gva.raw); pageBytes = 1 << 30
        } else {
            let walk = PageWalk.translate(gva, access, in: PageWalk.Context(cr3: cr3), read: { at in
                self.count(.guestPTEReads, 1)
                guard let l1 = self.backing.translate(at), let e = self.memory.load(l1) else { return nil }
                tables.append(at.pageBase)
                entries.append(e)
                addrs.append(at)
                return e
            }, write: { at, e in
                self.count(.guestADUpdates, 1)
                if let l1 = self.backing.translate(at) { self.memory.store(l1, e) }
                for i in addrs.indices where addrs[i] == at { entries[i] = e }
            })
            switch walk {
            case .mapped(let g, let bytes): gpa = g; pageBytes = bytes
            case .pageFault(let code): return .inject(errorCode: code)
            case .generalProtection: return .injectGeneralProtection
            case .tableUnreadable: return .inject(errorCode: PageWalk.ErrorCode.protection | PageWalk.ErrorCode.reserved)
            }
        }
        let gfn = gpa.pageBase
        guard let frame = backing.translate(gfn), !removed.contains(gfn) else { return .mmio(gpa) }

        // 2. A write to an L2 page table: unsync a leaf table, emulate anything else.
        var protected = false
        if let keys = shadowed[gfn], !keys.isEmpty {
            let synced = keys.filter { pages[$0]?.unsync == false }
            if access.contains(.write), !synced.isEmpty {
                if synced.allSatisfy({ $0.level == 1 }) {
                    for k in synced { pages[k]?.unsync = true }
                    count(.unsyncs, UInt64(synced.count))
                } else {
                    return .emulateWrite(gpa)
                }
            } else {
                protected = !synced.isEmpty
            }
        }

        // 3. Fill the shadow path down to the leaf. Every page the fill walks counts as used
        // (its write-flooding count starts again, as FNAME(fetch) clears it).
        let leafRights = Rights.of(entries)
        let leafDirty = cr3 == 0 || (entries.last ?? 0) & Bit.dirty != 0
        var table = root
        pages[Self.rootKey(cr3: rootCR3)]?.emulatedWrites = 0
        for level in stride(from: 4, through: 2, by: -1) {
            let spte = table + ((gva.raw >> (12 + 9 * UInt64(level - 1))) & 0x1FF) * 8
            let e = memory.load(spte) ?? 0
            // The child shadows L2's table one level down (keyed with the rights of the entries
            // above it), or (no paging, or a guest huge page above it) covers a range of L2 GPAs
            // directly, keyed with the rights of the whole walk, so every address space mapping
            // that guest page the same way shares it.
            let childLevel = level - 1
            let walkIndex = 4 - childLevel            // tables[0] is the PML4, [1] the PDPT...
            let key: Key
            if cr3 != 0, walkIndex < tables.count, pageBytes == pageSize || childLevel > (pageBytes == 1 << 21 ? 1 : 2) {
                key = Key(base: tables[walkIndex].raw, level: childLevel, direct: false, rights: Rights.of(entries.prefix(walkIndex)))
            } else {
                let span: UInt64 = 1 << (12 + 9 * UInt64(childLevel))
                key = Key(base: gpa.raw & ~(span - 1), level: childLevel, direct: true,
                          rights: leafDirty ? leafRights : leafRights & ~Rights.write)
            }
            if e & Bit.present != 0, let existing = keyOfPage[L1GPA(e & Bit.addressMask)] {
                if existing == key {
                    pages[key]?.emulatedWrites = 0
                    table = L1GPA(e & Bit.addressMask)
                    continue
                }
                // A direct child made for other rights (the huge page's D flag changed): unlink it
                // (KVM's validate_direct_spte).
                pages[existing]?.parents.remove(spte)
                memory.store(spte, 0)
                flushNeeded = true
            }
            // Linking a page that already exists: pages under it may be unsync, and nothing has
            // synced them for this address space (KVM: unsync_children -> KVM_REQ_MMU_SYNC).
            if pages[key] != nil { syncAll() }
            var child = page(for: key)
            // The table just shadowed may be the page being filled (a table mapping itself).
            if !key.direct, L2GPA(key.base) == gfn { protected = true }
            child.parents.insert(spte)
            child.emulatedWrites = 0
            pages[key] = child
            memory.store(spte, child.page.raw | Bit.present | Bit.writable | Bit.user | Bit.accessed)
            table = child.page
        }
        let spte = table + ((gva.raw >> 12) & 0x1FF) * 8
        // A sync above may have write-protected gfn again.
        protected = (shadowed[gfn] ?? []).contains { pages[$0]?.unsync == false }
        let writable = leafRights & Rights.write != 0 && (leafDirty || access.contains(.write)) && !protected
        var e = frame.raw | Bit.present | Bit.accessed
        if writable { e |= Bit.writable | Bit.dirty }
        if leafRights & Rights.user != 0 { e |= Bit.user }
        if leafRights & Rights.executeDisable != 0 { e |= Bit.executeDisable }
        setLeaf(spte, e, gfn: gfn)
        count(.shadowFills, 1)
        return .fixed
    }

    /// Writes a leaf shadow entry for `gfn`, keeping the reverse map; L2's TLB must be flushed
    /// only if the entry it replaces mapped another frame or allowed more (rights that only grow
    /// need no flush: the CPU walks again when its cached entry does not allow an access).
    private func setLeaf(_ spte: L1GPA, _ e: UInt64, gfn: L2GPA) {
        if let old = memory.load(spte), old & Bit.present != 0 {
            let lost = (old & Bit.writable != 0 && e & Bit.writable == 0) || (old & Bit.user != 0 && e & Bit.user == 0)
                || (old & Bit.executeDisable == 0 && e & Bit.executeDisable != 0)
            if lost || old & Bit.addressMask != e & Bit.addressMask { flushNeeded = true }
        }
        if let before = leafTarget[spte], before != gfn {
            rmap[before]?.remove(spte)
            if rmap[before]?.isEmpty == true { rmap[before] = nil }
        }
        memory.store(spte, e)
        rmap[gfn, default: []].insert(spte)
        leafTarget[spte] = gfn
    }

    /// L1 stored L2's write at `gpa` (an L2 page table): the shadow entries it changes go, and
    /// a shadow page written three times in a row without being used goes too.
    public func emulatedWrite(at gpa: L2GPA) {
        count(.emulatedPTEWrites, 1)
        let index = (gpa.raw & (pageSize - 1)) / 8
        for key in shadowed[gpa.pageBase] ?? [] {
            guard var sp = pages[key] else { continue }
            let spte = sp.page + index * 8
            if let e = memory.load(spte), e & Bit.present != 0 {
                if let child = keyOfPage[L1GPA(e & Bit.addressMask)], key.level > 1, leafTarget[spte] == nil {
                    pages[child]?.parents.remove(spte)
                    memory.store(spte, 0)
                    flushNeeded = true
                } else {
                    clearLeaf(spte)
                }
            }
            sp.emulatedWrites += 1
            pages[key] = sp
            if sp.emulatedWrites >= 3 { zap(key) }
        }
    }

    // MARK: CR3, INVLPG, sync

    /// MOV to CR3: the root for `cr3` from the cache or built, then every unsync page synced.
    public func loadCR3(_ cr3: UInt64) {
        reserve()
        let key = Self.rootKey(cr3: cr3)
        let oldKey = keyOfPage[root]
        if let i = previousRoots.firstIndex(where: { $0.cr3 == cr3 }), pages[previousRoots[i].key] != nil {
            previousRoots.remove(at: i)
            count(.rootCacheHits, 1)
        } else if cr3 == rootCR3, oldKey == key {
            count(.rootCacheHits, 1)
        } else {
            count(.rootBuilds, 1)
        }
        if let oldKey, oldKey != key {
            previousRoots.insert((rootCR3, oldKey), at: 0)
            if previousRoots.count > Self.previousRootCapacity { previousRoots.removeLast() }
        }
        root = page(for: key).page
        rootCR3 = cr3
        syncAll()
        // The CPU's own CR3 load flushes its TLB (no PCID): nothing more to ask for.
        flushNeeded = false
    }

    /// Every unsync page brought back in line with L2's table and write-protected again.
    func syncAll() {
        for key in Array(pages.keys) where pages[key]?.unsync == true { sync(key) }
    }

    private func sync(_ key: Key) {
        guard let sp = pages[key] else { return }
        count(.resyncs, 1)
        for i in 0..<UInt64(512) {
            let spte = sp.page + i * 8
            guard leafTarget[spte] != nil else { continue }
            resyncEntry(spte, guestEntryAt: L2GPA(key.base) + i * 8, upper: key.rights)
        }
        pages[key]?.unsync = false
        writeProtect(L2GPA(key.base))
    }

    /// One leaf shadow entry against L2's entry, under the rights of the entries above it
    /// (`upper`, the shadow page's role): dropped if L2's entry went, changed frame or lost its
    /// accessed flag (the next access faults and sets it again, as an OS aging pages expects:
    /// KVM's prefetch_invalid_gpte); else given the rights of the whole walk (W only if dirty,
    /// and only if it had it: a protected table stays protected).
    private func resyncEntry(_ spte: L1GPA, guestEntryAt at: L2GPA, upper: UInt8, flush: Bool = true) {
        count(.guestPTEReads, 1)
        guard let l1 = backing.translate(at), let g = memory.load(l1), g & Bit.present != 0, g & Bit.accessed != 0,
              let frame = backing.translate(L2GPA(g & Bit.addressMask & ~(pageSize - 1))),
              let old = memory.load(spte), old & Bit.addressMask == frame.raw else {
            clearLeaf(spte, flush: flush)
            return
        }
        let rights = Rights.combine(upper, Rights.of([g]))
        var e = frame.raw | Bit.present | Bit.accessed
        if rights & Rights.user != 0 { e |= Bit.user }
        if rights & Rights.executeDisable != 0 { e |= Bit.executeDisable }
        if rights & Rights.write != 0, g & Bit.dirty != 0, old & Bit.writable != 0 { e |= Bit.writable | Bit.dirty }
        if e != old { memory.store(spte, e); if flush { flushNeeded = true } }
    }

    /// INVLPG: the leaf entry for `gva`, synced if its page is unsync. The L2 CPU drops its own
    /// TLB entry for `gva`; nothing else needs flushing.
    public func invlpg(_ gva: L2GVA) {
        count(.invlpgs, 1)
        var table = root
        for level in stride(from: 4, through: 2, by: -1) {
            let spte = table + ((gva.raw >> (12 + 9 * UInt64(level - 1))) & 0x1FF) * 8
            guard let e = memory.load(spte), e & Bit.present != 0, keyOfPage[L1GPA(e & Bit.addressMask)] != nil else { return }
            table = L1GPA(e & Bit.addressMask)
        }
        guard let key = keyOfPage[table], let sp = pages[key], sp.unsync, !key.direct else { return }
        let index = (gva.raw >> 12) & 0x1FF
        let spte = table + index * 8
        guard leafTarget[spte] != nil else { return }
        count(.resyncs, 1)
        resyncEntry(spte, guestEntryAt: L2GPA(key.base) + index * 8, upper: key.rights, flush: false)
    }

    /// L1 took `gfn` back from L2 (balloon): every shadow entry mapping it goes.
    public func remove(_ gfn: L2GPA) {
        removed.insert(gfn.pageBase)
        for spte in rmap[gfn.pageBase] ?? [] { clearLeaf(spte) }
    }

    /// For tests: the shadow pages in use, and whether an L2 page is shadowed and how.
    public var shadowPageCount: Int { pages.count }
    public var freePageCount: Int { free.count }
    public func isShadowed(_ gfn: L2GPA) -> Bool { !(shadowed[gfn.pageBase] ?? []).isEmpty }
    public func isUnsync(_ gfn: L2GPA) -> Bool {
        (shadowed[gfn.pageBase] ?? []).contains { pages[$0]?.unsync == true }
    }
}
