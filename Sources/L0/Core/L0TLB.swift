import ABI
import Transport

/// L2's TLBs, where L0 runs the guest directly (single; pv with `directAPIC` /
/// `directTLBFlush`): KVM's steal-time area with its `preempted` flag and the PV TLB flush it
/// allows (KVM_FEATURE_PV_TLB_FLUSH), and L0's own flush hypercall (`L2Hypercall.flushTLB`).
/// A flush is a request in the vCPU's run page that its CPU honours before it runs guest code
/// again; a vCPU in guest mode is kicked first. Every GPA and bitmap comes from the guest.
extension L0VCPU {
    /// WRMSR MSR_KVM_STEAL_TIME: the area's GPA (64-byte aligned), enable bit 0. Reserved bits
    /// (1-5) set: #GP, as KVM refuses them (KVM_STEAL_RESERVED_MASK). An area past what EPT02
    /// covers is dropped; an unmapped one is only found unmapped when used.
    func handleStealTimeMSR(_ exit: L2Exit, _ regs: inout RegisterFile) -> NextStep {
        if case let .msrWrite(_, value) = exit.kind {
            guard value & (KVMStealTime.size - 1) & ~KVMStealTime.enable == 0 else {
                inject(into: .l2, vector: 13, errorCode: 0)
                return .resume(.l2)
            }
            if shared.stealTime.count < control.layout.vcpuCount {
                shared.stealTime = [L2GPA?](repeating: nil, count: control.layout.vcpuCount)
            }
            let gpa = value & ~(KVMStealTime.size - 1)
            // The guest's number: compared without an addition that could wrap.
            let fits = gpa <= control.layout.l2AddressLimit && control.layout.l2AddressLimit - gpa >= KVMStealTime.size
            shared.stealTime[id] = value & KVMStealTime.enable != 0 && fits ? L2GPA(gpa) : nil
        } else if case .msrRead = exit.kind {
            regs.edxEax = shared.stealTime.count > id ? (shared.stealTime[id].map { $0.raw | KVMStealTime.enable } ?? 0) : 0
        }
        regs.skipInstruction(length: exit.info.instructionLength)
        return .resume(.l2)
    }

    /// Where vCPU `v`'s `preempted` word is in host memory, if it registered a mapped area.
    func preemptedWord(of v: Int) -> HostOffset? {
        guard v < shared.stealTime.count, let area = shared.stealTime[v] else { return nil }
        return ept02.translate(area + KVMStealTime.preemptedOffset, access: EPT.write)
    }

    /// Sets or clears bits of vCPU `v`'s `preempted` byte (a compare-exchange loop against the
    /// guest's own atomic updates); returns the byte it held. 0 if it has no area.
    @discardableResult
    func updatePreempted(of v: Int, _ change: (UInt64) -> UInt64) -> UInt64 {
        guard let at = preemptedWord(of: v) else { return 0 }
        let mem = l1Memory.host
        for _ in 0..<64 {      // a guest that keeps changing the word cannot hold L0 here
            guard let old: UInt64 = try? mem.load(at: at) else { return 0 }
            let new = old & ~0xFF | change(old & 0xFF) & 0xFF
            guard let r = try? mem.compareExchange64(at: at, expected: old, desired: new) else { return 0 }
            if r.exchanged { return old & 0xFF }
        }
        return 0
    }

    /// This vCPU stops running guest code for the host's reasons (it blocked at HLT): its guest
    /// may see it preempted and leave it a flush instead of an IPI. (KVM reports only an
    /// involuntary preemption; a vCPU L0 holds runs no guest code either way, and flushes at
    /// its next entry.)
    func markPreempted() {
        updatePreempted(of: id) { $0 | KVMStealTime.preempted }
    }

    /// At the entry into L2: `preempted` cleared, and a flush some vCPU left there honoured.
    func takeStealTimeFlush() {
        let old = updatePreempted(of: id) { _ in 0 }
        if old & KVMStealTime.flushTLB != 0 {
            l2Run[RunPage.flushTLB] = 1
            counters.tlbFlushesAtEntry += 1
        }
    }

    /// L2's flush hypercall: every named vCPU flushes before it runs guest code again; those in
    /// guest mode are kicked and this vCPU waits (blocked in L0) until each has left it.
    func handleFlushHypercall(_ exit: L2Exit, _ regs: inout RegisterFile) -> NextStep {
        counters.tlbFlushHypercalls += 1
        regs.skipInstruction(length: exit.info.instructionLength)
        let bitmap = regs[.rbx], n = control.layout.vcpuCount
        guard n >= 64 || bitmap >> UInt64(n) == 0 else {
            regs[.rax] = HypercallError.invalid.returnValue
            return .resume(.l2)
        }
        regs[.rax] = 0
        var kicked = Set<Int>()
        for v in 0..<n where bitmap >> UInt64(v) & 1 != 0 {
            counters.tlbFlushRequests += 1
            let page = control.runPage(.l2, vcpu: v)
            page[RunPage.flushTLB] = 1
            if v != id, v < shared.inGuestMode.count, shared.inGuestMode[v] {
                page[RunPage.kick] = RunPage.kickExternal
                counters.apicKicks += 1
                kicked.insert(v)
            }
        }
        guard !kicked.isEmpty else { return .resume(.l2) }
        shared.flushWaits[id] = kicked
        return .block(.l2)
    }

    /// vCPU `v` left guest mode (L0 took its exit): a flush hypercall waiting for it need not
    /// any more; the sender whose last target it was is woken.
    func leftGuestMode(_ v: Int) {
        guard !shared.flushWaits.isEmpty else { return }
        for (sender, var waiting) in shared.flushWaits where waiting.contains(v) {
            waiting.remove(v)
            if waiting.isEmpty {
                shared.flushWaits[sender] = nil
                shared.wakeups.append(sender)
            } else {
                shared.flushWaits[sender] = waiting
            }
        }
    }
}
