import ABI
import Transport

/// L2's CPU on pvm-rfc: deprivileged behind L1's switcher. Its MMU walks L1's shadow tables
/// (the root L1 publishes in the switcher area) straight to L1 GPAs; a miss or a permission
/// fault exits to L1 as a #PF through the switcher, and so does every other exit. L1 answers by
/// fixing the shadow (L2 retries), injecting an exception (delivered to L2's handler, which
/// returns through the switcher's direct path), or emulating the access (L2 goes on).
extension GuestCPU {
    /// One exit to L1 through the switcher and back.
    func switcherExit(_ reason: ExitReason, length: UInt64, qualification: UInt64 = 0, gpa: L2GPA = L2GPA(0),
                      info: UInt64 = 0, interruption: UInt8? = nil, errorCode: UInt32 = 0) -> Resumption {
        guard let switcher else { return .completed }
        run[register: .rip] = rip
        run[RunPage.exitInterruptionInfo] = interruption.map { 1 << 31 | 3 << 8 | UInt64($0) } ?? 0
        run[RunPage.exitInterruptionErrorCode] = UInt64(errorCode)
        switcher.countExit(reason)
        let event = port.exit(reason, length: length, qualification: qualification, gpa: gpa, info: info)
        let generation = switcher[SwitcherLayout.flushGeneration]
        if generation != flushSeen {
            flushSeen = generation
            shadowTLB.flushAll()
        }
        let newRIP = run[register: .rip]
        defer { rip = newRIP }
        if let event, event.isHardwareException {
            guard let vector = ExceptionVector(rawValue: event.vector), vector != .generalProtection else {
                return .fault(event.vector)                    // rdmsr_safe's #GP
            }
            rip = newRIP
            raise(vector, errorCode: UInt32(truncatingIfNeeded: event.errorCode),
                  address: L2GVA(switcher[SwitcherLayout.injectedCR2]))
            switcher.count(.directSwitches)                  // the handler's IRET, through the switcher
            return vector == .pageFault ? .retry : .completed
        }
        return newRIP == rip ? .retry : .completed
    }

    /// A load, store or fetch at `va` through the shadow tables. Returns the value loaded (or,
    /// for an access L1 emulated, what it left in RAX).
    func shadowAccess(_ va: L2GVA, size: Int, kind: PageWalk.Access, value: UInt64 = 0) -> UInt64 {
        guard let switcher else { return 0 }
        guard va.raw % UInt64(size) == 0 else {
            guestAssert(false, "\(size)-byte access at \(va) is not naturally aligned")
            return 0
        }
        var kind = kind
        if privilege.cpl == 3 { kind.insert(.user) }
        let write = kind.contains(.write)
        let mask = AccessSize.mask(UInt64(size))
        while true {
            let frame: L1GPA
            if let e = shadowTLB.lookup(va, kind) {
                frame = e.frame + va.offsetInPage
            } else {
                if addressSpace != nil { count(.tlbMisses) }
                let walk = PageWalk.translate(va, kind, root: L1GPA(switcher[SwitcherLayout.shadowRoot]), nxe: true,
                                              read: { l1 in try? self.memory.load(UInt64.self, at: switcher.l1Base + l1.raw) },
                                              write: { l1, e in try? self.memory.store(e, at: switcher.l1Base + l1.raw) })
                switch walk {
                case .mapped(let l1, _):
                    shadowTLB.insert(va, .init(frame: l1.pageBase, writable: write, user: kind.contains(.user),
                                               executable: kind.contains(.fetch), dirty: write))
                    frame = l1
                case .pageFault(let code):
                    run[register: .rax] = write ? value & mask : 0
                    switch switcherExit(.exceptionNMI, length: 3, qualification: va.raw, info: UInt64(size),
                                        interruption: ExceptionVector.pageFault.rawValue, errorCode: code) {
                    case .completed: return write ? 0 : run[register: .rax] & mask
                    case .retry: continue
                    case .fault(let v):
                        guestAssert(false, "access to \(va) faulted with vector \(v)")
                        return 0
                    }
                case .generalProtection:
                    // A non-canonical address: #GP, which traps to L1 like every exception L2
                    // takes, and comes back to L2's handler; then the access runs again.
                    if case .fault(let v) = switcherExit(.exceptionNMI, length: 3, qualification: va.raw,
                                                         interruption: ExceptionVector.generalProtection.rawValue) {
                        raise(.generalProtection, errorCode: 0, address: va)
                        switcher.count(.directSwitches)              // its IRET
                        guestAssert(v == ExceptionVector.generalProtection.rawValue, "#GP at \(va) came back as vector \(v)")
                    }
                    continue
                case .tableUnreadable(let at):
                    guestAssert(false, "L1's shadow tables point outside its memory at \(at)")
                    return 0
                }
            }
            do {
                return try hostAccess(switcher.l1Base + frame.raw, size: size, write: write, value: value)
            } catch {
                guestAssert(false, "L1's shadow entry for \(va) points outside its memory")
                return 0
            }
        }
    }
}
