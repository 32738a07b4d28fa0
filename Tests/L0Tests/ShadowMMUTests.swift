// pvm-rfc's shadow MMU (L1PV/ShadowMMU.swift), fed made-up guest tables in a dictionary of
// L1 memory and driven by a small CPU model that walks the shadow tables as L2's CPU does.
import ABI
import L1PV
import Testing
import TestSupport

/// L1's memory as a dictionary of u64 words; L2's RAM is L2 GPA [0, 64 MiB) at L1 GPA 0x1000_0000.
final class FakeL1Memory: ShadowMMUMemory {
    var words: [UInt64: UInt64] = [:]
    static let ramBase: UInt64 = 0x1000_0000
    static let ramSize: UInt64 = 64 << 20
    func load(_ gpa: L1GPA) -> UInt64? { gpa.raw < 0x2000_0000 ? words[gpa.raw] ?? 0 : nil }
    @discardableResult func store(_ gpa: L1GPA, _ value: UInt64) -> Bool {
        guard gpa.raw < 0x2000_0000 else { return false }
        words[gpa.raw] = value
        return true
    }
    static func backing(_ gpa: L2GPA) -> L1GPA? { gpa.raw < ramSize ? L1GPA(ramBase + gpa.raw) : nil }
    subscript(l2 gpa: L2GPA) -> UInt64 {
        get { words[Self.ramBase + gpa.raw] ?? 0 }
        set { words[Self.ramBase + gpa.raw] = newValue }
    }
}

/// L2 with its tables and L1's shadow MMU: what L2's CPU would see for an access.
final class ShadowRig {
    typealias Bit = PageWalk.Bit
    let memory = FakeL1Memory()
    var counts: [SwitcherCounter: UInt64] = [:]
    lazy var mmu = ShadowMMU(memory: memory, pool: AddressRange(start: L1GPA(0x0100_0000), length: 2 << 20)!,
                             backing: .init(translate: FakeL1Memory.backing), count: { [unowned self] c, n in self.counts[c, default: 0] += n })
    var cr3: UInt64 = 0
    var nextTable = L2GPA(0x10_0000)          // L2 page tables live in [1 MiB, 2 MiB), identity-mapped
    /// L2's TLB, as the CPU keeps it: flushed when L1 asks (and by INVLPG / CR3 loads).
    /// (A fill keeps the rights its walk checked: a supervisor read does not serve a user one.)
    var tlb: [UInt64: (frame: L1GPA, user: Bool)] = [:]

    enum Result: Equatable { case frame(L1GPA), pageFault(UInt32), generalProtection, mmio(L2GPA) }

    func table() -> L2GPA { defer { nextTable = nextTable + pageSize }; return nextTable }

    /// Builds a PML4 mapping [0, 2 MiB) 1:1 (supervisor, writable: L2's direct map of its tables).
    func newSpace() -> L2GPA {
        let pml4 = table(), pdpt = table(), pd = table(), pt = table()
        memory[l2: pml4] = pdpt.raw | Bit.present | Bit.writable | Bit.user
        memory[l2: pdpt] = pd.raw | Bit.present | Bit.writable | Bit.user
        memory[l2: pd] = pt.raw | Bit.present | Bit.writable | Bit.user
        for i in 0..<UInt64(512) { memory[l2: pt + i * 8] = (i << 12) | Bit.present | Bit.writable }
        return pml4
    }

    /// The guest's own translation (the reference): what L2's tables say, without the shadow.
    func reference(_ gva: UInt64, _ access: PageWalk.Access) -> PageWalk.Outcome {
        PageWalk.translate(L2GVA(gva), access, in: PageWalk.Context(cr3: cr3), read: { self.memory[l2: $0] }, write: { _, _ in })
    }

    /// The leaf entry of `gva` in L2's tables (building them, directly in memory, as set-up);
    /// a table it has to make gets `upper` in the entry that points to it.
    func setupMap(_ gva: UInt64, to gpa: UInt64, flags: UInt64, upper: () -> UInt64 = { Bit.present | Bit.writable | Bit.user }) {
        var t = L2GPA(cr3)
        for level in stride(from: 4, through: 2, by: -1) {
            let at = t + ((gva >> (12 + 9 * UInt64(level - 1))) & 0x1FF) * 8
            if memory[l2: at] & Bit.present == 0 { memory[l2: at] = table().raw | upper() }
            t = L2GPA(memory[l2: at] & Bit.addressMask)
        }
        memory[l2: t + ((gva >> 12) & 0x1FF) * 8] = gpa | flags
    }

    /// Where L2's page-directory entry for `gva` is (an upper-level table's entry).
    func pdeAddress(_ gva: UInt64) -> L2GPA {
        var t = L2GPA(cr3)
        for level in stride(from: 4, through: 3, by: -1) {
            t = L2GPA(memory[l2: t + ((gva >> (12 + 9 * UInt64(level - 1))) & 0x1FF) * 8] & Bit.addressMask)
        }
        return t + ((gva >> 21) & 0x1FF) * 8
    }

    /// Where L2's leaf entry for `gva` is (its tables must exist).
    func pteAddress(_ gva: UInt64) -> L2GPA {
        var t = L2GPA(cr3)
        for level in stride(from: 4, through: 2, by: -1) {
            t = L2GPA(memory[l2: t + ((gva >> (12 + 9 * UInt64(level - 1))) & 0x1FF) * 8] & Bit.addressMask)
        }
        return t + ((gva >> 12) & 0x1FF) * 8
    }

    /// One access as L2's CPU makes it on pvm-rfc: the TLB, else the shadow walk, else a #PF
    /// exit L1 answers (fix and retry, inject, MMIO, or an emulated write with `value`).
    func access(_ gva: UInt64, _ kind: PageWalk.Access, value: UInt64 = 0) -> Result {
        for _ in 0..<8 {
            if let e = tlb[gva >> 12], !kind.contains(.write), !kind.contains(.fetch), e.user || !kind.contains(.user) {
                return .frame(e.frame + (gva & 0xFFF))
            }
            let walk = PageWalk.translate(L2GVA(gva), kind, root: mmu.root, nxe: true,
                                          read: { self.memory.load($0) }, write: { self.memory.store($0, $1) })
            switch walk {
            case .mapped(let f, _):
                if !kind.contains(.write) && !kind.contains(.fetch) { tlb[gva >> 12] = (f.pageBase, kind.contains(.user)) }
                if kind.contains(.write) { memory.store(f, value) }
                return .frame(f)
            case .pageFault:
                let outcome = mmu.fault(L2GVA(gva), kind)
                if mmu.takeFlushRequest() { tlb = [:] }
                switch outcome {
                case .fixed: continue
                case .inject(let c): return .pageFault(c)
                case .injectGeneralProtection: return .generalProtection
                case .mmio(let g): return .mmio(g)
                case .emulateWrite(let g):
                    memory[l2: g] = value
                    mmu.emulatedWrite(at: g)
                    if mmu.takeFlushRequest() { tlb = [:] }
                    return .frame(FakeL1Memory.backing(g)!)
                }
            default: Issue.record("shadow walk of 0x\(String(gva, radix: 16)): \(walk)"); return .mmio(L2GPA(0))
            }
        }
        Issue.record("0x\(String(gva, radix: 16)) never settled")
        return .mmio(L2GPA(0))
    }

    /// L2 writes its own page-table entry through its direct map (a store the shadow sees).
    func writePTE(_ at: L2GPA, _ value: UInt64) { _ = access(at.raw, [.write], value: value) }
    func invlpg(_ gva: UInt64) { mmu.invlpg(L2GVA(gva)); tlb[gva >> 12] = nil; if mmu.takeFlushRequest() { tlb = [:] } }
    func loadCR3(_ v: UInt64) { cr3 = v; mmu.loadCR3(v); tlb = [:]; _ = mmu.takeFlushRequest() }

    /// What the shadow gives for `gva` must be what L2's tables say, through L1's map.
    func expectMatchesReference(_ gva: UInt64, _ kind: PageWalk.Access = [], sourceLocation: SourceLocation = #_sourceLocation) {
        let got = access(gva, kind)
        switch reference(gva, kind) {
        case .mapped(let gpa, _):
            if let l1 = FakeL1Memory.backing(gpa) {
                #expect(got == .frame(l1), "0x\(String(gva, radix: 16)) -> \(gpa)", sourceLocation: sourceLocation)
            } else {
                #expect(got == .mmio(gpa), sourceLocation: sourceLocation)
            }
        case .pageFault(let code):
            #expect(got == .pageFault(code), "0x\(String(gva, radix: 16)) \(kind)", sourceLocation: sourceLocation)
        case .generalProtection:
            #expect(got == .generalProtection, sourceLocation: sourceLocation)
        default:
            Issue.record("reference walk failed", sourceLocation: sourceLocation)
        }
    }
}

@Suite struct ShadowMMUTests {
    typealias Bit = PageWalk.Bit
    static let data = Bit.present | Bit.writable | Bit.user

    @Test func withoutPagingTheShadowIsTheIdentityThroughL1sMap() {
        let rig = ShadowRig()
        #expect(rig.access(0x20_3008, []) == .frame(L1GPA(0x1020_3008)))
        #expect(rig.access(0x8000_0000, []) == .mmio(L2GPA(0x8000_0000)))     // outside L2's RAM
        #expect(rig.counts[.shadowFills] == 1)
    }

    @Test func aFaultFillsFromL2sTablesAndANotPresentOneIsL2s() {
        let rig = ShadowRig()
        rig.loadCR3(rig.newSpace().raw)
        rig.setupMap(0x4000_0000, to: 0x30_0000, flags: Self.data)
        rig.expectMatchesReference(0x4000_0000)
        rig.expectMatchesReference(0x4000_1000)                                 // not present: L2's #PF
        rig.expectMatchesReference(0x4000_0000, [.user, .write])
        #expect(rig.counts[.injectedEvents, default: 0] == 0)                    // the rig injects, not the MMU
        #expect(rig.memory[l2: rig.pteAddress(0x4000_0000)] & (Bit.accessed | Bit.dirty) == Bit.accessed | Bit.dirty)
    }

    @Test func aReadOfACleanPageMapsItReadOnlySoTheFirstWriteSetsDirty() {
        let rig = ShadowRig()
        rig.loadCR3(rig.newSpace().raw)
        rig.setupMap(0x4000_0000, to: 0x30_0000, flags: Self.data)
        _ = rig.access(0x4000_0000, [])
        #expect(rig.memory[l2: rig.pteAddress(0x4000_0000)] & Bit.dirty == 0)
        let fills = rig.counts[.shadowFills] ?? 0
        _ = rig.access(0x4000_0000, [.write], value: 7)
        #expect(rig.memory[l2: rig.pteAddress(0x4000_0000)] & Bit.dirty != 0)
        #expect(rig.counts[.shadowFills] == fills + 1)
    }

    @Test func aWriteToAShadowedLeafTableUnsyncsItAndINVLPGBringsTheChangeIn() {
        let rig = ShadowRig()
        rig.loadCR3(rig.newSpace().raw)
        rig.setupMap(0x4000_0000, to: 0x30_0000, flags: Self.data)
        rig.expectMatchesReference(0x4000_0000)
        let pte = rig.pteAddress(0x4000_0000)
        #expect(rig.mmu.isShadowed(pte) && !rig.mmu.isUnsync(pte))
        rig.writePTE(pte, 0x31_0000 | Self.data)                                // the leaf table goes unsync
        #expect(rig.mmu.isUnsync(pte) && rig.counts[.unsyncs] == 1)
        rig.writePTE(pte + 8, 0x32_0000 | Self.data)                            // no more faults for it
        #expect(rig.counts[.unsyncs] == 1 && rig.counts[.emulatedPTEWrites, default: 0] == 0)
        rig.invlpg(0x4000_0000)
        rig.expectMatchesReference(0x4000_0000)                                  // the new frame, never the stale one
        rig.expectMatchesReference(0x4000_1000)
    }

    @Test func aWriteToAnUpperTableIsEmulatedAndThreeInARowZapTheShadowPage() {
        let rig = ShadowRig()
        rig.loadCR3(rig.newSpace().raw)
        rig.setupMap(0x4000_0000, to: 0x30_0000, flags: Self.data)
        rig.expectMatchesReference(0x4000_0000)
        // The PD entry that leads to 0x4000_0000's table: an upper-level table, shadowed.
        var t = L2GPA(rig.cr3)
        for level in stride(from: 4, through: 3, by: -1) {
            t = L2GPA(rig.memory[l2: t + ((0x4000_0000 >> (12 + 9 * UInt64(level - 1))) & 0x1FF) * 8] & Bit.addressMask)
        }
        let pde = t + ((0x4000_0000 >> 21) & 0x1FF) * 8
        #expect(rig.mmu.isShadowed(pde) && !rig.mmu.isUnsync(pde))
        rig.writePTE(pde, 0)                                                     // unmap the whole 2 MiB
        #expect(rig.counts[.emulatedPTEWrites] == 1 && rig.memory[l2: pde] == 0)
        rig.expectMatchesReference(0x4000_0000)                                  // L2's #PF at once: the entry was zapped
        rig.writePTE(pde + 8, 0)
        rig.writePTE(pde + 16, 0)
        #expect(rig.counts[.shadowPageZaps, default: 0] >= 1 && !rig.mmu.isShadowed(pde))
    }

    /// Write flooding counts writes in a row: a use of the page in between starts it again.
    @Test func aShadowPageUsedBetweenEmulatedWritesIsNotZapped() {
        let rig = ShadowRig()
        rig.loadCR3(rig.newSpace().raw)
        rig.setupMap(0x4000_0000, to: 0x30_0000, flags: Self.data)
        let pml4 = L2GPA(rig.cr3)
        for i in 1..<UInt64(4) { rig.setupMap(0x4000_0000 + i * pageSize, to: 0x30_0000 + i * pageSize, flags: Self.data) }
        for i in 0..<UInt64(4) {
            rig.writePTE(pml4 + (100 + i) * 8, 0)                                // an unused entry of the root
            rig.tlb = [:]
            rig.expectMatchesReference(0x4000_0000 + i * pageSize)                // a fill walks through the root
        }
        #expect(rig.counts[.emulatedPTEWrites] == 4 && rig.counts[.shadowPageZaps, default: 0] == 0)
    }

    @Test func aCR3SwitchUsesTheCacheOfRootsAndSyncsWhatWentUnsync() {
        let rig = ShadowRig()
        let a = rig.newSpace(), b = rig.newSpace()
        rig.loadCR3(a.raw)
        rig.setupMap(0x4000_0000, to: 0x30_0000, flags: Self.data)
        rig.expectMatchesReference(0x4000_0000)
        rig.loadCR3(b.raw)
        rig.setupMap(0x4000_0000, to: 0x40_0000, flags: Self.data)
        rig.expectMatchesReference(0x4000_0000)
        rig.loadCR3(a.raw)
        #expect(rig.counts[.rootCacheHits] == 1 && rig.counts[.rootBuilds] == 2)
        rig.expectMatchesReference(0x4000_0000)
        let pte = rig.pteAddress(0x4000_0000)
        rig.writePTE(pte, 0x33_0000 | Self.data)                                // unsync, no INVLPG
        rig.loadCR3(b.raw)
        rig.loadCR3(a.raw)                                                       // the sync at the CR3 load
        rig.expectMatchesReference(0x4000_0000)
        #expect(!rig.mmu.isUnsync(pte) && rig.counts[.resyncs, default: 0] >= 1)
    }

    /// Random tables and random PTE writes by L2 (each followed by INVLPG, or by a CR3 reload):
    /// the shadow always answers what L2's tables say through L1's map, never a stale frame and
    /// never memory outside L2's RAM; and a synced page-table page is never writable to L2.
    @Test func theShadowAlwaysAgreesWithL2sTables() async {
        let coverage = Coverage()
        let ok = await seededCheck(count: 60) { g in
            let rig = ShadowRig()
            rig.loadCR3(rig.newSpace().raw)
            let gvas = (0..<UInt64(24)).map { 0x4000_0000 + ($0 % 6) * (2 << 20) + ($0 / 6) * pageSize }
            func randomEntry() -> UInt64 {
                guard g.chance(0.8) else { return 0 }
                let frame = g.chance(0.9) ? (0x20_0000 + g.below(512) * pageSize) : (FakeL1Memory.ramSize + g.below(16) * pageSize)
                return frame | Bit.present | (g.chance(0.7) ? Bit.writable : 0) | (g.chance(0.8) ? Bit.user : 0)
            }
            // Upper levels with random rights too (the PDEs: W, U and XD each may be off), and the
            // last 2 MiB sharing the first one's page table through a PDE of other rights.
            func randomUpper() -> UInt64 {
                Bit.present | (g.chance(0.8) ? Bit.writable : 0) | (g.chance(0.8) ? Bit.user : 0) | (g.chance(0.15) ? Bit.executeDisable : 0)
            }
            for v in gvas where (v - 0x4000_0000) >> 21 < 5 {
                rig.setupMap(v, to: 0, flags: 0, upper: randomUpper)
                rig.memory[l2: rig.pteAddress(v)] = randomEntry()
            }
            let shared = rig.pdeAddress(0x4000_0000 + 5 * (2 << 20))
            rig.memory[l2: shared] = (rig.memory[l2: rig.pdeAddress(0x4000_0000)] & Bit.addressMask) | randomUpper()
            for _ in 0..<g.int(20...60) {
                let v = g.pick(gvas)
                var kind: PageWalk.Access = []
                if g.chance(0.4) { kind.insert(.write) } else if g.chance(0.2) { kind.insert(.fetch) }
                if g.chance(0.5) { kind.insert(.user) }
                switch g.below(14) {
                case 13:
                    // The OS clears the accessed flag (page aging) and INVLPGs: the next access
                    // must set it again, so the shadow may not keep serving the page silently.
                    let pte = rig.pteAddress(v)
                    rig.writePTE(pte, rig.memory[l2: pte] & ~Bit.accessed)
                    rig.invlpg(v)
                    if case .frame = rig.access(v, []) {
                        if rig.memory[l2: pte] & Bit.accessed == 0 { Issue.record("0x\(String(v, radix: 16)) used with its accessed flag clear") }
                    }
                    coverage.hit("accessed cleared")
                case 10, 11:
                    // L2's kernel reads its own entries through its direct map (a read fill of a
                    // page-table page, which must stay read-only while it is shadowed and synced).
                    _ = rig.access((g.chance(0.5) ? rig.pteAddress(v) : rig.pdeAddress(v)).raw, [])
                    coverage.hit("pte read")
                case 12:
                    // An upper-level entry rewritten as it was: emulated, the shadow entry zapped.
                    let pde = rig.pdeAddress(v)
                    rig.writePTE(pde, rig.memory[l2: pde])
                    rig.invlpg(v)
                    coverage.hit("pde write")
                case 0..<5:
                    rig.expectMatchesReference(v, kind)
                    coverage.hit(kind.contains(.write) ? "write" : kind.contains(.fetch) ? "fetch" : "read")
                    if case .pageFault(let c) = rig.reference(v, kind), c & PageWalk.ErrorCode.protection != 0 { coverage.hit("denied") }
                case 5..<8:
                    // The page table is shared by two 2 MiB ranges: an OS flushes both addresses.
                    rig.writePTE(rig.pteAddress(v), randomEntry())
                    rig.invlpg(v)
                    let offset = (v - 0x4000_0000) % (2 << 20), range = (v - 0x4000_0000) >> 21
                    if range == 0 || range == 5 { rig.invlpg(0x4000_0000 + (5 - range) * (2 << 20) + offset) }
                    coverage.hit("pte write + invlpg")
                    rig.expectMatchesReference(v, kind)
                default:
                    rig.writePTE(rig.pteAddress(v), randomEntry())
                    rig.loadCR3(rig.cr3)
                    coverage.hit("pte write + cr3")
                    for w in gvas { rig.expectMatchesReference(w, []) }
                }
                // A synced shadowed table page is never writable through the shadow.
                for pt in AddressRange(start: L2GPA(0x10_0000), length: rig.nextTable.raw - 0x10_0000)!.pages {
                    guard rig.mmu.isShadowed(pt), !rig.mmu.isUnsync(pt) else { continue }
                    let walk = PageWalk.translate(L2GVA(pt.raw), [.write], root: rig.mmu.root, nxe: true,
                                                  read: { rig.memory.load($0) }, write: { _, _ in })
                    if case .mapped = walk { Issue.record("synced table \(pt) is writable through the shadow") }
                }
            }
            if rig.counts[.unsyncs, default: 0] > 0 { coverage.hit("unsync") }
            if rig.counts[.emulatedPTEWrites, default: 0] > 0 { coverage.hit("emulated") }
        }
        if ok { coverage.expectAtLeast(["read": 100, "write": 50, "pte write + invlpg": 50, "pte write + cr3": 20, "pte read": 20, "pde write": 10, "unsync": 10, "emulated": 5,
                                        "accessed cleared": 10, "fetch": 20, "denied": 50]) }
    }

    /// A pool that runs dry is zapped whole and the MMU goes on (KVM's kvm_mmu_zap_all).
    @Test func aDryPoolZapsEverythingAndKeepsTranslating() {
        let rig = ShadowRig()
        rig.loadCR3(rig.newSpace().raw)
        for i in 0..<UInt64(1200) {
            let gva = 0x40_0000_0000 + i * (1 << 21)                            // a new page table each
            rig.setupMap(gva, to: 0x30_0000, flags: Self.data)
            rig.expectMatchesReference(gva)
        }
        #expect(rig.counts[.shadowPageZaps, default: 0] > 0 && rig.mmu.freePageCount > 0)
    }
}
