import ABI

/// What an exception handler is given: what the CPU pushes, and CR2 for a #PF.
public struct ExceptionFrame: Sendable, Equatable {
    public var vector: ExceptionVector
    public var errorCode: UInt32
    /// CR2 for a #PF: the address that faulted.
    public var address: L2GVA
    /// The CPL the exception came from was 3.
    public var fromUser: Bool
}

/// L2's privilege state and its exception/syscall entry: an IDT-like table of handlers in the
/// guest program, and the SYSCALL entry point (LSTAR). A handler runs at CPL 0 and returns as
/// IRET (SYSRET for a syscall) does, to the CPL it came from.
struct Privilege {
    var cpl: UInt8 = 0
    var handlers: [ExceptionVector: (GuestCPU, ExceptionFrame) -> Void] = [:]
    var syscall: ((GuestCPU, UInt64, [UInt64]) -> UInt64)?
    /// Nested deliveries in progress (a fault in a handler): the third is a triple fault.
    var depth = 0
}

extension GuestCPU {
    /// Installs L2's handler for `vector` (its IDT entry).
    public func setHandler(_ vector: ExceptionVector, _ handler: @escaping (GuestCPU, ExceptionFrame) -> Void) {
        privilege.handlers[vector] = handler
    }

    /// Installs L2's SYSCALL entry: number and arguments in, RAX out.
    public func setSyscallHandler(_ handler: @escaping (GuestCPU, UInt64, [UInt64]) -> UInt64) {
        privilege.syscall = handler
    }

    /// The current privilege level (0 kernel, 3 user).
    public var cpl: UInt8 { privilege.cpl }

    /// Drops to user mode (an IRET or SYSRET to CPL 3).
    public func enterUserMode() {
        guestAssert(privilege.cpl == 0, "enterUserMode from CPL \(privilege.cpl)")
        privilege.cpl = 3
    }

    /// SYSCALL from user mode into L2's kernel and SYSRET back: no exit on the paths where L2
    /// runs in VMX non-root mode (the CPU switches privilege itself).
    public func syscall(_ nr: UInt64, _ args: UInt64...) -> UInt64 {
        guestAssert(privilege.cpl == 3, "SYSCALL from CPL \(privilege.cpl)")
        guard let handler = privilege.syscall else {
            guestAssert(false, "SYSCALL with no entry point installed")
            return 0
        }
        count(.syscalls)
        // pvm-rfc: the switcher's direct switch, both ways, with no L1 (the RFC's "direct switching").
        switcher?.count(.directSwitches, 2)
        privilege.cpl = 0
        let r = handler(self, nr, args)
        privilege.cpl = 3
        return r
    }

    /// INT3: a #BP trap delivered to L2's handler, which returns after the instruction. On
    /// pvm-rfc it traps to L1, which delivers it back through the switcher.
    public func int3() {
        if switcher != nil {
            while switcherExit(.exceptionNMI, length: 1, interruption: ExceptionVector.breakpoint.rawValue) == .retry {}
            return
        }
        raise(.breakpoint, errorCode: 0, address: L2GVA(0))
    }

    /// Delivers an exception to L2's handler through its table, at CPL 0, and returns to the CPL
    /// it came from. No handler, or a fault while two deliveries are in progress, ends the
    /// program with a failed assertion (a triple fault would reset the guest).
    func raise(_ vector: ExceptionVector, errorCode: UInt32, address: L2GVA) {
        guard let handler = privilege.handlers[vector] else {
            guestAssert(false, "unhandled \(vector) (error code 0x\(String(errorCode, radix: 16))) at \(address)")
            return
        }
        guard privilege.depth < 2 else {
            guestAssert(false, "triple fault: \(vector) at \(address) while delivering two exceptions")
            return
        }
        let from = privilege.cpl
        count(.exceptions)
        privilege.depth += 1
        privilege.cpl = 0
        handler(self, ExceptionFrame(vector: vector, errorCode: errorCode, address: address, fromUser: from == 3))
        privilege.cpl = from
        privilege.depth -= 1
    }

    /// Runs `body` with kernel rights whatever the CPL (the harness's ucalls: its port belongs
    /// to L2's kernel, which user code reaches only through it).
    func asKernel<T>(_ body: () -> T) -> T {
        let saved = privilege.cpl
        privilege.cpl = 0
        defer { privilege.cpl = saved }
        return body()
    }
}
