import ABI

/// L0's "host physical" memory: the memfd every tier maps, addressed only by `HostOffset`.
/// Every access is bounds-checked and throws rather than touching bytes outside the region.
public struct HostMemory: @unchecked Sendable {
    public let region: SharedRegion
    public init(region: SharedRegion) { self.region = region }

    public var size: UInt64 { region.size }

    public func load<T: FixedWidthInteger>(_: T.Type = T.self, at o: HostOffset) throws -> T {
        try region.load(T.self, at: o.raw)
    }
    public func store<T: FixedWidthInteger>(_ v: T, at o: HostOffset) throws {
        try region.store(v, at: o.raw)
    }
    public func readBytes(at o: HostOffset, count: Int) throws -> [UInt8] {
        try region.readBytes(at: o.raw, count: count)
    }
    public func writeBytes(_ b: [UInt8], at o: HostOffset) throws {
        try region.writeBytes(b, at: o.raw)
    }
    public func fill(_ byte: UInt8, at o: HostOffset, count: UInt64) throws {
        try region.fill(byte, at: o.raw, count: count)
    }
    /// A run page that lives in host memory (the PV exit page L1 registered).
    public func runPage(at o: HostOffset) throws -> RunPageView {
        try RunPageView(region: region, base: o.raw)
    }
    /// A VMCS-format page in host memory (vmcs12 or an eVMCS in L1's memory).
    public func vmcs(at o: HostOffset) throws -> VMCSImage {
        try VMCSImage(region: region, base: o.raw)
    }
}
