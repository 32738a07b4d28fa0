import ABI

/// Typed access to one run page (the layout in `ABI.RunPage`) inside a shared region: L0's
/// control pages (`ControlMemory.runPage`) or a PV exit page in host memory
/// (`HostMemory.runPage`). The whole page is checked to lie in its region when the view is made.
public struct RunPageView: @unchecked Sendable {
    let region: SharedRegion
    let base: UInt64

    /// A run page whose whole 4 KiB lies inside `region` (checked: the base may come from a guest).
    init(region: SharedRegion, base: UInt64) throws {
        try region.check(base, RunPage.size)
        self.region = region
        self.base = base
    }

    /// A run page at a layout offset of control memory: a bad layout is a bug, so it traps.
    init(fixed region: SharedRegion, base: ControlOffset) {
        precondition((try? region.check(base.raw, RunPage.size)) != nil, "run page \(base) outside control memory")
        self.region = region
        self.base = base.raw
    }

    /// One u64 slot (`RunPage.exitReason`, ...): inside the page, or a trap.
    @inline(__always)
    public subscript(slot: UInt64) -> UInt64 {
        get {
            precondition(slot <= RunPage.size - 8, "run page slot 0x\(String(slot, radix: 16))")
            return region.unchecked(load: UInt64.self, at: base + slot)
        }
        nonmutating set {
            precondition(slot <= RunPage.size - 8, "run page slot 0x\(String(slot, radix: 16))")
            region.unchecked(store: newValue, at: base + slot)
        }
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

    /// The register file, in `Register` order.
    public var registers: RegisterFile {
        get {
            var f = RegisterFile()
            for r in Register.allCases { f[r] = self[register: r] }
            return f
        }
        nonmutating set {
            for r in Register.allCases { self[register: r] = newValue[r] }
        }
    }

    /// Copies the exit-information and register area to another run page (any region).
    public func copy(to other: RunPageView) {
        var o: UInt64 = 0
        while o < RunPage.registersEnd {
            other[o] = self[o]
            o += 8
        }
    }
}
