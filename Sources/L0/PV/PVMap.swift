import ABI

/// One L2 -> L1 mapping L1 asked for by hypercall.
public struct PVMapping: Equatable, Sendable {
    public var l2: AddressRange<L2GPA>
    public var l1: L1GPA
    public var permissions: UInt64

    /// The L1 GPA an L2 GPA inside this mapping lands on.
    public func l1Address(for gpa: L2GPA) -> L1GPA? {
        guard let off = gpa.offset(from: l2.start), off < l2.length else { return nil }
        return l1.adding(off)
    }
}

/// L0's record of the PV map: non-overlapping L2 ranges, sorted by start. L0 never reads L1's
/// page tables on this path; this (and the EPT02 it installs from it) is all there is.
public struct PVMap: Sendable, Equatable {
    public private(set) var mappings: [PVMapping] = []
    public init() {}

    public func overlapping(_ r: AddressRange<L2GPA>) -> [PVMapping] {
        mappings.filter { $0.l2.overlaps(r) }
    }

    public func lookup(_ gpa: L2GPA) -> PVMapping? {
        mappings.first { $0.l2.contains(gpa) }
    }

    /// Inserts a mapping known not to overlap any other.
    mutating func insert(_ m: PVMapping) {
        let i = mappings.firstIndex { $0.l2.start > m.l2.start } ?? mappings.count
        mappings.insert(m, at: i)
    }

    /// Removes [r.start, r.end) from every mapping, splitting the ones it cuts.
    /// Returns the number of bytes that were mapped.
    @discardableResult
    mutating func remove(_ r: AddressRange<L2GPA>) -> UInt64 {
        var kept: [PVMapping] = []
        var removed: UInt64 = 0
        for m in mappings {
            guard m.l2.overlaps(r) else { kept.append(m); continue }
            let cutStart = max(m.l2.start, r.start), cutEnd = min(m.l2.end, r.end)
            removed += cutEnd.raw - cutStart.raw
            if m.l2.start < cutStart {
                kept.append(PVMapping(l2: AddressRange(start: m.l2.start, length: cutStart.raw - m.l2.start.raw)!,
                                      l1: m.l1, permissions: m.permissions))
            }
            if cutEnd < m.l2.end {
                kept.append(PVMapping(l2: AddressRange(start: cutEnd, length: m.l2.end.raw - cutEnd.raw)!,
                                      l1: m.l1Address(for: cutEnd)!, permissions: m.permissions))
            }
        }
        mappings = kept.sorted { $0.l2.start < $1.l2.start }
        return removed
    }
}

/// Per-vCPU (and for this prototype, per-VM) PV state L0 keeps.
public struct PVState: Sendable {
    public var cpuid: CPUIDTable?
    public var map = PVMap()
    /// The PV exit page L1 registered with create-vCPU: where L2 exits L1 must see are written.
    public var exitPageGPA: L1GPA?
    public var vcpuCreated: Bool { exitPageGPA != nil }
    public init() {}

    /// KVM_MAX_CPUID_ENTRIES.
    public static let maxCPUIDEntries: UInt64 = 256
}
