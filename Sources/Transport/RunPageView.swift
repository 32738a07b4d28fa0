import ABI

/// Typed access to one run page (the layout in `ABI.RunPage`) inside a shared region.
public struct RunPageView: @unchecked Sendable {
    public let region: SharedRegion
    public let base: UInt64

    /// A run page whose whole 4 KiB lies inside `region` (checked: the base may come from a guest).
    public init(region: SharedRegion, base: UInt64) throws {
        try region.check(base, RunPage.size)
        self.region = region
        self.base = base
    }

    /// A run page at a fixed offset (L0's control pages): slots are always in bounds.
    @inline(__always)
    public subscript(slot: UInt64) -> UInt64 {
        get { region.unchecked(load: UInt64.self, at: base + slot) }
        nonmutating set { region.unchecked(store: newValue, at: base + slot) }
    }

    @inline(__always)
    public subscript(register r: Register) -> UInt64 {
        get { self[RunPage.offset(of: r)] }
        nonmutating set { self[RunPage.offset(of: r)] = newValue }
    }

    public var exitReason: ExitReason {
        get { ExitReason(rawValue: UInt32(truncatingIfNeeded: self[RunPage.exitReason])) }
        nonmutating set { self[RunPage.exitReason] = UInt64(newValue.rawValue) }
    }

    /// All registers, in `Register` order.
    public func loadRegisters() -> [UInt64] { Register.allCases.map { self[register: $0] } }


    /// Copies the exit-information and register area to another run page (any region).
    public func copy(to other: RunPageView) {
        var o: UInt64 = 0
        while o < RunPage.registersEnd {
            other[o] = self[o]
            o += 8
        }
    }
}
