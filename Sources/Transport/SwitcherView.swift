import ABI

/// The pvm-rfc switcher area (`SwitcherLayout`) in L1's memory, as L1, the L2 CPU and L0 map
/// it: the L1 <-> L2 handoff lane, L2's run page, the shadow root and flush generation, and the
/// counters. Every word is inside the mapping (checked once here: the area is at a fixed L1 GPA
/// of a slot the caller's memory covers). L0 only stops the lane and reads the counters; it
/// trusts nothing it reads here.
public struct SwitcherView: @unchecked Sendable {
    public let memory: HostMemory
    /// The host offset of L1 GPA 0 (L1's memslot).
    public let l1Base: HostOffset
    public let lane: Handoff
    public let run: RunPageView
    /// Where this vCPU's area is past vCPU 0's (`SwitcherLayout.area(of:)`).
    let areaShift: UInt64

    /// vCPU `vcpu`'s switcher area (each vCPU has its own, `SwitcherLayout.bytes` apart).
    public init(memory: HostMemory, l1Base: HostOffset, vcpu: Int = 0) throws {
        precondition(vcpu >= 0 && vcpu < SwitcherLayout.maxVCPUs, "vCPU \(vcpu) has no switcher area")
        self.memory = memory
        self.l1Base = l1Base
        self.areaShift = UInt64(vcpu) * SwitcherLayout.bytes
        let area = l1Base + SwitcherLayout.base.raw + areaShift
        try memory.region.check(memory.local(area), SwitcherLayout.bytes)
        self.lane = Handoff(region: memory.region, base: ControlOffset(memory.local(area)))
        self.run = try memory.runPage(at: l1Base + SwitcherLayout.runPage.raw + areaShift)
    }

    @inline(__always)
    func host(_ gpa: L1GPA) -> HostOffset { l1Base + gpa.raw + areaShift }

    /// One u64 of the area, by its `SwitcherLayout` address (the area's bounds were checked at
    /// init; a word outside it traps).
    @inline(__always)
    public subscript(word: L1GPA) -> UInt64 {
        get {
            precondition(Self.inArea(word), "\(word) is not a word of the switcher area")
            return memory.region.unchecked(load: UInt64.self, at: memory.local(host(word)))
        }
        nonmutating set {
            precondition(Self.inArea(word), "\(word) is not a word of the switcher area")
            memory.region.unchecked(store: newValue, at: memory.local(host(word)))
        }
    }

    @inline(__always)
    static func inArea(_ word: L1GPA) -> Bool {
        word.raw >= SwitcherLayout.base.raw && word.raw - SwitcherLayout.base.raw <= SwitcherLayout.bytes - 8
    }

    /// Whose turn the switcher lane gives (L1 or L2), or nil (stopped, or a value no tier has):
    /// on pvm-rfc the tier L0 names when the vCPU stops coming back.
    public var turnHolder: Tier? {
        let t = Tier(rawValue: lane.turn.load(ordering: .relaxed))
        return t == .l1 || t == .l2 ? t : nil
    }

    public func count(_ c: SwitcherCounter, _ n: UInt64 = 1) { self[SwitcherLayout.counter(c)] &+= n }
    public func countExit(_ r: ExitReason) { self[SwitcherLayout.exitCounter(r)] &+= 1 }

    /// Every counter word, exits by reason first (what L0 snapshots at a window edge).
    public func counterWords() -> [UInt64] {
        (0..<SwitcherLayout.counterWords).map { self[SwitcherLayout.counters + UInt64($0) * 8] }
    }

    /// Zeroes the area's state, run page and counters (L1, before L2 first runs); not the lane,
    /// which L2 may already be waiting on.
    public func reset() throws {
        try memory.fill(0, at: host(SwitcherLayout.shadowRoot), count: SwitcherLayout.bytes - 0x200)
    }

    /// Waits for `tier`'s turn on the switcher lane: false when L0 stopped the stack.
    public func wait(for tier: Tier, policy: WaitPolicy) -> Bool {
        lane.wait(for: tier, policy: policy) == .myTurn
    }
}
