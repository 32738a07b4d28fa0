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

extension L0VCPU {
    /// Every L2 exit lands here first, as on hardware: counted, decoded once, handed to the
    /// backend with L2's registers, which go back to the run page after.
    public func handleL2Exit() -> NextStep {
        let info = l2Run.exitInfo(L2GPA.self)
        counters.countL2Exit(info.reason)
        var regs = l2Run.registers
        let next = backend.handleL2Exit(L2Exit(info: info, registers: regs), &regs, self)
        l2Run.registers = regs
        return next
    }

    /// Every L1 exit: counted, decoded once, handed to the backend with L1's registers.
    public func handleL1Exit() -> NextStep {
        let info = l1Run.exitInfo(L1GPA.self)
        counters.countL1Exit(info.reason)
        var regs = l1Run.registers
        let next = backend.handleL1Exit(L1Exit(info: info, registers: regs), &regs, self)
        l1Run.registers = regs
        return next
    }

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

/// The vCPU state machine. Every arrow goes through L0: it waits for its turn, decodes the exit
/// of the tier that ran, asks the backend for the next step, counts the entry and passes the
/// turn. One branch per next step; none per path.
extension L0Stack {
    enum State { case running(Tier), stopping(StopReason) }

    public func run() throws -> StackResult {
        let started = monotonicNanos()
        var log: TransitionLog? = config.recordTransitions ? TransitionLog() : nil
        TierProcess.setName(.l0)
        config.placement.apply(as: .l0)
        let policy = config.placement.waitPolicy(for: .l0)
        defer { shutdown() }

        l1 = vcpu.backend.runsL1 ? try launch(.l1) : nil
        let deadline = started + config.timeoutNanos
        let alive = { [unowned self] in self.deadTier() == nil && monotonicNanos() < deadline }

        var state = State.stopping(.guestDone)
        func enter(_ next: NextStep) {
            switch next {
            case .resume(let tier):
                if tier == .l1 { vcpu.counters.l1Entries += 1 } else { vcpu.counters.l2Entries += 1 }
                handoff.pass(to: tier)
                state = .running(tier)
            case .enterL2:
                if l2 == nil {
                    do { l2 = try launch(.l2) } catch { state = .stopping(.fatal(.cannotStartL2("\(error)"))); return }
                }
                vcpu.counters.l2Entries += 1
                handoff.pass(to: .l2)
                state = .running(.l2)
            case .stop(let r):
                state = .stopping(r)
            }
        }
        let first = try vcpu.start()
        log?.started(at: monotonicNanos())
        enter(first)

        while true {
            switch state {
            case .running(let tier):
                if let stop = waitForTurn(policy, alive) { state = .stopping(stop); continue }
                let received = log == nil ? 0 : monotonicNanos()
                let reason = (tier == .l1 ? vcpu.l1Run : vcpu.l2Run).exitReason
                log?.guestExited(tier, reason: reason, at: received)
                let next = tier == .l1 ? vcpu.handleL1Exit() : vcpu.handleL2Exit()
                log?.l0Handed(from: tier, reason: reason, received: received, at: monotonicNanos())
                enter(next)
            case .stopping(let reason):
                shutdown()
                var pids: [Tier: Int32] = [:]
                for c in [l1, l2].compactMap({ $0 }) { pids[c.tier] = c.pid }
                return StackResult(stop: reason, counters: vcpu.counters, harness: vcpu.harness,
                                   l1Status: l1?.status, l2Status: l2?.status, tierPIDs: pids,
                                   pvRefusal: (vcpu.backend as? PVBackend)?.refusal, log: log,
                                   wallNanos: monotonicNanos() - started)
            }
        }
    }
}
