import ABI

/// The interrupt tests of kvm-unit-tests' x86/vmexit.c, on the local APIC model: an IPI to a
/// running vCPU and to a halted one, KVM's PV IPI hypercall, the TSC-deadline timer (at once,
/// and 3 us ahead), and the ten self-IPI tests (xAPIC and x2APIC; taken at STI;NOP, at
/// STI;HLT, or when the TPR comes down). The IPI tests run on two vCPUs: vCPU 0 sends and measures; vCPU 1 takes the
/// interrupt in its handler, counts it where vCPU 0 sees it, and EOIs.
public enum InterruptOperations {
    /// The vector the tests send (vmexit.c's IPI_TEST_VECTOR).
    public static let vector: UInt8 = 0xB0
    /// L2 memory the vCPUs share: how many interrupts each vCPU's handler took, and the stop word.
    static let received = L2GPA(0x5000)
    /// How many times the target has gone to HLT: the sender of `ipi_halt` waits for it, so its
    /// IPI finds the target halted (a wake-up), not on its way there.
    static let haltingWord = L2GPA(0x5800)

    static func receivedWord(_ v: Int) -> L2GPA { received + UInt64(v) * 8 }

    /// The handler every test installs: count, then EOI (through the xAPIC page for the xAPIC
    /// tests, as their guest's APIC is in xAPIC mode).
    static func installHandler(_ cpu: GuestCPU, xapic: Bool = false) {
        cpu.setInterruptHandler(vector) { c, _ in
            let w = receivedWord(c.vcpuIndex)
            c.write64(w, c.read64(w) &+ 1)
            if xapic { c.xapicEOI() } else { c.eoi() }
        }
    }

    /// vCPU 1 waiting for IPIs, running (PAUSE loop) or halted (HLT loop), until vCPU 0 stops it.
    static func target(halting: Bool) -> BenchOperation.Helper {
        BenchOperation.Helper(vcpus: 2, setUp: { cpu in
            installHandler(cpu)
            cpu.sti()
        }, body: { cpu in
            if halting {
                cpu.write64(haltingWord, cpu.read64(haltingWord) &+ 1)
                cpu.hlt()
            } else {
                cpu.pause()
            }
        }, stop: { cpu in
            cpu.sendIPI(vector, to: 1)         // a halted target wakes to see the stop word
        })
    }

    /// Sends with `send`, then waits (PAUSE) until vCPU 1's handler has taken it. To a halting
    /// target: first until it has gone to HLT again (and one PAUSE more, for its HLT to reach
    /// the hypervisor), so the IPI wakes it.
    static func ipiRoundTrip(_ cpu: GuestCPU, halting: Bool = false, _ send: (GuestCPU) -> Void) {
        let w = receivedWord(1)
        let before = cpu.read64(w)
        if halting {
            while cpu.read64(haltingWord) <= before { cpu.pause() }
            cpu.pause()
        }
        send(cpu)
        while cpu.read64(w) == before { cpu.pause() }
    }

    /// How a self-IPI test reaches its APIC: the xAPIC page (vmexit.c's self_ipi_*) or x2APIC
    /// MSRs (x2apic_self_ipi_*).
    enum APICInterface { case xapic, x2apic }

    /// What a self-IPI test does around the IPI (vmexit.c's five): interrupts off until an STI
    /// followed by a NOP or a HLT, or on throughout; and the TPR raised to class 15 before the
    /// IPI (so it waits in the IRR) and lowered to 0 after it (so it is taken then).
    struct SelfIPIShape {
        var sti: Bool
        var halt: Bool
        var tpr: Bool
    }

    /// The TPR value that holds back every vector (class 15, what CR8 = 0xF means), written to
    /// the APIC's own TPR register: this model keeps CR8 apart from the APIC.
    static let blockingTPR: UInt8 = 0xF0

    /// One self-IPI, taken exactly once at the point its shape says.
    static func selfIPI(_ cpu: GuestCPU, _ apic: APICInterface, _ shape: SelfIPIShape) {
        let w = receivedWord(cpu.vcpuIndex)
        let before = cpu.read64(w)
        if shape.sti { cpu.cli() }
        func setTPR(_ t: UInt8) { if apic == .xapic { cpu.xapicSetTPR(t) } else { cpu.setTPR(t) } }
        if shape.tpr { setTPR(blockingTPR) }
        if apic == .xapic { cpu.xapicSelfIPI(vector) } else { cpu.selfIPI(vector) }
        if shape.tpr {
            cpu.guestAssert(cpu.read64(w) == before, "the self-IPI was taken under a TPR of class 15")
            setTPR(0)
        }
        if shape.sti { cpu.sti() }
        if shape.halt { cpu.hlt() } else { cpu.nop() }
        cpu.guestAssert(cpu.read64(w) == before &+ 1, "the self-IPI was not taken exactly once")
    }

    /// vmexit.c's five self-IPI tests on one APIC interface.
    static func selfIPITests(_ apic: APICInterface) -> [BenchOperation] {
        let prefix = apic == .xapic ? "self_ipi" : "x2apic_self_ipi"
        let how = apic == .xapic ? "xAPIC ICR (the APIC page: high half, then low half)" : "x2APIC SELF_IPI (MSR 0x83f)"
        let tprHow = apic == .xapic ? "the xAPIC TPR (0x80)" : "the x2APIC TPR (MSR 0x808)"
        let shapes: [(String, SelfIPIShape, String)] = [
            ("sti_nop", SelfIPIShape(sti: true, halt: false, tpr: false), "interrupts off; taken at STI;NOP"),
            ("sti_hlt", SelfIPIShape(sti: true, halt: true, tpr: false), "interrupts off; STI;HLT ends at once"),
            ("tpr", SelfIPIShape(sti: false, halt: false, tpr: true), "interrupts on, TPR class 15 then 0 through \(tprHow): taken at the lowering"),
            ("tpr_sti_nop", SelfIPIShape(sti: true, halt: false, tpr: true), "interrupts off, TPR 15 then 0: taken at STI;NOP"),
            ("tpr_sti_hlt", SelfIPIShape(sti: true, halt: true, tpr: true), "interrupts off, TPR 15 then 0: STI;HLT ends at once"),
        ]
        return shapes.map { suffix, shape, what in
            BenchOperation(name: "\(prefix)_\(suffix)", summary: "self-IPI by \(how), \(what) (vmexit.c)", prepare: { cpu in
                installHandler(cpu, xapic: apic == .xapic)
                cpu.sti()
                return { _ in selfIPI(cpu, apic, shape) }
            })
        }
    }

    /// The timer's vector (vmexit.c's TSC_DEADLINE_TIMER_VECTOR).
    public static let timerVector: UInt8 = 0xEF

    /// vmexit.c's timer set-up: the LVT timer in TSC-deadline mode at `timerVector`, a handler
    /// that counts (at `receivedWord`), does `also`, and EOIs; interrupts on.
    static func timerSetUp(_ cpu: GuestCPU, also: @escaping (GuestCPU) -> Void = { _ in }) {
        cpu.setInterruptHandler(timerVector) { c, _ in
            let w = receivedWord(c.vcpuIndex)
            c.write64(w, c.read64(w) &+ 1)
            also(c)
            c.eoi()
        }
        cpu.wrmsr(LocalAPICMSR.lvtTimer, UInt64(timerVector) | UInt64(LVTTimer.tscDeadlineMode))
        cpu.sti()
    }

    /// The timer tests: arm the deadline `ahead` ns from now, then wait (PAUSE) until its
    /// interrupt came, once.
    static func timerTest(_ cpu: GuestCPU, ahead: UInt64, then: (GuestCPU) -> Void = { _ in }) {
        let w = receivedWord(cpu.vcpuIndex)
        let before = cpu.read64(w)
        cpu.wrmsr(LocalAPICMSR.tscDeadline, cpu.now() &+ ahead)
        then(cpu)
        while cpu.read64(w) == before { cpu.pause() }
        cpu.guestAssert(cpu.read64(w) == before &+ 1, "the timer fired more than once")
    }

    public static let all: [BenchOperation] = [
        BenchOperation(name: "ipi", summary: "x2APIC IPI to vCPU 1, which runs (PAUSE); wait for its handler (vmexit.c ipi)",
                       helper: target(halting: false)) { cpu, _ in
            ipiRoundTrip(cpu) { $0.sendIPI(vector, to: 1) }
        },
        BenchOperation(name: "ipi_halt", summary: "x2APIC IPI to vCPU 1, which halts between IPIs: a wake-up each time",
                       helper: target(halting: true)) { cpu, _ in
            ipiRoundTrip(cpu, halting: true) { $0.sendIPI(vector, to: 1) }
        },
        BenchOperation(name: "pv_ipi", summary: "KVM_HC_SEND_IPI to vCPU 1 (halting), one hypercall for the bitmap",
                       helper: target(halting: true)) { cpu, _ in
            ipiRoundTrip(cpu, halting: true) { _ = $0.pvSendIPI(vector, bitmapLow: 1 << 1) }
        },
        BenchOperation(name: "tscdeadline_immed", summary: "WRMSR IA32_TSC_DEADLINE = now (TSC-deadline mode): the timer fires at once; then CPUID (vmexit.c)",
                       prepare: { cpu in
            timerSetUp(cpu)
            return { _ in timerTest(cpu, ahead: 0) { _ = $0.cpuid(0, 0) } }
        }),
        BenchOperation(name: "tscdeadline", summary: "WRMSR IA32_TSC_DEADLINE = now + 3000 ns, then wait (PAUSE) for the timer's interrupt (vmexit.c)",
                       prepare: { cpu in
            timerSetUp(cpu)
            return { _ in timerTest(cpu, ahead: 3000) }
        }).racingTheClock(),
    ] + selfIPITests(.xapic) + selfIPITests(.x2apic)
}

