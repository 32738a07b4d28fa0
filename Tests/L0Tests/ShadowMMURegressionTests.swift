// Review findings against pvm-rfc's shadow MMU (L1PV/ShadowMMU.swift), on the ShadowMMUTests rig.
import ABI
import L1PV
import Testing
import TestSupport

/// The sequences a review found (each once gave L2 a frame or rights its tables do not give),
/// kept as regression tests of the shadow MMU.
@Suite struct ShadowMMURegressionTests {
    typealias Bit = PageWalk.Bit
    static let data = Bit.present | Bit.writable | Bit.user

    /// F1: an unsync leaf shadow page that lost its parent link is linked again by a fill
    /// without being synced: L2 freed a page table, zeroed it, reused it for another range.
    @Test func relinkedUnsyncPageServesStaleEntries() {
        let rig = ShadowRig()
        rig.loadCR3(rig.newSpace().raw)
        rig.setupMap(0x4000_0000, to: 0x30_0000, flags: Self.data)
        rig.setupMap(0x4000_1000, to: 0x30_1000, flags: Self.data)
        rig.expectMatchesReference(0x4000_0000)
        rig.expectMatchesReference(0x4000_1000)
        let pde = rig.pdeAddress(0x4000_0000)
        let ptEntry = rig.memory[l2: pde]
        let pt = L2GPA(ptEntry & Bit.addressMask)
        // L2 unmaps the range (emulated PDE write) and flushes its addresses.
        rig.writePTE(pde, 0)
        rig.invlpg(0x4000_0000); rig.invlpg(0x4000_1000)
        // L2 frees the page table and reuses it: zeroes it, maps one page, hangs it under another PDE.
        rig.writePTE(pt, 0)                       // unsync
        rig.writePTE(pt + 8, 0)
        rig.writePTE(pt, 0x30_5000 | Self.data)
        rig.writePTE(pde + 8, ptEntry)            // 0x4020_0000 range, same PDE rights
        rig.expectMatchesReference(0x4020_0000)
        rig.expectMatchesReference(0x4020_1000)   // L2: not present (#PF); shadow: stale 0x30_1000
    }

    /// F1b: INVLPG while the link is broken does nothing; the relink brings the stale entry back.
    @Test func invlpgWhileUnlinkedIsLost() {
        let rig = ShadowRig()
        rig.loadCR3(rig.newSpace().raw)
        rig.setupMap(0x4000_0000, to: 0x30_0000, flags: Self.data)
        rig.setupMap(0x4000_1000, to: 0x30_1000, flags: Self.data)
        rig.expectMatchesReference(0x4000_0000)
        rig.expectMatchesReference(0x4000_1000)
        rig.writePTE(rig.pteAddress(0x4000_1000), 0x30_7000 | Self.data)   // unsync
        let pde = rig.pdeAddress(0x4000_0000)
        rig.writePTE(pde, rig.memory[l2: pde])                              // rewritten as it was: link zapped
        rig.invlpg(0x4000_1000)                                             // finds no path: nothing synced
        rig.expectMatchesReference(0x4000_0000)                             // relinks the unsync page
        rig.expectMatchesReference(0x4000_1000)                             // stale 0x30_1000
    }

    /// F2: direct pages (guest huge pages) are keyed without the dirty state: a clean PDE reuses
    /// leaves made writable for a dirty one, so L2 writes without D being set.
    @Test func hugePageDirtyLostThroughSharedDirectPage() {
        let rig = ShadowRig()
        let a = rig.newSpace(), b = rig.newSpace()
        rig.loadCR3(a.raw)
        rig.setupMap(0x4000_0000, to: 0, flags: 0)
        let pdeA = rig.pdeAddress(0x4000_0000)
        rig.memory[l2: pdeA] = 0x40_0000 | Self.data | Bit.pageSize
        _ = rig.access(0x4000_0000, [.write], value: 1)
        _ = rig.access(0x4000_1000, [.write], value: 1)
        rig.loadCR3(b.raw)
        rig.setupMap(0x8000_0000, to: 0, flags: 0)
        let pdeB = rig.pdeAddress(0x8000_0000)
        rig.memory[l2: pdeB] = 0x40_0000 | Self.data | Bit.pageSize     // clean (D = 0)
        rig.expectMatchesReference(0x8000_0000)                          // a read links the shared direct page
        _ = rig.access(0x8000_1000, [.write], value: 2)
        #expect(rig.memory[l2: pdeB] & Bit.dirty != 0, "written through a clean PDE without D")
    }

    /// F3: a walk that uses one table twice (a PD entry pointing at the PD itself) records A/D
    /// updates against the wrong entry: the leaf gets the rights of the other entry.
    @Test func selfReferencingTableLeaksUserRights() {
        let rig = ShadowRig()
        rig.loadCR3(rig.newSpace().raw)
        rig.setupMap(0x4000_0000, to: 0x30_0000, flags: Self.data)
        let pde = rig.pdeAddress(0x4000_0000)
        let pd = pde.pageBase
        // PD[1] -> PD itself, supervisor only; PD[2] a user page (accessed flag clear).
        rig.memory[l2: pd + 8] = pd.raw | Bit.present | Bit.writable
        rig.memory[l2: pd + 16] = 0x35_0000 | Self.data
        let gva: UInt64 = 0x4000_0000 + (1 << 21) + (2 << 12)
        rig.expectMatchesReference(gva)                   // supervisor read: fine
        rig.expectMatchesReference(gva, [.user])          // L2: #PF (PD[1] has no U); shadow?
    }
}

@Suite struct ShadowReviewScratch2 {
    typealias Bit = PageWalk.Bit
    static let data = Bit.present | Bit.writable | Bit.user

    /// F1c: two address spaces share the kernel half (one PDPT). In B, whose shadow root has no
    /// link into that half yet, the kernel changes a PTE and INVLPGs it (no path: nothing
    /// synced); B's next fault in the half links the shared PDPT shadow page, under which the
    /// unsync PT still holds the old frame.
    @Test func sharedKernelHalfServesStaleEntryAfterINVLPG() {
        let rig = ShadowRig()
        let a = rig.newSpace(), b = rig.newSpace()
        let k0: UInt64 = 0x80_0000_0000, k1 = k0 + 0x1000, k2 = k0 + 0x4000_0000   // PML4 slot 1
        rig.cr3 = a.raw
        rig.setupMap(k0, to: 0x30_0000, flags: Self.data)
        rig.setupMap(k1, to: 0x30_1000, flags: Self.data)
        rig.setupMap(k2, to: 0x30_2000, flags: Self.data)
        rig.memory[l2: b + 8] = rig.memory[l2: a + 8]            // B shares A's kernel PDPT
        rig.cr3 = 0
        rig.loadCR3(a.raw)
        rig.expectMatchesReference(k0); rig.expectMatchesReference(k1); rig.expectMatchesReference(k2)
        rig.loadCR3(b.raw)
        let pte = rig.pteAddress(k1)
        rig.writePTE(pte, 0x30_9000 | Self.data)                  // the kernel remaps k1 (PT goes unsync)
        rig.invlpg(k1)                                            // and flushes it: B's shadow has no path
        rig.expectMatchesReference(k2)                            // B links the shared PDPT shadow page
        rig.expectMatchesReference(k1)                            // L2: 0x30_9000; shadow: 0x30_1000
    }

    /// Pool accounting: reserve never lets page(for:) run dry with the smallest sane pool.
    @Test func tinyPool() {
        let rig = ShadowRig()
        rig.mmu = ShadowMMU(memory: rig.memory, pool: AddressRange(start: L1GPA(0x0100_0000), length: 9 * 4096)!,
                            backing: .init(translate: FakeL1Memory.backing), count: { _, _ in })
        rig.loadCR3(rig.newSpace().raw)
        for i in 0..<UInt64(50) {
            let gva = 0x40_0000_0000 + i * (1 << 30)
            rig.setupMap(gva, to: 0x30_0000, flags: Self.data)
            rig.expectMatchesReference(gva)
        }
    }
}

@Suite struct ShadowReviewScratch3 {
    typealias Bit = PageWalk.Bit
    static let data = Bit.present | Bit.writable | Bit.user
    /// F2 in one address space: the OS cleans a dirty 2 MiB page (clears D in the PDE, INVLPGs).
    @Test func hugePageCleanedThenWrittenWithoutD() {
        let rig = ShadowRig()
        rig.loadCR3(rig.newSpace().raw)
        rig.setupMap(0x4000_0000, to: 0, flags: 0)
        let pde = rig.pdeAddress(0x4000_0000)
        rig.memory[l2: pde] = 0x40_0000 | Self.data | Bit.pageSize
        _ = rig.access(0x4000_0000, [.write], value: 1)
        _ = rig.access(0x4000_1000, [.write], value: 1)
        #expect(rig.memory[l2: pde] & Bit.dirty != 0)
        rig.writePTE(pde, rig.memory[l2: pde] & ~Bit.dirty)        // writeback done: clean again
        rig.invlpg(0x4000_0000); rig.invlpg(0x4000_1000)
        _ = rig.access(0x4000_0000, [])                              // a read relinks the direct page
        _ = rig.access(0x4000_1000, [.write], value: 2)              // goes straight through
        #expect(rig.memory[l2: pde] & Bit.dirty != 0, "written without D")
    }
}
