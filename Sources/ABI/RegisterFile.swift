/// A tier's register file as a value (`struct kvm_regs` order, RIP and RFLAGS last): what an
/// exit handler may read and change. L0's loop loads it from the run page before a handler
/// runs and stores it back after, so handlers never touch shared memory for registers.
public struct RegisterFile: Equatable, Sendable {
    var values = InlineArray<18, UInt64>(repeating: 0)

    public init() {}

    @inline(__always)
    public subscript(r: Register) -> UInt64 {
        get { values[r.rawValue] }
        set { values[r.rawValue] = newValue }
    }

    /// EDX:EAX as RDMSR/WRMSR use it: the low halves of RDX and RAX.
    public var edxEax: UInt64 {
        get { EDXEAX.combine(edx: self[.rdx], eax: self[.rax]) }
        set { (self[.rdx], self[.rax]) = EDXEAX.split(newValue) }
    }

    /// The instruction is done: RIP moves past its `length` bytes (how every tier learns that
    /// an exit was emulated rather than to be retried).
    public mutating func skipInstruction(length: UInt64) { self[.rip] &+= length }

    public static func == (a: RegisterFile, b: RegisterFile) -> Bool {
        Register.allCases.allSatisfy { a[$0] == b[$0] }
    }
}

/// The one place a 64-bit value meets the EDX:EAX register pair (RDMSR, WRMSR).
public enum EDXEAX {
    public static func combine(edx: UInt64, eax: UInt64) -> UInt64 { (edx << 32) | (eax & 0xFFFF_FFFF) }
    public static func split(_ v: UInt64) -> (edx: UInt64, eax: UInt64) { (v >> 32, v & 0xFFFF_FFFF) }
}

/// The bytes an access of `size` bytes touches in a register: the one mask every port, MMIO
/// and unassigned-memory access uses. Sizes above 8 count as 8, and 0 as 1.
public enum AccessSize {
    public static func mask(_ size: UInt64) -> UInt64 {
        let bytes = Swift.max(1, Swift.min(8, size))
        return bytes >= 8 ? ~0 : (1 << (bytes * 8)) - 1
    }
}
