import ABI
@testable import L0
import PropertyBased
import Testing
import Transport

/// One map or unmap hypercall with the arguments a fuzzing L1 might pass.
struct MapOp: Sendable, CustomStringConvertible {
    var isMap: Bool
    var l2: UInt64
    var l1: UInt64
    var length: UInt64
    var flags: UInt64

    static let flagChoices: [UInt64] = [
        PVMapFlags.read, PVMapFlags.read | PVMapFlags.write, PVMapFlags.read | PVMapFlags.execute,
        PVMapFlags.rwx, PVMapFlags.rwx, PVMapFlags.rwx, PVMapFlags.rwx | PVMapFlags.replace,
        PVMapFlags.read | PVMapFlags.replace, 0, PVMapFlags.replace, 1 << 4,
    ]
    static let limitPages = Plan.l2Limit / pageSize

    static let slotPages = Plan.slotSize / pageSize

    /// kind 0-1 map, 2 unmap; l2Slot 0..2039 a page in the first 64 MiB, 2040..2099 one of the
    /// last 60 pages below the L2 limit; l1Slot 0..999 a page spread over L1 memory, 1000..1099
    /// one of the pages around the end of the slot (some outside); lengthPages 0 is a zero length;
    /// skew 0-3 makes one argument misaligned or the length wrap.
    init(kind: Int, l2Slot: Int, l1Slot: Int, lengthPages: Int, skew: Int, flagChoice: Int) {
        isMap = kind < 2
        let l2Page = l2Slot >= 2040 ? Self.limitPages - UInt64(2100 - l2Slot) : UInt64(l2Slot) * 8
        let l1Page = l1Slot >= 1000 ? Self.slotPages - 50 + UInt64(l1Slot - 1000) : UInt64(l1Slot) * 8
        l2 = l2Page * pageSize
        l1 = l1Page * pageSize
        length = UInt64(lengthPages) * pageSize
        flags = Self.flagChoices[flagChoice]
        switch skew {
        case 0: l2 += 0x10
        case 1: l1 += 0x800
        case 2: length += 0x200
        case 3: length = 0xFFFF_FFFF_FFFF_F000
        default: break
        }
    }

    var description: String {
        "\(isMap ? "map" : "unmap")(l2: 0x\(String(l2, radix: 16)), l1: 0x\(String(l1, radix: 16)), len: 0x\(String(length, radix: 16)), flags: \(flags))"
    }
}

/// The PV map as a plain page table: L2 page number -> (L1 page number, permissions).
struct ReferenceMap {
    var pages: [UInt64: (l1Page: UInt64, perms: UInt64)] = [:]

    func anyMapped(from start: UInt64, length: UInt64) -> Bool {
        pages.keys.contains { $0 * pageSize >= start && $0 * pageSize - start < length }
    }

    /// What L0 must answer, applying the change on success.
    mutating func apply(_ op: MapOp) -> UInt64 {
        let invalid = HypercallError.invalid.returnValue
        let aligned = op.l2 % pageSize == 0 && op.length > 0 && op.length % pageSize == 0
        let (l2End, l2Wraps) = op.l2.addingReportingOverflow(op.length)
        if op.isMap {
            guard op.flags & ~PVMapFlags.known == 0, op.flags & PVMapFlags.rwx != 0 else { return invalid }
            guard aligned, op.l1 % pageSize == 0 else { return invalid }
            let (l1End, l1Wraps) = op.l1.addingReportingOverflow(op.length)
            guard !l2Wraps, !l1Wraps, l2End <= Plan.l2Limit else { return invalid }
            let replace = op.flags & PVMapFlags.replace != 0
            guard replace || !anyMapped(from: op.l2, length: op.length) else { return invalid }
            guard l1End <= Plan.slotSize else { return HypercallError.fault.returnValue }
            for i in 0..<(op.length / pageSize) {
                pages[op.l2 / pageSize + i] = (op.l1 / pageSize + i, op.flags & PVMapFlags.rwx)
            }
            return 0
        } else {
            guard aligned, !l2Wraps, anyMapped(from: op.l2, length: op.length) else { return invalid }
            pages = pages.filter { !($0.key * pageSize >= op.l2 && $0.key * pageSize - op.l2 < op.length) }
            return 0
        }
    }
}

@Suite struct PVMapPropertyTests {
    static let opGen = zip(Gen.int(in: 0...2), Gen.int(in: 0...2099), Gen.int(in: 0...1099),
                           Gen.int(in: 0...16), Gen.int(in: 0...19), Gen.int(in: 0...(MapOp.flagChoices.count - 1)))
        .map { MapOp(kind: $0.0, l2Slot: $0.1, l1Slot: $0.2, lengthPages: $0.3, skew: $0.4, flagChoice: $0.5) }

    /// Every present EPT02 entry in the scanned window (the first 64 MiB of L2 space plus every
    /// page the sequence named) points into L1's memslot at exactly the host page the PV map's
    /// L1 address translates to, with the mapping's permissions; every page the map does not
    /// cover has no entry; and the map equals a plain page-table model of the same calls.
    /// A failing run stops at its first mismatch: the shrinker reruns it many times.
    @Test func randomMapUnmapSequencesKeepEPT02ExactlyTheTranslatedPVMap() async throws {
        await propertyCheck(count: 200, input: Self.opGen.array(of: 1...40)) { ops in
            let f = try Fixture(.pv)
            var reference = ReferenceMap()
            var usedPages = Set<UInt64>()
            for op in ops {
                let expected = reference.apply(op)
                let got = op.isMap ? f.map(l2: op.l2, l1: op.l1, length: op.length, flags: op.flags)
                                   : f.unmap(l2: op.l2, length: op.length)
                guard got == expected else {
                    Issue.record("\(op) returned 0x\(String(got, radix: 16)), expected 0x\(String(expected, radix: 16))")
                    return
                }
                let first = op.l2 / pageSize
                for p in first..<(first + min(op.length / pageSize, 17) + 1) where p < MapOp.limitPages { usedPages.insert(p) }
            }
            #expect(Self.firstMismatch(f, reference, usedPages) == nil)
        }
    }

    static func firstMismatch(_ f: Fixture, _ reference: ReferenceMap, _ usedPages: Set<UInt64>) -> String? {
        let map = f.pv.map
        for (a, b) in zip(map.mappings, map.mappings.dropFirst()) where a.l2.end > b.l2.start {
            return "mappings \(a.l2) and \(b.l2) overlap or are out of order"
        }
        let windowEnd = (64 << 20) / pageSize
        let window = Array(0..<windowEnd) + usedPages.filter { $0 >= windowEnd }.sorted()
        let slotHost = Plan.slotHost.raw
        // Present entries: inside the slot, and agreeing with the map, the memslot and the model.
        for page in window {
            let gpa = L2GPA(page * pageSize)
            let entry = f.vcpu.ept02.entry(gpa)
            guard entry != 0 || reference.pages[page] != nil else { continue }
            guard EPT02Entry.isPresent(entry, generation: f.vcpu.ept02.generation) else { return "\(gpa): entry 0x\(String(entry, radix: 16)) is not present" }
            let host = EPT02Entry.host(entry).raw
            guard host >= slotHost, host < slotHost + Plan.slotSize else {
                return "\(gpa): EPT02 points at host 0x\(String(host, radix: 16)), outside L1's memslot"
            }
            guard let mapping = map.lookup(gpa), let l1 = mapping.l1Address(for: gpa) else {
                return "\(gpa) has EPT02 entry 0x\(String(entry, radix: 16)) but no PV mapping"
            }
            guard let viaSlot = try? f.vcpu.l1Memory.memslots.translate(l1, length: pageSize), viaSlot.raw == host else {
                return "\(gpa): EPT02 host 0x\(String(host, radix: 16)) but the map says \(l1)"
            }
            guard entry & EPT.rwxMask == mapping.permissions else {
                return "\(gpa): EPT02 permissions \(entry & EPT.rwxMask), mapping \(mapping.permissions)"
            }
            guard let ref = reference.pages[page], ref.l1Page == l1.raw / pageSize, ref.perms == mapping.permissions else {
                return "\(gpa): L0 maps it to \(l1) (\(mapping.permissions)), the model to \(String(describing: reference.pages[page]))"
            }
        }
        // The converse: every page the map covers has an entry (so a page without an entry is
        // not in the map), and the map covers exactly as many pages as the model.
        var mappedPages: UInt64 = 0
        for m in map.mappings {
            mappedPages += m.l2.length / pageSize
            var p = m.l2.start.raw / pageSize
            while p < m.l2.end.raw / pageSize {
                if p >= windowEnd && !usedPages.contains(p) { p += 1; continue }
                if !EPT02Entry.isPresent(f.vcpu.ept02.entry(L2GPA(p * pageSize)), generation: f.vcpu.ept02.generation) {
                    return "L2GPA(0x\(String(p * pageSize, radix: 16))) is mapped but has no EPT02 entry"
                }
                p += 1
            }
        }
        if mappedPages != UInt64(reference.pages.count) {
            return "L0 maps \(mappedPages) pages, the model \(reference.pages.count)"
        }
        return nil
    }
}
