import ABI

/// Programs for several vCPUs that check the interrupt model end to end (MultiVCPUTests): every
/// IPI taken exactly once by its target whatever the target is doing, and halted vCPUs that
/// wake each other without ever all sleeping for good.
public enum SMPPrograms {
    /// received[target][sender]: interrupts each vCPU's handler took from each sender (vector
    /// `base + sender`), one u64 each; then the words the vCPUs share.
    static let received = L2GPA(0x6000)
    static let finished = L2GPA(0x6900)
    static let allDone = L2GPA(0x6808)
    static let ringToken = L2GPA(0x6810)
    static let base: UInt8 = 0x40
    static let wakeVector: UInt8 = 0x3F

    static func slot(_ target: Int, _ sender: Int) -> L2GPA { received + UInt64(target * 16 + sender) * 8 }

    /// Every vCPU sends `rounds` IPIs to every other one, each waited for (so none coalesce),
    /// while the others send theirs: targets are running, halted (those done with their own
    /// rounds halt on even vCPUs, PAUSE on odd ones) or in the hypervisor. The last one done
    /// wakes them all with a broadcast; each syncs what it took from each sender.
    public static let ipiStorm = GuestProgram(name: "ipi-storm", summary: "every vCPU IPIs every other, waits for each; counts per sender",
                                              arguments: [.init("rounds", "IPIs from each vCPU to each other", default: "50", accepts: .range(1...100_000))],
                                              minimumVCPUs: 2) { cpu, args in
        let rounds = args.first ?? 50
        let me = cpu.vcpuIndex, n = cpu.vcpuCount
        for sender in 0..<n {
            cpu.setInterruptHandler(base + UInt8(sender)) { c, v in
                let w = slot(c.vcpuIndex, Int(v - base))
                c.write64(w, c.read64(w) &+ 1)
                c.eoi()
            }
        }
        cpu.setInterruptHandler(wakeVector) { c, _ in c.eoi() }
        cpu.sti()
        cpu.rendezvous()
        for _ in 0..<rounds {
            for target in 0..<n where target != me {
                let w = slot(target, me)
                let before = cpu.read64(w)
                cpu.sendIPI(base + UInt8(me), to: target)
                while cpu.read64(w) == before { cpu.pause() }
            }
        }
        // Done sending; keep taking the others' IPIs until everyone is. The last to finish
        // (or the last two, who may both see it) sets allDone and wakes the rest.
        cpu.write64(finished + UInt64(me) * 8, 1)
        cpu.mfence()
        if (0..<n).allSatisfy({ cpu.read64(finished + UInt64($0) * 8) == 1 }) {
            cpu.write64(allDone, 1)
            cpu.sendIPIToOthers(wakeVector)
        }
        while cpu.read64(allDone) == 0 {
            if me % 2 == 0 { cpu.hlt() } else { cpu.pause() }
        }
        cpu.sync(0x57, UInt64(me), (0..<n).reduce(0) { $0 | ($1 == me || cpu.read64(slot(me, $1)) == rounds ? 0 : 1 << UInt64($1)) },
                 (0..<n).reduce(0) { $0 + ($1 == me ? 0 : cpu.read64(slot(me, $1))) })
    }

    /// A token passed around a ring of halted vCPUs: each halts until the one before it sends
    /// the token on, `laps` times round. Every vCPU but the token's holder is halted, and at the
    /// end all are: a lost wake-up would leave nobody to run (L0 stops the stack saying so).
    public static let haltRing = GuestProgram(name: "halt-ring", summary: "a token passed by IPI round a ring of halted vCPUs",
                                              arguments: [.init("laps", "times round the ring", default: "20", accepts: .range(1...100_000))],
                                              minimumVCPUs: 2) { cpu, args in
        let laps = args.first ?? 20
        let me = cpu.vcpuIndex, n = cpu.vcpuCount
        cpu.setInterruptHandler(base) { c, _ in c.eoi() }
        cpu.sti()
        cpu.rendezvous()
        let passes = laps * UInt64(n)
        // The token is the number of passes made; vCPU (token % n) holds it.
        while true {
            let t = cpu.read64(ringToken)
            if t >= passes { break }
            if Int(t % UInt64(n)) == me {
                cpu.write64(ringToken, t + 1)
                cpu.sendIPI(base, to: (me + 1) % n)
            } else {
                cpu.hlt()
            }
        }
        // The last pass wakes the next vCPU, which sees the end and wakes its own next.
        cpu.sendIPI(base, to: (me + 1) % n)
        cpu.sync(0x58, UInt64(me), cpu.read64(ringToken))
    }

    /// A self-IPI with interrupts off, taken at the NOP after STI (an interrupt window), then
    /// more NOPs and PAUSEs with interrupts on and nothing pending: those are no exits on any
    /// path (a window request left armed would make each one an exit). Five rounds.
    public static let interruptWindowProbe = GuestProgram(name: "interrupt-window-probe", summary: "self-IPIs taken at an interrupt window, then NOPs that must not exit") { cpu, _ in
        let w = received + UInt64(cpu.vcpuIndex) * 8
        cpu.setInterruptHandler(base) { c, _ in
            c.write64(w, c.read64(w) &+ 1)
            c.eoi()
        }
        for _ in 0..<5 {
            cpu.cli()
            cpu.selfIPI(base)
            cpu.sti()
            cpu.nop()
            for _ in 0..<4 { cpu.nop(); cpu.pause() }
        }
        cpu.sync(0x5A, cpu.read64(w))
    }

    /// How `timer-probe` waits for its timer's interrupt.
    public enum TimerWait: UInt64, Sendable, CaseIterable {
        /// PAUSE: no exit; the timer's own exit ends the wait.
        case pause = 0
        /// CPUID: an exit every time, so the timer must fire between exits (its deadline looked
        /// at after each entry, and on nested VMX the time left rewritten at each VMRESUME).
        case exits = 1
        /// STI;HLT: the vCPU blocks, and the hypervisor that runs its APIC must wake it at the
        /// deadline (L0 for L2 on single and pv; on nested VMX L1, through its own timer).
        case halt = 2
        /// vCPU 1 halts as `halt` while vCPU 0 waits for it with PAUSE, never exiting: L0 must
        /// wake the halted vCPU while it waits on the running one.
        case haltBesideSpinner = 3
    }

    /// The TSC-deadline timer armed `ahead` ns ahead (default 20 ms: far beyond any
    /// hypervisor's handling of the WRMSR, so it fires at its own exit or wake-up), five times,
    /// waiting as `wait` says: each time its interrupt must come once, and not before the
    /// deadline. Each vCPU that arms syncs 0x5B, its count, and how many came early; with
    /// `haltBesideSpinner`, vCPU 0 syncs 0x5C and the count it saw vCPU 1 reach.
    public static let timerProbe = GuestProgram(
        name: "timer-probe", summary: "the TSC-deadline timer armed ahead, five times: its interrupt once each, never early",
        // At most 1 s ahead: a vCPU that waits without an exit holds its turn, and past the
        // watchdog's limit (5 s by default, `--tier-timeout`) L0 calls it hung.
        arguments: [.init("ahead", "ns from the WRMSR to the deadline", default: "20000000", accepts: .range(1...1_000_000_000)),
                    .init("wait", "0 PAUSE, 1 CPUID (an exit each time), 2 STI;HLT, 3 vCPU 1 halts while vCPU 0 spins on PAUSE",
                          default: "0", accepts: .range(0...3))]
    ) { cpu, args in
        let ahead = args.first.flatMap { $0 > 0 ? $0 : nil } ?? 20_000_000
        let wait = TimerWait(rawValue: args.count > 1 ? args[1] : 0) ?? .pause
        if wait == .haltBesideSpinner {
            guard cpu.vcpuIndex == 0 else { return timerRounds(cpu, ahead: ahead, wait: .halt) }
            let other = InterruptOperations.receivedWord(1)
            while cpu.read64(other) < 5 { cpu.pause() }
            cpu.sync(0x5C, cpu.read64(other))
            return
        }
        timerRounds(cpu, ahead: ahead, wait: wait)
    }

    /// `timer-probe`'s five rounds on one vCPU: vmexit.c's timer set-up, its handler also
    /// counting the interrupts that came before the deadline.
    static func timerRounds(_ cpu: GuestCPU, ahead: UInt64, wait: TimerWait) {
        let w = InterruptOperations.receivedWord(cpu.vcpuIndex)
        let early = received + 0x100 + UInt64(cpu.vcpuIndex) * 8
        let deadlineWord = received + 0x200 + UInt64(cpu.vcpuIndex) * 8
        InterruptOperations.timerSetUp(cpu) { c in
            if c.now() < c.read64(deadlineWord) { c.write64(early, c.read64(early) &+ 1) }
        }
        for round in UInt64(1)...5 {
            let deadline = cpu.now() &+ ahead
            cpu.write64(deadlineWord, deadline)
            cpu.wrmsr(LocalAPICMSR.tscDeadline, deadline)
            while cpu.read64(w) < round {
                switch wait {
                case .pause, .haltBesideSpinner: cpu.pause()
                case .exits: _ = cpu.cpuid(0, 0)
                case .halt: cpu.hlt()
                }
            }
        }
        cpu.sync(0x5B, cpu.read64(w), cpu.read64(early))
    }

    /// Every vCPU halts with interrupts on and nobody sends anything: L0 must say so and stop.
    public static let haltAll = GuestProgram(name: "halt-all", summary: "every vCPU halts with nobody to wake it (L0 stops the stack)") { cpu, _ in
        cpu.sti()
        cpu.hlt()
        cpu.guestAssert(false, "woken with nobody to wake it")
    }
}
