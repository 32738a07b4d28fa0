import ABI

/// L0's "host physical" memory, addressed only by `HostOffset`: all of it in L0, and in a child
/// tier only the window it mapped (L1's memslot), starting at `base`. Every access is
/// bounds-checked and throws rather than touching bytes outside the mapping.
public struct HostMemory: @unchecked Sendable {
    public let region: SharedRegion
    /// The host offset of the region's first byte.
    public let base: HostOffset
    public init(region: SharedRegion, base: HostOffset = HostOffset(0)) {
        self.region = region
        self.base = base
    }

    /// One past the last host offset this mapping reaches.
    public var end: UInt64 { base.raw + region.size }

    /// The region offset of `o`; a host offset below the window becomes one past every region,
    /// so the region's own check refuses it.
    @inline(__always)
    func local(_ o: HostOffset) -> UInt64 { o.raw >= base.raw ? o.raw - base.raw : UInt64.max }

    public func load<T: FixedWidthInteger>(_: T.Type = T.self, at o: HostOffset) throws -> T {
        try region.load(T.self, at: local(o))
    }
    public func store<T: FixedWidthInteger>(_ v: T, at o: HostOffset) throws {
        try region.store(v, at: local(o))
    }
    public func readBytes(at o: HostOffset, count: Int) throws -> [UInt8] {
        try region.readBytes(at: local(o), count: count)
    }
    public func writeBytes(_ b: [UInt8], at o: HostOffset) throws {
        try region.writeBytes(b, at: local(o))
    }
    public func fill(_ byte: UInt8, at o: HostOffset, count: UInt64) throws {
        try region.fill(byte, at: local(o), count: count)
    }
    /// LOCK CMPXCHG / XCHG of an aligned u64 (guest memory two vCPUs, or a vCPU and its
    /// hypervisor, update at once: KVM's steal-time `preempted` byte).
    public func compareExchange64(at o: HostOffset, expected: UInt64, desired: UInt64) throws -> (exchanged: Bool, original: UInt64) {
        try region.compareExchange64(at: local(o), expected: expected, desired: desired)
    }
    public func exchange64(at o: HostOffset, _ v: UInt64) throws -> UInt64 {
        try region.exchange64(at: local(o), v)
    }
    /// A run page that lives in host memory (the PV exit page L1 registered).
    public func runPage(at o: HostOffset) throws -> RunPageView {
        try RunPageView(region: region, base: local(o))
    }
    /// A VMCS-format page in host memory (vmcs12 or an eVMCS in L1's memory).
    public func vmcs(at o: HostOffset) throws -> VMCSImage {
        try VMCSImage(region: region, base: local(o))
    }
}
