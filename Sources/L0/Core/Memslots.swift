import ABI
import Transport

/// Why an L1 memory access or memslot change was refused.
public enum MemoryError: Error, Equatable, CustomStringConvertible {
    /// The L1 GPA range is not (entirely) inside one of L1's memslots.
    case outsideL1Memory(L1GPA, length: UInt64)
    case misaligned(UInt64)
    case overflow(start: UInt64, length: UInt64)
    case overlapsSlot(UInt32)
    case hostRangeOutside(HostOffset, length: UInt64, hostSize: UInt64)
    case duplicateSlot(UInt32)
    case noSuchSlot(UInt32)
    case unknownFlags(UInt32)

    public var description: String {
        switch self {
        case let .outsideL1Memory(g, l): "\(g) +0x\(String(l, radix: 16)) is outside L1's memory"
        case let .misaligned(v): "0x\(String(v, radix: 16)) is not page-aligned"
        case let .overflow(s, l): "range 0x\(String(s, radix: 16)) +0x\(String(l, radix: 16)) wraps past 2^64"
        case let .overlapsSlot(s): "overlaps memslot \(s)"
        case let .hostRangeOutside(o, l, size): "\(o) +0x\(String(l, radix: 16)) is outside host memory (\(size) bytes)"
        case let .duplicateSlot(s): "memslot \(s) already exists"
        case let .noSuchSlot(s): "there is no memslot \(s)"
        case let .unknownFlags(f): "unknown memslot flags 0x\(String(f, radix: 16))"
        }
    }
}

/// L1's memory as L0 sees it: a set of memslots over host memory. The only way from an L1 GPA
/// to host bytes is `translate`, which fails for anything L1 was not given.
public struct L1Memslots: Sendable {
    public private(set) var slots: [MemorySlot] = []
    public let hostSize: UInt64

    public init(hostSize: UInt64) { self.hostSize = hostSize }

    public mutating func add(_ s: MemorySlot) throws {
        guard s.flags & ~MemorySlot.knownFlags == 0 else { throw MemoryError.unknownFlags(s.flags) }
        guard s.guestPhysAddr.isPageAligned else { throw MemoryError.misaligned(s.guestPhysAddr.raw) }
        guard s.memorySize % pageSize == 0, s.memorySize > 0 else { throw MemoryError.misaligned(s.memorySize) }
        guard s.hostOffset.isPageAligned else { throw MemoryError.misaligned(s.hostOffset.raw) }
        guard let gpaRange = AddressRange(start: s.guestPhysAddr, length: s.memorySize) else {
            throw MemoryError.overflow(start: s.guestPhysAddr.raw, length: s.memorySize)
        }
        guard let hostEnd = s.hostOffset.adding(s.memorySize), hostEnd.raw <= hostSize else {
            throw MemoryError.hostRangeOutside(s.hostOffset, length: s.memorySize, hostSize: hostSize)
        }
        for other in slots {
            if other.slot == s.slot { throw MemoryError.duplicateSlot(s.slot) }
            if AddressRange(start: other.guestPhysAddr, length: other.memorySize)!.overlaps(gpaRange) {
                throw MemoryError.overlapsSlot(other.slot)
            }
        }
        slots.append(s)
    }

    /// Removes a slot and returns it.
    public mutating func delete(_ id: UInt32) throws -> MemorySlot {
        guard let i = slots.firstIndex(where: { $0.slot == id }) else { throw MemoryError.noSuchSlot(id) }
        return slots.remove(at: i)
    }

    /// Host offset of `gpa`, provided [gpa, gpa+length) lies inside one slot.
    @inline(__always)
    public func translate(_ gpa: L1GPA, length: UInt64 = 1) throws -> HostOffset {
        for s in slots {
            if let off = gpa.offset(from: s.guestPhysAddr), off < s.memorySize, length <= s.memorySize - off {
                return s.hostOffset + off   // inside the slot: cannot overflow
            }
        }
        throw MemoryError.outsideL1Memory(gpa, length: length)
    }

    public func slot(containing gpa: L1GPA) -> MemorySlot? {
        slots.first { s in gpa.offset(from: s.guestPhysAddr).map { $0 < s.memorySize } ?? false }
    }
}

/// Reads and writes of L1 memory by L0 (vmcs12, EPT12, hypercall buffers), always through a
/// memslot translation.
public struct L1MemoryAccess: Sendable {
    public var memslots: L1Memslots
    public let host: HostMemory

    public init(memslots: L1Memslots, host: HostMemory) {
        self.memslots = memslots
        self.host = host
    }

    /// A value of L1 memory at `gpa`, if all its bytes are inside one memslot.
    public func load<T: FixedWidthInteger>(_ gpa: L1GPA, as _: T.Type = T.self) throws -> T {
        try host.load(T.self, at: memslots.translate(gpa, length: UInt64(MemoryLayout<T>.size)))
    }
    public func store<T: FixedWidthInteger>(_ v: T, _ gpa: L1GPA) throws {
        try host.store(v, at: memslots.translate(gpa, length: UInt64(MemoryLayout<T>.size)))
    }
    /// A VMCS-format page of L1 memory (vmcs12, an eVMCS), if the whole page is inside a memslot.
    public func vmcs(at gpa: L1GPA) throws -> VMCSImage {
        try host.vmcs(at: memslots.translate(gpa, length: VMCS12Layout.size))
    }
    /// A run-page-format page of L1 memory (the PV exit page).
    public func runPage(at gpa: L1GPA) throws -> RunPageView {
        try host.runPage(at: memslots.translate(gpa, length: RunPage.size))
    }

    public func load64(_ gpa: L1GPA) throws -> UInt64 {
        try host.load(UInt64.self, at: memslots.translate(gpa, length: 8))
    }
    public func store64(_ v: UInt64, _ gpa: L1GPA) throws {
        try host.store(v, at: memslots.translate(gpa, length: 8))
    }
    public func load32(_ gpa: L1GPA) throws -> UInt32 {
        try host.load(UInt32.self, at: memslots.translate(gpa, length: 4))
    }
    public func store32(_ v: UInt32, _ gpa: L1GPA) throws {
        try host.store(v, at: memslots.translate(gpa, length: 4))
    }
}
