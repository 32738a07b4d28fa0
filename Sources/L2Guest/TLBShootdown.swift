import ABI

/// A TLB shootdown, as Linux does one when it changes a page-table entry other CPUs may have
/// cached (flush_tlb_mm_range): the CPU that changed it flushes its own entry, then makes every
/// other vCPU of the address space drop it, one of three ways:
///   - `ipi`: an IPI to each, whose handler INVLPGs and acknowledges; the sender waits for
///     every acknowledgment (native_flush_tlb_multi);
///   - `pvFlush`: KVM's PV TLB flush (kvm_flush_tlb_multi): a vCPU whose steal-time area says
///     it is preempted gets KVM_VCPU_FLUSH_TLB set there instead (its hypervisor flushes at its
///     next entry); the others get IPIs as above;
///   - `hypercall`: L0's flush hypercall (`L2Hypercall.flushTLB`): one exit, no IPI; L0 kicks
///     the vCPUs in guest mode and returns once none can use the old entry.
public enum TLBShootdown {
    public enum Method: UInt64, Sendable, CaseIterable {
        case ipi = 0, pvFlush = 1, hypercall = 2
        /// No shootdown at all (the probe's control: the other vCPUs keep their stale entries).
        case none = 3
        public var name: String { ["ipi", "pv", "hypercall", "none"][Int(rawValue)] }
    }

    /// The IPI vector of a flush, and the acknowledgments each vCPU's handler counts.
    static let flushVector: UInt8 = 0xB8
    static let acks = L2GPA(0x5900)
    /// Each vCPU's steal-time area, 64 bytes apiece.
    static let stealTimeAreas = L2GPA(0x7000)
    /// Words the vCPUs of a shootdown test share: the address space's CR3 (set by vCPU 0), how
    /// many helpers have it loaded, and the probe's round.
    static let sharedCR3 = L2GPA(0x5A00)
    static let helpersReady = L2GPA(0x5A08)

    static func ack(_ v: Int) -> L2GPA { acks + UInt64(v) * 8 }
    static func stealTime(_ v: Int) -> L2GPA { stealTimeAreas + UInt64(v) * KVMStealTime.size }

    /// What every vCPU taking part does first: its steal-time area registered, the flush IPI's
    /// handler installed (INVLPG of the page named in `target`... of everything: a full flush,
    /// as a flush of a range past Linux's ceiling is), interrupts on.
    static func join(_ cpu: GuestCPU) {
        cpu.wrmsr(KVMStealTime.msr, stealTime(cpu.vcpuIndex).raw | KVMStealTime.enable)
        cpu.setInterruptHandler(flushVector) { c, _ in
            c.flushTLB()
            let w = ack(c.vcpuIndex)
            c.write64(w, c.read64(w) &+ 1)
            c.eoi()
        }
        cpu.sti()
    }

    /// vCPU `cpu` has changed a PTE of `va`: its own entry goes, then every other vCPU's.
    static func shootdown(_ cpu: GuestCPU, _ va: L2GVA, method: Method) {
        cpu.invlpg(va)
        let others = (0..<cpu.vcpuCount).filter { $0 != cpu.vcpuIndex }
        switch method {
        case .hypercall:
            let bitmap = others.reduce(UInt64(0)) { $0 | 1 << UInt64($1) }
            let r = cpu.vmcall(L2Hypercall.flushTLB.rawValue, bitmap, va.raw)
            cpu.guestAssert(r == 0, "the flush hypercall failed: \(Int64(bitPattern: r))")
        case .ipi:
            flushByIPI(cpu, others)
        case .none:
            break
        case .pvFlush:
            var needIPI: [Int] = []
            for v in others {
                // kvm_flush_tlb_multi: a preempted vCPU gets the flag, not an IPI.
                let word = stealTime(v) + KVMStealTime.preemptedOffset
                let state = cpu.read64(word)
                if state & KVMStealTime.preempted != 0,
                   cpu.compareExchange64(word, expected: state, desired: state | KVMStealTime.flushTLB) {
                    continue
                }
                needIPI.append(v)
            }
            flushByIPI(cpu, needIPI)
        }
    }

    /// What vCPU `v`'s steal-time area says.
    static func isPreempted(_ cpu: GuestCPU, _ v: Int) -> Bool {
        cpu.read64(stealTime(v) + KVMStealTime.preemptedOffset) & KVMStealTime.preempted != 0
    }

    /// An IPI to each vCPU of `targets`, then a wait for every one's acknowledgment.
    static func flushByIPI(_ cpu: GuestCPU, _ targets: [Int]) {
        let before = targets.map { cpu.read64(ack($0)) }
        for v in targets { cpu.sendIPI(flushVector, to: v) }
        for (v, b) in zip(targets, before) {
            while cpu.read64(ack(v)) == b { cpu.pause() }
        }
    }

    /// The address space vCPU 0 builds: user page 0 mapped to frame `a` (which holds 0xA0),
    /// frame `b` (0xB1) ready to take its place. CR3 is published for the helpers.
    static func build(_ cpu: GuestCPU) -> (L2Kernel, AddressSpace, a: L2GPA, b: L2GPA) {
        let kernel = L2Kernel(cpu: cpu)
        let space = kernel.newAddressSpace()
        let a = kernel.allocate(), b = kernel.allocate()
        cpu.write64(a, 0xA0)
        cpu.write64(b, 0xB1)
        kernel.map(space, PagingOperations.user(0), to: a, writable: true)
        cpu.writeCR(3, space.cr3)
        cpu.write64(sharedCR3, space.cr3)
        return (kernel, space, a, b)
    }

    /// A helper joins vCPU 0's address space (waiting for it to exist) and warms its TLB.
    static func adopt(_ cpu: GuestCPU) {
        while cpu.read64(sharedCR3) == 0 { cpu.pause() }
        cpu.writeCR(3, cpu.read64(sharedCR3))
        join(cpu)
        _ = cpu.read64(PagingOperations.user(0))
    }

    /// The benchmark tests: vCPU 0 remaps user page 0 and shoots it down each iteration, while
    /// vCPU 1 reads the page in a loop (running) or halts between wake-ups (idle).
    static func test(_ name: String, _ method: Method, halting: Bool, _ summary: String) -> BenchOperation {
        var requires: BenchOperation.Requirements = [.localAPIC]
        if halting { requires.insert(.stealTime) }            // it waits for the target to look preempted
        if method == .hypercall { requires.insert(.l0TLBFlush) }
        return BenchOperation(name: name, summary: summary, helper: BenchOperation.Helper(vcpus: 2, setUp: { cpu in
            adopt(cpu)
        }, body: { cpu in
            _ = cpu.read64(PagingOperations.user(0))
            if halting { cpu.hlt() } else { cpu.pause() }
        }, stop: { cpu in
            cpu.sendIPI(flushVector, to: 1)        // a halted helper wakes to see the stop word
        }), prepare: { cpu in
            let (kernel, space, a, b) = build(cpu)
            join(cpu)
            return { i in
                // An idle target: wait until its hypervisor says it runs no guest code (it
                // halted; its steal time says preempted), so the flush finds it idle.
                if halting { while !isPreempted(cpu, 1) { cpu.pause() } }
                kernel.map(space, PagingOperations.user(0), to: i & 1 == 0 ? b : a, writable: true)
                shootdown(cpu, PagingOperations.user(0), method: method)
            }
        }).requiring(requires)
    }

    public static let all: [BenchOperation] = [
        test("tlb_shootdown", .ipi, halting: false, "remap a page and flush it on vCPU 1 (running) by IPI; wait for its ack (native_flush_tlb_multi)"),
        test("tlb_shootdown_halted", .ipi, halting: true, "the same with vCPU 1 halted: the IPI wakes it"),
        test("tlb_shootdown_pv", .pvFlush, halting: true, "KVM's PV TLB flush to a halted (preempted) vCPU 1: a steal-time flag, no IPI; it flushes at its next entry"),
        test("tlb_shootdown_hypercall", .hypercall, halting: false, "L0's flush hypercall for vCPU 1 (running): one exit, a kick, no IPI in L2"),
    ]

    /// The end-to-end check (MultiVCPUTests): every helper reads user page 0 (its TLB holds
    /// frame a), vCPU 0 remaps the page to frame b and shoots it down by `method`, then the
    /// helpers (woken if halted) read it again: each must see b's value, not its stale entry.
    /// Helpers halt for the pv method (so they are preempted and skipped), run otherwise.
    public static let probe = GuestProgram(name: "tlb-shootdown-probe", summary: "remap a page on vCPU 0, shoot it down; every vCPU must see the new frame",
                                           arguments: [.init("method", "0 IPIs, 1 KVM PV TLB flush, 2 L0's flush hypercall, 3 none (stale entries stay)", default: "0", accepts: .range(0...3))],
                                           minimumVCPUs: 2) { cpu, args in
        let method = Method(rawValue: args.first ?? 0) ?? .ipi
        let round = L2GPA(0x5A10)
        let helpers = UInt64(cpu.vcpuCount - 1)
        if cpu.vcpuIndex == 0 {
            let (kernel, space, _, b) = build(cpu)
            join(cpu)
            while cpu.read64(helpersReady) < helpers { cpu.pause() }
            if method == .pvFlush {
                // Every helper halted, so preempted in its steal-time area.
                for v in 1..<cpu.vcpuCount { while !isPreempted(cpu, v) { cpu.pause() } }
            }
            kernel.map(space, PagingOperations.user(0), to: b, writable: true)
            shootdown(cpu, PagingOperations.user(0), method: method)
            cpu.write64(round, 1)
            cpu.mfence()
            cpu.setInterruptHandler(0xB9) { c, _ in c.eoi() }
            for v in 1..<cpu.vcpuCount { cpu.sendIPI(0xB9, to: v) }       // wake the halted helpers
            cpu.sync(0x59, 0, cpu.read64(PagingOperations.user(0)))
        } else {
            adopt(cpu)
            cpu.setInterruptHandler(0xB9) { c, _ in c.eoi() }
            let seen = cpu.read64(PagingOperations.user(0))
            cpu.asKernel { cpu.atomicIncrement(helpersReady) }
            while cpu.read64(round) == 0 {
                if method == .pvFlush { cpu.hlt() } else { cpu.pause() }
            }
            cpu.sync(0x59, seen, cpu.read64(PagingOperations.user(0)))
        }
    }
}
