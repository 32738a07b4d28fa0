import ABI
import Transport
#if canImport(Glibc)
import Glibc
#endif

/// What a guest program with several vCPUs uses to work together, in L2's own RAM (as KVM
/// selftests' multi-vCPU guests use shared globals): a rendezvous all vCPUs reach before any
/// goes on, so the vCPUs of a benchmark measure at the same time.
extension GuestCPU {
    /// One u64 per vCPU: how many rendezvous that vCPU has reached.
    static let rendezvousArea = L2GPA(0x3000)

    /// Waits until every vCPU has reached as many rendezvous as this one. Plain loads and stores
    /// (aligned 8-byte accesses are atomic on x86); the wait is PAUSE, which lets the host run
    /// another vCPU thread (no exit: this CPU model has no pause-loop exiting).
    public func rendezvous() {
        guard vcpuCount > 1 else { return }
        asKernel {
            let mine = Self.rendezvousArea + UInt64(vcpuIndex) * 8
            let generation = read64(mine) &+ 1
            write64(mine, generation)
            for i in 0..<vcpuCount {
                while read64(Self.rendezvousArea + UInt64(i) * 8) < generation { pause() }
            }
        }
    }

    /// LOCK CMPXCHG on an aligned u64 of L2's RAM (by guest-physical address, second stage
    /// only): true if it held `expected` and now holds `desired`.
    public func compareExchange64(_ gpa: L2GPA, expected: UInt64, desired: UInt64) -> Bool {
        guard gpa.raw % 8 == 0, let host = translate(gpa, access: EPT.read | EPT.write),
              let r = try? memory.compareExchange64(at: host, expected: expected, desired: desired) else {
            guestAssert(false, "LOCK CMPXCHG at \(gpa): not aligned RAM")
            return false
        }
        return r.exchanged
    }

    /// LOCK INC on an aligned u64 of L2's RAM.
    public func atomicIncrement(_ gpa: L2GPA) {
        while true {
            let v = read64(gpa)
            if compareExchange64(gpa, expected: v, desired: v &+ 1) { return }
        }
    }

    /// A full flush of this CPU's TLB (a CR3 reload of the current tables, as a flush of a range
    /// past Linux's ceiling does).
    public func flushTLB() {
        count(.cr3Loads)
        tlb.flushAll()
    }

    /// MFENCE: this vCPU's stores are visible before its later loads (x86 may otherwise
    /// reorder a store after a later load, and two vCPUs that each store a flag and read the
    /// other's could both miss).
    public func mfence() { MemoryFence.full() }

    /// PAUSE in a spin loop: an interrupt window (a kick is taken here) and a chance for the
    /// host to run another vCPU thread.
    public func pause() {
        pollInterrupts()
        sched_yield()
    }
}

/// RFLAGS.IF and the program's interrupt handlers (its IDT's external-interrupt entries).
struct GuestInterrupts {
    var enabled = false
    var handlers: [UInt8: (GuestCPU, UInt8) -> Void] = [:]
}

/// Interrupts from the local APIC: handlers, STI/CLI, HLT until one comes, and the x2APIC
/// writes that send them (ICR, SELF_IPI), end them (EOI), or KVM's PV IPI hypercall.
extension GuestCPU {
    /// Installs the handler for external-interrupt `vector`. It runs with interrupts off and
    /// returns as IRET does (interrupts back as they were); it should `eoi()`.
    public func setInterruptHandler(_ vector: UInt8, _ handler: @escaping (GuestCPU, UInt8) -> Void) {
        interrupts.handlers[vector] = handler
    }

    /// STI: interrupts on, from the instruction after the next (STI's interrupt shadow: `sti;
    /// hlt` wakes on an interrupt that was already waiting).
    public func sti() { interrupts.enabled = true }
    /// NOP: an instruction boundary, where a waiting interrupt is taken.
    public func nop() { pollInterrupts() }
    public func cli() { interrupts.enabled = false }

    /// An instruction boundary: the preemption timer's deadline reached is a PREEMPTION_TIMER
    /// exit (`takeTimerExits`); a kick from the hypervisor (its own IPI, which exits whatever
    /// RFLAGS.IF says) is an EXTERNAL_INTERRUPT exit; an interrupt-window request exits
    /// (INTERRUPT_WINDOW) once interrupts are on. Either way the hypervisor injects, or
    /// flushes, at the entry after.
    func pollInterrupts() {
        guard switcher == nil else { return }
        if run[RunPage.timerDeadline] != 0 { takeTimerExits() }
        switch run[RunPage.kick] {
        case 0: return
        case RunPage.kickWindow: if interrupts.enabled { _ = vmexit(.interruptWindow, length: 0) }
        default: _ = vmexit(.externalInterrupt, length: 0)
        }
    }

    /// A flush the hypervisor asked for at this entry (KVM_REQ_TLB_FLUSH_GUEST): the whole TLB.
    @inline(__always)
    func honourFlushRequest() {
        guard run[RunPage.flushTLB] != 0 else { return }
        run[RunPage.flushTLB] = 0
        tlb.flushAll()
    }

    /// Delivery through the IDT: the handler with interrupts off, then IRET.
    func takeInterrupt(_ vector: UInt8) {
        let was = interrupts.enabled
        interrupts.enabled = false
        if let h = interrupts.handlers[vector] { h(self, vector) }
        else { guestAssert(false, "interrupt \(vector) with no handler") }
        interrupts.enabled = was
    }

    /// x2APIC ICR: a fixed IPI of `vector` to the vCPU whose APIC ID is `destination`.
    public func sendIPI(_ vector: UInt8, to destination: Int) {
        wrmsr(LocalAPICMSR.icr, UInt64(vector) | UInt64(destination) << 32)
    }
    /// x2APIC ICR with the all-excluding-self shorthand.
    public func sendIPIToOthers(_ vector: UInt8) {
        wrmsr(LocalAPICMSR.icr, UInt64(vector) | 3 << 18)
    }
    /// x2APIC SELF_IPI.
    public func selfIPI(_ vector: UInt8) { wrmsr(LocalAPICMSR.selfIPI, UInt64(vector)) }
    /// EOI: the interrupt in service is done.
    public func eoi() { wrmsr(LocalAPICMSR.eoi, 0) }
    /// x2APIC TPR: interrupts of a priority class at or below `tpr >> 4` wait.
    public func setTPR(_ tpr: UInt8) { wrmsr(LocalAPICMSR.tpr, UInt64(tpr)) }

    // The same registers in the xAPIC page (`XAPIC`): 32-bit MOVs to memory no RAM backs, each
    // an MMIO exit to the hypervisor that runs this vCPU's local APIC.

    /// A 32-bit store to an xAPIC register.
    public func xapicWrite(_ offset: UInt64, _ value: UInt32) { write32(L2GPA(XAPIC.base + offset), value) }
    /// A 32-bit load of an xAPIC register.
    public func xapicRead(_ offset: UInt64) -> UInt32 { read32(L2GPA(XAPIC.base + offset)) }
    /// xAPIC self-IPI as kvm-unit-tests' xapic_icr_write sends it: wait until the ICR's
    /// delivery-status bit (12) is clear, write its high half (no destination), then its low
    /// half with the self shorthand, which sends.
    public func xapicSelfIPI(_ vector: UInt8) {
        while xapicRead(XAPIC.icrLow) & 1 << 12 != 0 { pause() }
        xapicWrite(XAPIC.icrHigh, 0)
        xapicWrite(XAPIC.icrLow, UInt32(vector) | 1 << 18)     // bits 19:18 = 01: to self
    }
    /// xAPIC EOI.
    public func xapicEOI() { xapicWrite(XAPIC.eoi, 0) }
    /// xAPIC TPR.
    public func xapicSetTPR(_ tpr: UInt8) { xapicWrite(XAPIC.tpr, UInt32(tpr)) }
    /// KVM_HC_SEND_IPI: `vector` to every APIC ID set in the 128-bit bitmap from `minID`;
    /// returns how many vCPUs it reached (or -KVM_EINVAL).
    public func pvSendIPI(_ vector: UInt8, bitmapLow: UInt64, bitmapHigh: UInt64 = 0, minID: UInt64 = 0) -> UInt64 {
        vmcall(KVMHypercall.sendIPI, bitmapLow, bitmapHigh, minID, UInt64(vector))
    }
}
