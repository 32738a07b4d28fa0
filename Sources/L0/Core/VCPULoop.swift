import ABI
import Transport

extension RunPageView {
    /// The exit-information fields the tier that exited left here, in that tier's address space.
    func exitInfo<A: AddressSpaceValue>(_: A.Type) -> ExitInfo<A> {
        ExitInfo(reason: exitReason, qualification: self[RunPage.exitQualification],
                 guestPhysicalAddress: A(self[RunPage.guestPhysicalAddress]),
                 guestLinearAddress: self[RunPage.guestLinearAddress],
                 instructionLength: self[RunPage.instructionLength], instructionInfo: self[RunPage.instructionInfo],
                 vmxOperand: self[RunPage.vmxOperand], interruptionInfo: self[RunPage.exitInterruptionInfo],
                 interruptionErrorCode: self[RunPage.exitInterruptionErrorCode])
    }

    /// Writes exit information as L0 reports it to L1 (a PV exit page).
    func write<A: AddressSpaceValue>(_ info: ExitInfo<A>) {
        exitReason = info.reason
        self[RunPage.exitQualification] = info.qualification
        self[RunPage.guestPhysicalAddress] = info.guestPhysicalAddress.raw
        self[RunPage.guestLinearAddress] = info.guestLinearAddress
        self[RunPage.instructionLength] = info.instructionLength
        self[RunPage.instructionInfo] = info.instructionInfo
        self[RunPage.vmxOperand] = info.vmxOperand
        self[RunPage.exitInterruptionInfo] = info.interruptionInfo
        self[RunPage.exitInterruptionErrorCode] = info.interruptionErrorCode
    }
}

// MARK: decoding, once per exit

extension L2Exit {
    /// Decodes an exit from its information fields and the registers it left. A reason with
    /// flag bits set (a failed entry, say) is no instruction's: `.other`, handled by its reason.
    public init(info: L2ExitInfo, registers r: RegisterFile) {
        self.info = info
        switch info.reason.rawValue == info.reason.basic.rawValue ? info.reason : ExitReason(rawValue: UInt32.max) {
        case .cpuid: kind = .cpuid(leaf: UInt32(truncatingIfNeeded: r[.rax]), subleaf: UInt32(truncatingIfNeeded: r[.rcx]))
        case .msrRead: kind = .msrRead(UInt32(truncatingIfNeeded: r[.rcx]))
        case .msrWrite: kind = .msrWrite(UInt32(truncatingIfNeeded: r[.rcx]), value: r.edxEax)
        case .ioInstruction:
            let q = info.qualification
            let size = UInt64(IOQualification.size(q)), isIn = IOQualification.isIn(q)
            kind = .io(PortIO(port: IOQualification.port(q), size: size, isIn: isIn, value: isIn ? 0 : r[.rax] & AccessSize.mask(size)))
        case .eptViolation:
            kind = .eptViolation(info.guestPhysicalAddress, access: info.qualification & EPT.rwxMask, size: info.instructionInfo)
        case .vmcall: kind = .vmcall(nr: r[.rax])
        case .hlt: kind = .hlt
        default: kind = .other
        }
    }
}

extension L1Exit {
    /// Decodes an L1 exit from its information fields and L1's registers (flagged reasons: `.other`).
    public init(info: L1ExitInfo, registers r: RegisterFile) {
        self.info = info
        func fieldOperands() -> VMCSFieldOperands? {
            guard let f = VMXInstructionInfo.fieldRegister(info.instructionInfo),
                  let v = VMXInstructionInfo.valueRegister(info.instructionInfo) else { return nil }
            return VMCSFieldOperands(field: r[f], valueRegister: v)
        }
        let operand = L1GPA(info.vmxOperand)
        switch info.reason.rawValue == info.reason.basic.rawValue ? info.reason : ExitReason(rawValue: UInt32.max) {
        case .vmcall: kind = .hypercall(nr: r[.rax], args: HypercallArguments(r[.rbx], r[.rcx], r[.rdx], r[.rsi]))
        case .msrRead: kind = .msrRead(UInt32(truncatingIfNeeded: r[.rcx]))
        case .msrWrite: kind = .msrWrite(UInt32(truncatingIfNeeded: r[.rcx]), value: r.edxEax)
        case .eptViolation: kind = .protectedStore(info.guestPhysicalAddress, size: info.instructionInfo, value: r[.rax])
        case .vmxon: kind = .vmx(.vmxon(operand))
        case .vmxoff: kind = .vmx(.vmxoff)
        case .vmclear: kind = .vmx(.vmclear(operand))
        case .vmptrld: kind = .vmx(.vmptrld(operand))
        case .vmptrst: kind = .vmx(.vmptrst)
        case .vmread: kind = .vmx(.vmread(fieldOperands()))
        case .vmwrite:
            let ops = fieldOperands()
            kind = .vmx(.vmwrite(ops, value: ops.map { r[$0.valueRegister] } ?? 0))
        case .invept:
            let typeRegister = VMXInstructionInfo.typeRegister(info.instructionInfo) ?? .rax
            kind = .vmx(.invept(type: r[typeRegister], eptp: info.vmxOperand))
        case .vmlaunch: kind = .vmx(.vmlaunch)
        case .vmresume: kind = .vmx(.vmresume)
        default: kind = .other
        }
    }
}

// MARK: one exit: count, decode, hand to the backend, store the registers back

extension L0VCPU {
    /// Every L2 exit lands here first, as on hardware: read once from the run page (`info`, which
    /// the caller read), counted, decoded once, handed to the backend with L2's registers,
    /// which go back to the run page after.
    func handle(l2 info: L2ExitInfo) -> NextStep {
        counters.countL2Exit(info.reason)
        guard info.reason.isArchitectural else { return .stop(.fatal(.impossibleExit(.l2, info.reason))) }
        var regs = l2Run.registers
        let next = backend.handleL2Exit(L2Exit(info: info, registers: regs), &regs, self)
        l2Run.registers = regs
        return next
    }

    /// Every L1 exit: counted, decoded once, handed to the backend with L1's registers.
    func handle(l1 info: L1ExitInfo) -> NextStep {
        counters.countL1Exit(info.reason)
        guard info.reason.isArchitectural else { return .stop(.fatal(.impossibleExit(.l1, info.reason))) }
        var regs = l1Run.registers
        let next = backend.handleL1Exit(L1Exit(info: info, registers: regs), &regs, self)
        l1Run.registers = regs
        return next
    }

    /// The exit L2's run page holds, handled.
    public func handleL2Exit() -> NextStep { handle(l2: l2Run.exitInfo(L2GPA.self)) }
    /// The exit L1's run page holds, handled.
    public func handleL1Exit() -> NextStep { handle(l1: l1Run.exitInfo(L1GPA.self)) }

    /// An L2 exit given as a value (in-process drivers and tests): written into L2's run page
    /// as L2's CPU would, then handled like any other.
    public func handleL2Exit(_ info: L2ExitInfo) -> NextStep {
        l2Run.write(info)
        return handleL2Exit()
    }

    /// An L1 exit given as a value, as above.
    public func handleL1Exit(_ info: L1ExitInfo) -> NextStep {
        l1Run.write(info)
        return handleL1Exit()
    }

    /// The path's first step (setup included), with L2's registers as the backend leaves them.
    func start() throws -> NextStep {
        var regs = l2Run.registers
        let next = try backend.start(self, l2: &regs)
        l2Run.registers = regs
        return next
    }
}

/// The vCPU state machines. Every arrow goes through L0: it waits for its turn on any vCPU,
/// decodes the exit of the tier that ran, asks that vCPU's backend for the next step, counts the
/// entry and passes the turn. One branch per next step; none per path. With several vCPUs L0 is
/// still one thread: it runs one state machine per vCPU and takes whichever lane hands it the
/// turn (`LaneSet`), as one physical CPU would serve vCPUs that exit in turn.
extension L0Stack {
    enum State {
        case running(Tier)
        /// Halted in L0 until an interrupt wakes it (then `Tier` runs).
        case halted(Tier)
        /// The vCPU's guest said done; the stack ends when every vCPU has.
        case finished
    }

    public func run() throws -> StackResult {
        let started = monotonicNanos()
        var log: TransitionLog? = config.recordTransitions ? TransitionLog() : nil
        TierProcess.setName(.l0)
        config.placement.apply(as: .l0)
        let policy = config.placement.l0WaitPolicy(on: config.path)
        defer { shutdown() }

        l1 = vcpu.backend.runsL1 ? try launch(.l1) : nil
        timeLimitAt = started &+ config.timeoutNanos
        let alive = { [unowned self] in
            let now = monotonicNanos()
            return self.externalStop(now: now) == nil && !self.turnHeldTooLong(now: now)
        }

        var states = [State](repeating: .finished, count: vcpus.count)
        /// How many of `states` are `.halted` (so the loop looks at timers only when one is).
        var haltedCount = 0
        /// A halted vCPU's APIC timer will wake it (the tier whose APIC L0 runs is the one that
        /// halts in L0); a masked one, or one with an illegal vector, will not.
        func timerArmed(_ j: Int) -> Bool { vcpu.shared.apics?.timerWillInterrupt(j) ?? false }
        vcpu.shared.inGuestMode = [Bool](repeating: false, count: vcpus.count)
        var stopping: StopReason?
        /// The exit L0 handled last (what the watchdog says a hung tier was doing).
        var lastExit: (Tier, ExitReason)?
        /// L1 created an L2 vCPU (PV create-vCPU, the first VMLAUNCH; on one level, from the
        /// start): L2's process starts now, before L1 or L2 runs again.
        func startL2IfCreated(_ v: L0VCPU, _ next: NextStep) -> NextStep {
            guard l2 == nil, v.backend.hasL2VCPU else { return next }
            do { l2 = try launch(.l2) } catch { return .stop(.fatal(.cannotStartL2("\(error)"))) }
            return next
        }
        /// Nothing runs any more: every vCPU finished (done), or those left are halted for good
        /// (none with a timer that will wake it).
        func checkAllStopped() {
            var halted = 0
            for (j, s) in states.enumerated() {
                switch s {
                case .running: return
                case .halted:
                    if timerArmed(j) { return }
                    halted += 1
                case .finished: break
                }
            }
            if !vcpu.shared.wakeups.isEmpty { return }
            stopping = halted == 0 ? .guestDone : .fatal(.allVCPUsHalted(halted))
        }
        func enter(_ i: Int, _ next: NextStep) {
            let v = vcpus[i]
            switch next {
            case .resume(.l1):
                v.counters.l1Entries += 1
                if v.shared.apics != nil { v.prepareL1Entry() }
                l1Lanes[i].pass(to: .l1)
                states[i] = .running(.l1)
            case .resume, .enterL2:
                v.counters.l2Entries += 1
                if v.shared.apics != nil || !v.shared.stealTime.isEmpty { v.prepareL2Entry() }
                v.shared.inGuestMode[i] = true
                l2Lanes[i].pass(to: .l2)
                states[i] = .running(.l2)
            case .block(let tier):
                states[i] = .halted(tier)
                haltedCount += 1
                checkAllStopped()
            case .stop(.guestDone):
                states[i] = .finished
                checkAllStopped()
            case .stop(let r):
                stopping = r
            }
        }
        /// Enters the halted vCPUs an interrupt woke while L0 handled an exit.
        func enterWoken() {
            while let j = vcpu.shared.wakeups.popLast() {
                if case .halted(let t) = states[j] {
                    haltedCount -= 1
                    enter(j, .resume(t))
                }
            }
        }
        /// The halted vCPUs' APIC timers (of the tier whose APICs L0 runs, which is the tier
        /// that halted in L0): those due fire and wake their vCPU (KVM's hrtimer for a blocked
        /// vCPU, kvm_lapic_switch_to_sw_timer); the earliest still armed, or `.max`.
        func fireHaltedTimers() -> UInt64 {
            var earliest = UInt64.max
            var now: UInt64 = 0
            for (j, s) in states.enumerated() {
                guard case .halted = s, let d = vcpu.shared.apics?.tscDeadline(j), d != 0 else { continue }
                if now == 0 { now = monotonicNanos() }
                if now >= d { vcpus[j].fireTimerIfDue(now: now) } else { earliest = min(earliest, d) }
            }
            if !vcpu.shared.wakeups.isEmpty { enterWoken() }
            return earliest
        }
        /// Nothing runs and a halted vCPU's timer is armed: L0 sleeps until it (in slices, still
        /// answering a stop request, a dead child or the stack's time limit); nil when it came.
        func idle(until wakeAt: UInt64) -> StopReason? {
            while true {
                let now = monotonicNanos()
                if now >= wakeAt { return nil }
                if let stop = externalStop(now: now) { return stop }
                sleepNanos(min(wakeAt - now, Self.idleSliceNanos))
            }
        }
        for i in vcpus.indices {
            let first = startL2IfCreated(vcpus[i], try vcpus[i].start())
            if i == 0 { log?.started(at: monotonicNanos()) }
            enter(i, first)
            enterWoken()
            if stopping != nil { break }
        }

        /// The running vCPUs and their lanes, gathered before each wait (in place: no allocation
        /// per hop). With one vCPU there is one lane and the wait is `Handoff.wait`, as it always was.
        var running: [(Int, Tier)] = []
        var runningLanes: [Handoff] = []
        running.reserveCapacity(vcpus.count)
        runningLanes.reserveCapacity(vcpus.count)
        var next = 0
        while stopping == nil {
            // A halted vCPU's timer: fired if due; otherwise the wait below ends at it.
            let wakeAt = haltedCount > 0 ? fireHaltedTimers() : .max
            if stopping != nil { break }
            let (i, tier): (Int, Tier)
            if vcpus.count == 1 {
                guard case .running(let t) = states[0] else {
                    if wakeAt != .max { stopping = idle(until: wakeAt); continue }
                    checkAllStopped()
                    if stopping == nil && haltedCount > 0 { stopping = .fatal(.allVCPUsHalted(haltedCount)) }
                    break
                }
                (i, tier) = (0, t)
                switch waitForTurn(policy, alive, vcpu: 0, running: t, until: wakeAt, after: lastExit) {
                case .turn: break
                case .timerDue: continue
                case .stop(let stop):
                    stopping = stop
                    continue
                }
            } else {
                running.removeAll(keepingCapacity: true)
                runningLanes.removeAll(keepingCapacity: true)
                for k in states.indices {
                    if case .running(let t) = states[k] {
                        running.append((k, t))
                        runningLanes.append(lane(k, t))
                    }
                }
                // Nothing runs and nothing was woken (`checkAllStopped` should have said so):
                // stop rather than wait on no lane at all.
                guard !running.isEmpty else {
                    if wakeAt != .max { stopping = idle(until: wakeAt); continue }
                    stopping = .fatal(.allVCPUsHalted(haltedCount))
                    continue
                }
                let (k, waited) = waitForAnyTurn(policy, alive, runningLanes, from: next, until: wakeAt, after: lastExit) { running[$0].1 }
                switch waited {
                case .turn: break
                case .timerDue: continue
                case .stop(let stop):
                    stopping = stop
                    continue
                }
                (i, tier) = running[k]
                next = k + 1
            }
            let v = vcpus[i]
            if tier == .l2 {
                v.shared.inGuestMode[i] = false
                if !v.shared.flushWaits.isEmpty { v.leftGuestMode(i) }
            }
            let received = log == nil ? 0 : monotonicNanos()
            // The exit is read from the run page once: what is logged, named by the watchdog
            // and handled is the same exit, whatever the tier writes there meanwhile.
            let l1Info = tier == .l1 ? v.l1Run.exitInfo(L1GPA.self) : nil
            let l2Info = tier == .l2 ? v.l2Run.exitInfo(L2GPA.self) : nil
            let reason = l1Info?.reason ?? l2Info?.reason ?? ExitReason(rawValue: UInt32.max)
            lastExit = (tier, reason)
            log?.guestExited(tier, reason: reason, at: received)
            let step: NextStep = if let l1Info { v.handle(l1: l1Info) }
                else if let l2Info { v.handle(l2: l2Info) }
                else { .stop(.fatal(.impossibleExit(tier, reason))) }
            enter(i, startL2IfCreated(v, step))
            if !v.shared.wakeups.isEmpty { enterWoken() }
            log?.l0Handed(from: tier, reason: reason, received: received, at: monotonicNanos())
        }

        shutdown()
        var pids: [Tier: Int32] = [:]
        for c in [l1, l2].compactMap({ $0 }) { pids[c.tier] = c.pid }
        var result = StackResult(stop: stopping ?? .guestDone, counters: vcpu.counters, harness: vcpu.harness,
                                 l1Status: l1?.status, l2Status: l2?.status, tierPIDs: pids,
                                 pvRefusal: vcpu.backend.refusal, log: log,
                                 wallNanos: monotonicNanos() - started)
        result.perVCPU = vcpus.map { VCPUOutcome(counters: $0.counters, harness: $0.harness) }
        return result
    }

    /// Handoffs between liveness checks while L0 is busy. A tier that dies while the others
    /// ping-pong without it (L1 during a PV CPUID loop) is noticed within this many exits; a
    /// sleeping L0 checks on every futex timeout anyway. One check is two waitpid(WNOHANG).
    static let livenessCheckInterval: UInt64 = 1024

    /// The watchdog (`TurnWatchdog`), fed the entry count L0 keeps anyway and the progress the
    /// path made where L0 does not see it (`NestingBackend.progressOutsideL0`).
    func turnHeldTooLong(now: UInt64) -> Bool {
        var entries: UInt64 = 0
        for v in vcpus { entries &+= v.counters.l1Entries &+ v.counters.l2Entries &+ v.backend.progressOutsideL0 }
        return watchdog.expired(entries: entries, now: now)
    }

    /// nil when it is L0's turn; otherwise why the stack must stop.
    @inline(__always)
    func waitForTurn(_ policy: WaitPolicy, _ alive: () -> Bool, vcpu i: Int, running tier: Tier, until: UInt64,
                     after lastExit: (Tier, ExitReason)?) -> TurnWait {
        if let stop = periodicCheck() { return .stop(stop) }
        return turnWait(lane(i, tier).wait(for: .l0, policy: policy, until: until, isPeerAlive: alive), tier, after: lastExit)
    }

    /// How long L0 sleeps at a time while every vCPU is halted on a timer.
    static let idleSliceNanos: UInt64 = 10_000_000
    /// How L0's wait for a turn ended.
    enum TurnWait {
        /// A lane handed L0 the turn.
        case turn
        /// A halted vCPU's timer came first: the loop fires it and waits again.
        case timerDue
        case stop(StopReason)
    }

    /// The same over several running vCPUs: the index in `running` of the one whose turn came,
    /// or why the stack must stop.
    func waitForAnyTurn(_ policy: WaitPolicy, _ alive: () -> Bool, _ lanes: [Handoff], from start: Int, until: UInt64,
                        after lastExit: (Tier, ExitReason)?, tier: (Int) -> Tier) -> (Int, TurnWait) {
        if let stop = periodicCheck() { return (0, .stop(stop)) }
        let (outcome, k) = LaneSet.wait(for: .l0, on: lanes, from: start % lanes.count, policy: policy, until: until, isPeerAlive: alive)
        return (k, turnWait(outcome, tier(k), after: lastExit))
    }

    /// Every `livenessCheckInterval` handoffs: a stop request, or a child that died.
    @inline(__always)
    func periodicCheck() -> StopReason? {
        handoffsSinceCheck &+= 1
        if handoffsSinceCheck >= Self.livenessCheckInterval {
            handoffsSinceCheck = 0
            // The time limit too: it holds even while L0 never has to wait (tiers exiting non-stop).
            return externalStop(now: monotonicNanos())
        }
        return nil
    }

    /// What ends the stack whatever L0 is waiting for: a stop request (first: a child that dies
    /// of the same ^C is part of it, not the cause), a child that died, the stack's time limit.
    func externalStop(now: UInt64) -> StopReason? {
        if let s = StopSignals.received { return .interrupted(signal: s) }
        if let (t, s) = deadTier() { return .tierDied(t, s) }
        if now >= timeLimitAt { return .fatal(.timeLimit(seconds: config.timeoutNanos / 1_000_000_000)) }
        return nil
    }

    /// What a wait's outcome means for the stack: L0's turn, a halted vCPU's timer, or why the
    /// stack must stop (a tier that hung is named, with what L0 last handled).
    func turnWait(_ outcome: WaitOutcome, _ tier: Tier, after lastExit: (Tier, ExitReason)?) -> TurnWait {
        switch outcome {
        case .myTurn: return .turn
        case .timedOut: return .timerDue
        case .stop: return .stop(.fatal(.stopFromGuest))
        case .peerGone:
            // A stop request first: a child that dies of the same ^C is part of it, not the cause.
            if let s = StopSignals.received { return .stop(.interrupted(signal: s)) }
            if let (t, s) = deadTier() { return .stop(.tierDied(t, s)) }
            if turnHeldTooLong(now: monotonicNanos()) {
                let doing = lastExit.map { "after L0 handled \($0.0)'s \($0.1.name) exit" } ?? "since the stack started"
                return .stop(.fatal(.tierTimeout(vcpu.backend.holder(of: tier), seconds: Double(config.tierTimeoutNanos) / 1e9, doing: doing)))
            }
            return .stop(.fatal(.timeLimit(seconds: config.timeoutNanos / 1_000_000_000)))
        }
    }
}
