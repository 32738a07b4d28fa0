import ABI
import Transport

/// The devices L1 emulates for its L2 (its "QEMU"): a 16550-style serial console whose output
/// the user sees, and unassigned memory that reads as all ones. Shared by both personalities.
public struct L1Devices {
    public static let serialBase: UInt16 = 0x3F8
    public static let serialPorts: ClosedRange<UInt16> = 0x3F8...0x3FF
    var line: [UInt8] = []
    public private(set) var serialBytes: UInt64 = 0
    public private(set) var unassignedAccesses: UInt64 = 0
    /// L2's MSRs as L1 emulates them (unset ones read as 0).
    var msrs: [UInt32: UInt64] = [:]

    public init() {}

    /// A device in L1's device model (its "QEMU"): a 32-bit latch, vmexit.c's inl_from_qemu port.
    public static let qemuPorts: ClosedRange<UInt16> = 0x1234...0x1237
    var qemuLatch: UInt64 = 0

    public func owns(port: UInt16) -> Bool { Self.serialPorts.contains(port) || Self.qemuPorts.contains(port) }

    /// Port I/O L1 owns: returns the value for an IN.
    public mutating func portIO(port: UInt16, isIn: Bool, value: UInt64) -> UInt64 {
        guard owns(port: port) else { return ~0 }
        if Self.qemuPorts.contains(port) {
            if isIn { return qemuLatch }
            qemuLatch = value
            return 0
        }
        switch (port - Self.serialBase, isIn) {
        case (0, false):                     // THR: transmit one byte
            serialBytes += 1
            let b = UInt8(truncatingIfNeeded: value)
            if b == 0x0A {
                writeOut("[L2 serial] " + String(decoding: line, as: UTF8.self) + "\n")
                line.removeAll()
            } else {
                line.append(b)
            }
            return 0
        case (5, true):                      // LSR: transmitter empty and holding register empty
            return 0x60
        default:
            return 0
        }
    }

    public func rdmsr(_ msr: UInt32) -> UInt64 { msrs[msr] ?? 0 }
    public mutating func wrmsr(_ msr: UInt32, _ value: UInt64) { msrs[msr] = value }

    /// L2 GPA pages L2 gave back (ballooned): L1 will not map them again.
    public private(set) var ballooned: Set<UInt64> = []
    public mutating func balloon(_ gpa: L2GPA) { ballooned.insert(gpa.pageNumber) }
    public func isBallooned(_ gpa: L2GPA) -> Bool { ballooned.contains(gpa.pageNumber) }

    /// An L2 access to a GPA no memory backs: reads float high, writes are dropped.
    public mutating func unassigned(isWrite: Bool, size: Int) -> UInt64 {
        unassignedAccesses += 1
        return isWrite ? 0 : (size >= 8 ? ~0 : (1 << (UInt64(size) * 8)) - 1)
    }
}
