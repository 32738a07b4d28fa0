import ABI

/// Devices L0 itself runs on I/O ports, like KVM's in-kernel devices: port I/O to them completes
/// in L0 with no trip to L1. On the nvmx path they are part of L1's platform (L2 reaches them when
/// L1 does not intercept the port); on the pv path L1 hands ports over with `registerL0Ports`.
public struct L0Devices: Sendable, Equatable {
    public struct Range: Sendable, Equatable {
        public var ports: ClosedRange<UInt16>
        public var device: PVL0Device
    }
    public private(set) var ranges: [Range] = []
    var latches: [UInt16: UInt64] = [:]

    public init() {}

    /// The port vmexit.c's inl_from_kernel / outl_to_kernel use (handled by the kernel there).
    public static let kernelPort: UInt16 = 0x4D0
    /// L1's platform on the nvmx path: a latch at the kernel port.
    public static let platformDefault: L0Devices = {
        var d = L0Devices()
        _ = d.register(first: UInt64(kernelPort), count: 2, device: .latch)
        return d
    }()

    public func owns(_ port: UInt16) -> Bool { ranges.contains { $0.ports.contains(port) } }

    /// Adds a port range; false if it is empty, wraps past 0xFFFF, overlaps a registered range,
    /// or covers the ucall port (the harness's).
    public mutating func register(first: UInt64, count: UInt64, device: PVL0Device) -> Bool {
        // Overflow-safe: both numbers come from L1 (`count` may be anything up to 2^64 - 1).
        guard count > 0, first <= 0xFFFF, count <= 0x1_0000 - first else { return false }
        let r = UInt16(first)...UInt16(first + count - 1)
        guard !r.contains(Ucall.port), !ranges.contains(where: { $0.ports.overlaps(r) }) else { return false }
        ranges.append(Range(ports: r, device: device))
        return true
    }

    /// IN: the device's value, or nil for a port no device claims.
    public func read(port: UInt16) -> UInt64? {
        guard owns(port) else { return nil }
        return latches[port] ?? 0
    }

    public mutating func write(port: UInt16, value: UInt64) {
        guard owns(port) else { return }
        latches[port] = value
    }
}
