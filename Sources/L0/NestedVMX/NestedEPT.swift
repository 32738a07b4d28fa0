import ABI
import Transport

/// EPT-on-EPT as KVM's shadow MMU does it (paging_tmpl.h for nested EPT; mmu.c's write
/// tracking and unsync; kvm-nested-work.md section 4): L0 walks L1's EPT12 for an L2 EPT
/// violation, installs EPT02 entries from what it finds and write-protects every EPT12 page it
/// read. A non-leaf table stays write-tracked: each store is emulated and the EPT02 entries that
/// went through the entry it touched are zapped. A 4 KiB leaf table goes unsync at its first
/// store (no more traps). INVEPT frees the roots but the shadow pages survive and are reused:
/// only the unsync leaves are re-synced (write-protected again, each entry re-read, the EPT02
/// entries whose EPT12 entry changed dropped). Only a new EPTP starts from scratch.

/// What L0 remembers about the EPT12 pages its EPT02 entries came from (KVM: shadow pages).
public struct EPT12ShadowTracker: Sendable {
    public struct ShadowPage: Equatable, Sendable {
        /// 4 = PML4 ... 1 = the 4 KiB leaf table.
        public var level: Int
        /// L2 page number -> this table's entry on its walk, as read when the shadow was made.
        public var entries: [UInt64: UInt64]
        /// The L2 pages whose translation went through this table.
        public var dependents: Set<UInt64> { Set(entries.keys) }
    }
    /// L1 page number of a shadowed table -> its shadow.
    public internal(set) var tables: [UInt64: ShadowPage] = [:]
    public internal(set) var unsync: Set<UInt64> = []
    public init() {}

    /// The bits of an EPT12 entry whose change changes the translation (A/D bits do not).
    static let significant: UInt64 = EPT.addressMask | EPT.rwxMask | EPT.largePage | EPT.memoryTypeMask

    /// Forgets L2 page `l2` in every table.
    mutating func forget(_ l2: UInt64) {
        for page in tables.keys { tables[page]?.entries[l2] = nil }
    }
}

extension NestedVMXBackend {
    /// An L2 EPT violation on EPT02: walk L1's EPT12. No L1 mapping, too few rights or a
    /// misconfiguration -> reflect (L1 fixes its tables); a mapping -> install the EPT02 entry
    /// and retry L2 silently.
    func handleEPTViolation(_ exit: L2Exit, gpa: L2GPA, access: UInt64, _ vmcs12: VMCSImage,
                            _ regs: inout RegisterFile, _ vcpu: L0VCPU) -> NextStep {
        // EPT02 is one table for the VM and shadows one EPTP: a vCPU whose EPTP is another
        // (an L1 running two L2 VMs, or one that switched) takes it over first, so nothing
        // filled from one EPT12 is ever used under the other (nor escapes its INVEPT).
        let eptp = vmcs12[.eptPointer]
        shadowEPT12(of: eptp, vcpu)
        let walk = EPT12Walker(memory: vcpu.l1Memory).walk(eptp: eptp, gpa: gpa, write: access & EPT.write != 0)
        vcpu.counters.ept12EntriesWalked += UInt64(walk.entriesRead)
        vcpu.counters.ept12ADUpdates += UInt64(walk.adUpdates)
        /// The reflected violation reports the walk's rights in bits 3-5.
        func reflectViolation(_ perms: UInt64) -> NextStep {
            vcpu.countVMMUserspaceExit(exit)        // an access L1's device model answers
            // ...or L1's in-kernel APIC, through its emulator: the xAPIC page L2's APICs live
            // in (L1 runs them on nVMX; L0 knows L1's platform, as for its devices).
            if XAPIC.offset(of: gpa) != nil { vcpu.counters.apicMMIOEmulations += 1 }
            var info = exit.info
            info.qualification = (info.qualification & ~(EPT.rwxMask << EPTViolationQualification.readableShift))
                | perms << EPTViolationQualification.readableShift
            return reflect(info, l2: regs, vcpu)
        }
        switch walk.result {
        case .misconfigured:
            var info = exit.info
            info.reason = .eptMisconfig
            info.qualification = 0
            return reflect(info, l2: regs, vcpu)
        case .notPresent(let perms):
            return reflectViolation(perms)
        case let .mapped(l1, perms, _):
            guard access & ~perms == 0 else { return reflectViolation(perms) }
            guard let slot = vcpu.l1Memory.memslots.slot(containing: l1),
                  let host = try? vcpu.l1Memory.memslots.translate(l1.pageBase, length: pageSize) else {
                // EPT12 points at an L1 GPA no memslot backs: MMIO to nothing in L1's platform
                // (KVM exits to L0's userspace, where no device answers). Complete it that way.
                return vcpu.completeUnbackedAccess(exit, &regs)
            }
            let allowed = slot.flags & MemorySlot.readOnlyFlag != 0 ? perms & ~EPT.write : perms
            guard access & ~allowed == 0 else {
                // A write to read-only L1 memory (a ROM): the write is dropped, as MMIO to a ROM.
                return vcpu.completeUnbackedAccess(exit, &regs)
            }
            guard vcpu.ept02.install(gpa.pageBase, host: host, permissions: allowed, memslot: slot.slot) else {
                return .stop(.fatal(.beyondL2AddressLimit(gpa)))
            }
            shadowWalk(walk, for: gpa)
            vcpu.counters.ept02Fills += 1
            return .resume(.l2)
        }
    }

    func setWriteProtected(_ page: UInt64, _ on: Bool) {
        guard page < writeProtect.bitCount else { return }
        writeProtect[page] = on
    }

    /// After installing an EPT02 entry for `l2`: shadow (write-protect) the tables its walk read.
    func shadowWalk(_ walk: EPT12Walker.Walk, for l2: L2GPA) {
        for (i, (table, entry)) in zip(walk.tables, walk.entries).enumerated() {
            let page = table.pageNumber
            let level = EPT.levels - i
            shadows.tables[page, default: .init(level: level, entries: [:])].entries[l2.pageNumber] = entry & EPT12ShadowTracker.significant
            if !shadows.unsync.contains(page) { setWriteProtected(page, true) }
        }
    }

    /// L1 stored to one of its write-protected pages and trapped (its own EPT violation, reason
    /// 48): emulate the store, then keep EPT02 honest. A leaf table goes unsync (no more traps);
    /// a non-leaf table stays tracked and loses the EPT02 entries that went through the entry
    /// the store touched (kvm_mmu_track_write). A store to a page not protected just completes.
    func handleProtectedStore(_ gpa: L1GPA, size: UInt64, value: UInt64, _ exit: L1Exit,
                              _ regs: inout RegisterFile, _ vcpu: L0VCPU) -> NextStep {
        let stored: Bool
        switch size {
        case 1: stored = (try? vcpu.l1Memory.store(UInt8(truncatingIfNeeded: value), gpa)) != nil
        case 4: stored = (try? vcpu.l1Memory.store(UInt32(truncatingIfNeeded: value), gpa)) != nil
        default: stored = (try? vcpu.l1Memory.store(value, gpa)) != nil
        }
        guard stored else { return .stop(.fatal(.l1StoreOutsideMemory(gpa))) }
        regs.skipInstruction(length: exit.info.instructionLength)
        vcpu.counters.ept12WriteTraps += 1
        let page = gpa.pageNumber
        guard let shadow = shadows.tables[page] else { return .resume(.l1) }
        if shadow.level == 1 {
            shadows.unsync.insert(page)
            setWriteProtected(page, false)
            vcpu.counters.ept12Unsyncs += 1
        } else {
            // The entries the store touched; a store that is not inside one entry (misaligned,
            // or crossing into the next) zaps the whole shadow page, as detect_write_misaligned
            // makes KVM do.
            let first = gpa.offsetInPage / 8
            let last = (gpa.offsetInPage &+ max(size, 1) &- 1) / 8
            let wholePage = first != last
            for dep in shadow.dependents {
                guard let l2 = L2GPA(pageNumber: dep),
                      wholePage || EPT.tableIndex(l2, level: shadow.level) == first else { continue }
                vcpu.ept02.remove(page: l2)
                shadows.forget(dep)
            }
        }
        return .resume(.l1)
    }

    /// INVEPT (single-context for the current root, or global): KVM frees the roots, but the
    /// shadow pages survive and the next root reuses them after kvm_mmu_sync_roots: each unsync
    /// leaf is write-protected again and its entries re-read (ept_sync_spte); an EPT02 entry
    /// whose EPT12 entry changed is dropped, the rest stay.
    func syncShadowsAtINVEPT(_ vcpu: L0VCPU) {
        for page in shadows.unsync.sorted() {
            defer {
                shadows.unsync.remove(page)
                setWriteProtected(page, true)
                vcpu.counters.ept12Resyncs += 1
            }
            guard let shadow = shadows.tables[page], let table = L1GPA(pageNumber: page) else { continue }
            for (dep, seen) in shadow.entries {
                guard let l2 = L2GPA(pageNumber: dep) else { continue }
                let now = (try? vcpu.l1Memory.load(table + EPT.tableIndex(l2, level: shadow.level) * 8, as: UInt64.self)) ?? 0
                vcpu.counters.ept12EntriesWalked += 1
                if now & EPT12ShadowTracker.significant != seen {
                    vcpu.ept02.remove(page: l2)
                    shadows.forget(dep)
                }
            }
        }
    }

    /// EPT02 shadows the EPT12 that `eptp` names from now on: if that is another than the
    /// one it shadows, it starts empty.
    func shadowEPT12(of eptp: UInt64, _ vcpu: L0VCPU) {
        guard shadowedEPTP != eptp else { return }
        dropEPT02Shadows(vcpu)
        shadowedEPTP = eptp
    }

    /// A new EPTP: nothing shadowed from the old tables applies (free every shadow, EPT02 and
    /// the write protection that guarded it).
    func dropEPT02Shadows(_ vcpu: L0VCPU) {
        vcpu.ept02.removeAll()
        for page in shadows.tables.keys { setWriteProtected(page, false) }
        shadows = EPT12ShadowTracker()
    }
}

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
        /// The entry read from each of those tables, in the same order.
        public var entries: [UInt64] = []

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
            let at = table + EPT.tableIndex(gpa, level: level) * 8
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
        var entries: [UInt64] = []
        for level in stride(from: EPT.levels, through: 1, by: -1) {
            tables.append(table)
            let shift = UInt64(12 + 9 * (level - 1))
            let index = EPT.tableIndex(gpa, level: level)
            guard let entryAddress = table.adding(index * 8),
                  let entry = try? memory.load64(entryAddress) else {
                return Walk(result: .notPresent(permissions: 0), entriesRead: read)
            }
            read += 1
            entries.append(entry)
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
                var w = Walk(result: .mapped(L1GPA(base) + (gpa.raw & (size - 1)), permissions: perms, pageSize: size),
                             entriesRead: read, tables: tables)
                w.entries = entries
                return w
            }
            // Non-leaf: bits 7:3 are reserved.
            if entry & 0xF8 != 0 { return Walk(result: .misconfigured(level: level), entriesRead: read) }
            table = L1GPA(entry & EPT.addressMask)
        }
        return Walk(result: .notPresent(permissions: 0), entriesRead: read)   // unreachable: level 1 is a leaf
    }
}
