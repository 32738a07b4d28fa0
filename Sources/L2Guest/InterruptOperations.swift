import ABI

/// The interrupt tests of kvm-unit-tests' x86/vmexit.c, on the local APIC model: an IPI to a
/// running vCPU and to a halted one, KVM's PV IPI hypercall, and x2APIC self-IPIs taken at STI
/// and at HLT. The IPI tests run on two vCPUs: vCPU 0 sends and measures; vCPU 1 takes the
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

    /// The handler every test installs: count, then EOI.
    static func installHandler(_ cpu: GuestCPU) {
        cpu.setInterruptHandler(vector) { c, _ in
            let w = receivedWord(c.vcpuIndex)
            c.write64(w, c.read64(w) &+ 1)
            c.eoi()
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

    /// A self-IPI with interrupts off, taken at the STI (or the HLT) that follows.
    static func selfIPI(_ cpu: GuestCPU, halt: Bool) {
        let w = receivedWord(cpu.vcpuIndex)
        let before = cpu.read64(w)
        cpu.cli()
        cpu.selfIPI(vector)
        cpu.sti()
        if halt { cpu.hlt() } else { cpu.nop() }
        cpu.guestAssert(cpu.read64(w) == before &+ 1, "the self-IPI was not taken")
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
        BenchOperation(name: "x2apic_self_ipi_sti_nop", summary: "self-IPI with interrupts off, taken at STI (vmexit.c)", prepare: { cpu in
            installHandler(cpu)
            return { _ in selfIPI(cpu, halt: false) }
        }),
        BenchOperation(name: "x2apic_self_ipi_sti_hlt", summary: "self-IPI with interrupts off, then STI; HLT: the HLT ends at once (vmexit.c)", prepare: { cpu in
            installHandler(cpu)
            return { _ in selfIPI(cpu, halt: true) }
        }),
    ]
}
