import ABI
import L2Guest
import Testing
import TestSupport

/// L2's page walk over made-up tables: a dictionary of 8-byte entries stands for L2's RAM.
@Suite struct PageWalkTests {
    typealias B = PageWalk.Bit
    typealias E = PageWalk.ErrorCode

    /// Page tables built the way a guest kernel builds them, in a sparse memory.
    final class Tables {
        var memory: [UInt64: UInt64] = [:]
        var nextTable: UInt64 = 0x10_0000
        let cr3: UInt64 = 0x1000
        var writes: [UInt64] = []

        func allocate() -> UInt64 { defer { nextTable += 0x1000 }; return nextTable }

        /// Maps `gva` to `gpa` with a page of `level` (1: 4 KiB, 2: 2 MiB, 3: 1 GiB) and `flags`
        /// on every entry of the path (the leaf gets PS above level 1).
        func map(_ gva: UInt64, to gpa: UInt64, level: Int = 1, flags: UInt64 = B.present | B.writable | B.user,
                 leafFlags: UInt64? = nil) {
            var table = cr3
            for l in stride(from: 4, through: level, by: -1) {
                let at = table + ((gva >> (12 + 9 * UInt64(l - 1))) & 0x1FF) * 8
                if l == level {
                    memory[at] = (gpa & B.addressMask) | (leafFlags ?? flags) | (l > 1 ? B.pageSize : 0)
                } else {
                    if memory[at] == nil || memory[at]! & B.present == 0 { memory[at] = allocate() | flags }
                    table = memory[at]! & B.addressMask
                }
            }
        }

        func walk(_ gva: UInt64, _ access: PageWalk.Access, nxe: Bool = true) -> PageWalk.Outcome {
            PageWalk.translate(L2GVA(gva), access, in: .init(cr3: cr3, nxe: nxe),
                               read: { self.memory[$0.raw] ?? 0 }, write: { self.memory[$0.raw] = $1; self.writes.append($0.raw) })
        }

        /// The entries the walk of `gva` reads, top to bottom.
        func path(_ gva: UInt64) -> [UInt64] {
            var table = cr3, out: [UInt64] = []
            for l in stride(from: 4, through: 1, by: -1) {
                let at = table + ((gva >> (12 + 9 * UInt64(l - 1))) & 0x1FF) * 8
                out.append(at)
                guard let e = memory[at], e & B.present != 0, !(l > 1 && e & B.pageSize != 0) else { break }
                table = e & B.addressMask
            }
            return out
        }
    }

    @Test func aMappedAddressTranslatesWithItsOffsetForEveryPageSize() {
        let t = Tables()
        t.map(0x40_0000, to: 0x7000)
        t.map(0x4000_0000, to: 0x20_0000, level: 2)
        t.map(0x80_0000_0000, to: 0x4000_0000, level: 3)
        #expect(t.walk(0x40_0123, []) == .mapped(L2GPA(0x7123), pageBytes: 4096))
        #expect(t.walk(0x4012_3456, []) == .mapped(L2GPA(0x32_3456), pageBytes: 2 << 20))
        #expect(t.walk(0x80_1234_5678, []) == .mapped(L2GPA(0x5234_5678), pageBytes: 1 << 30))
    }

    @Test func notPresentAndPermissionFaultsCarryTheArchitecturalErrorCode() {
        let t = Tables()
        // Kernel-only, read-only, no-execute leaf.
        t.map(0x1000_0000, to: 0x9000, leafFlags: B.present | B.executeDisable)
        #expect(t.walk(0x2000_0000, []) == .pageFault(errorCode: 0))                                    // nothing there
        #expect(t.walk(0x2000_0000, [.write, .user]) == .pageFault(errorCode: E.write | E.user))
        #expect(t.walk(0x1000_0000, []) == .mapped(L2GPA(0x9000), pageBytes: 4096))                     // kernel read: fine
        #expect(t.walk(0x1000_0000, [.write]) == .pageFault(errorCode: E.protection | E.write))         // WP=1
        #expect(t.walk(0x1000_0000, [.user]) == .pageFault(errorCode: E.protection | E.user))
        #expect(t.walk(0x1000_0000, [.fetch]) == .pageFault(errorCode: E.protection | E.fetch))
        // Without NXE, XD is a reserved bit.
        #expect(t.walk(0x1000_0000, [], nxe: false) == .pageFault(errorCode: E.protection | E.reserved))
    }

    @Test func reservedBitsAndNonCanonicalAddresses() {
        let t = Tables()
        // PS in a PML4E is reserved; a 2 MiB page's frame must be 2 MiB aligned.
        t.memory[t.cr3 + 8] = 0x5000 | B.present | B.writable | B.pageSize
        #expect(t.walk(1 << 39, []) == .pageFault(errorCode: E.protection | E.reserved))
        t.map(0x4000_0000, to: 0x20_2000, level: 2)
        #expect(t.walk(0x4000_0000, []) == .pageFault(errorCode: E.protection | E.reserved))
        // Bit 12 of a 2 MiB or 1 GiB entry is its PAT bit, not an address bit: not reserved.
        t.map(0x4000_0000, to: 0x20_0000 | B.hugePAT, level: 2)
        #expect(t.walk(0x4000_1234, []) == .mapped(L2GPA(0x20_1234), pageBytes: 2 << 20))
        t.map(0x100_0000_0000, to: 0x4000_0000 | B.hugePAT, level: 3)
        #expect(t.walk(0x100_0000_5678, []) == .mapped(L2GPA(0x4000_5678), pageBytes: 1 << 30))
        #expect(t.walk(0x0000_8000_0000_0000, []) == .generalProtection)
        #expect(t.walk(0xFFFF_8000_0000_0000, []) == .pageFault(errorCode: 0))   // canonical, unmapped
    }

    @Test func theWalkSetsAccessedOnItsPathAndDirtyOnTheLeafOfAWrite() {
        let t = Tables()
        t.map(0x40_0000, to: 0x7000)
        let path = t.path(0x40_0000)
        #expect(path.count == 4 && path.allSatisfy { t.memory[$0]! & B.accessed == 0 })
        _ = t.walk(0x40_0000, [])
        #expect(path.allSatisfy { t.memory[$0]! & B.accessed != 0 } && t.memory[path[3]]! & B.dirty == 0)
        _ = t.walk(0x40_0008, [.write])
        #expect(t.memory[path[3]]! & B.dirty != 0 && path.dropLast().allSatisfy { t.memory[$0]! & B.dirty == 0 })
        // Nothing is written back when nothing changes; nothing when the walk faults.
        t.writes.removeAll()
        _ = t.walk(0x40_0010, [.write])
        _ = t.walk(0x9000_0000, [.write])
        #expect(t.writes.isEmpty)
    }

    /// Random tables: a mapped address goes where its mapping says with the rights of its whole
    /// path, anything else faults; the walk never reads an entry outside the path it takes.
    @Test func randomTablesTranslateExactlyWhatTheyMap() async {
        let ok = await seededCheck(count: 200) { g in
            let t = Tables()
            var expected: [UInt64: (gpa: UInt64, writable: Bool, user: Bool)] = [:]
            for _ in 0..<g.int(1...12) {
                let gva = (g.below(1 << 35) & ~0xFFF) | (g.chance(0.5) ? 0xFFFF_8000_0000_0000 : 0)
                let canonicalGVA = gva & 0x8000_0000_0000 != 0 ? gva | 0xFFFF_0000_0000_0000 : gva
                let writable = g.chance(0.7), user = g.chance(0.7)
                let leaf = B.present | (writable ? B.writable : 0) | (user ? B.user : 0)
                let gpa = g.below(1 << 40) & ~0xFFF
                t.map(canonicalGVA, to: gpa, flags: B.present | B.writable | B.user, leafFlags: leaf)
                expected[canonicalGVA] = (gpa, writable, user)
            }
            for (gva, m) in expected {
                let offset = g.below(4096)
                for access: PageWalk.Access in [[], [.write], [.user], [.write, .user]] {
                    let allowed = (!access.contains(.write) || m.writable) && (!access.contains(.user) || m.user)
                    let got = t.walk(gva + offset, access)
                    if allowed {
                        #expect(got == .mapped(L2GPA(m.gpa + offset), pageBytes: 4096))
                    } else {
                        guard case .pageFault(let code) = got else { Issue.record("\(got)"); continue }
                        #expect(code & E.protection != 0)
                    }
                }
            }
            let hole = (g.below(1 << 35) | 0x1000) & ~0xFFF
            if expected[hole] == nil, t.path(hole).contains(where: { t.memory[$0] == nil }) {
                #expect(t.walk(hole, []) == .pageFault(errorCode: 0))
            }
        }
        #expect(ok)
    }
}
