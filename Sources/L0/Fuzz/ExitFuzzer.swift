import ABI
import Transport

/// The in-process fuzz driver: one L0 vCPU per "life" over private anonymous memory (as the
/// handler tests build one), driven by the vCPU state machine's own rule (the tier the last next
/// step resumed is the one that exits next) with exits a hostile tier could write: any exit
/// reason, fields and registers drawn from edge values, PV hypercall numbers with argument
/// pointers into L1 memory, and L1 memory itself scribbled (vmcs12, EPT12, argument pages).
/// After every case it checks what must always hold: every EPT02 entry and every PV mapping
/// points inside L1's memory. A trap is a crash of the driver itself, which is what it looks for.
public enum ExitFuzzer {
    /// The stack's own geometry (L1's memslot at a host offset that is not 0, so an L1 GPA taken
    /// for a host offset is caught), with a 1 GiB L2 address limit to keep each life's EPT02 small.
    static func config(_ path: NestingPath) -> StackConfig {
        var c = StackConfig(path: path, program: "cpuid", tierExecutable: "/nonexistent", tierBuild: "none")
        c.l2AddressLimit = 1 << 30
        return c
    }
    static let geometry = config(.single)
    static var slotSize: UInt64 { geometry.l1MemoryBytes }
    static var slotHost: HostOffset { geometry.l1HostOffset }
    static var l2Limit: UInt64 { geometry.l2AddressLimit }

    public struct Report: Sendable, Encodable {
        public var path: String
        public var seed: UInt64
        public var cases: UInt64 = 0
        public var l1Exits: UInt64 = 0
        public var l2Exits: UInt64 = 0
        public var hypercalls: UInt64 = 0
        /// Lives that ended with a stop (each followed by a fresh vCPU).
        public var stops: UInt64 = 0
        public var ept02EntriesChecked: UInt64 = 0
        public var violations: [String] = []
        public var nanos: UInt64 = 0
    }

    /// Runs `cases` exits on `path`. `progress` is called every 65,536 cases.
    public static func run(path: NestingPath, cases: UInt64, seed: UInt64,
                           progress: ((UInt64) -> Void)? = nil) throws -> Report {
        var report = Report(path: path.rawValue, seed: seed)
        var rng = FuzzRandom(seed: seed ^ UInt64(truncatingIfNeeded: path.rawValue.hashValueStable))
        let started = monotonicNanos()
        var life = try Life(path: path)
        var next = try life.begin(&rng)
        while report.cases < cases {
            report.cases += 1
            if report.cases & 0xFFFF == 0 { progress?(report.cases) }
            if rng.below(8) == 0 { life.scribbleL1Memory(&rng) }
            // The stack's loop enters woken vCPUs after each exit; here the one vCPU runs on.
            life.vcpu.shared.wakeups.removeAll(keepingCapacity: true)
            switch next {
            case .stop:
                report.stops += 1
                life = try Life(path: path)
                next = try life.begin(&rng)
                continue
            case .resume(.l1), .block(.l1):     // a halted vCPU: the fuzzer runs it on, as an interrupt would
                let isHypercall = life.writeL1Exit(&rng)
                if isHypercall { report.hypercalls += 1 }
                report.l1Exits += 1
                next = life.vcpu.handleL1Exit()
            case .resume(.l2), .enterL2, .block(.l2):
                life.writeL2Exit(&rng)
                report.l2Exits += 1
                next = life.vcpu.handleL2Exit()
            case .resume(.l0), .block(.l0):
                report.violations.append("case \(report.cases): a next step resumed L0 itself")
                next = .stop(.guestDone)
            }
            // Every case while EPT02 is small (the usual life), every 256th once it is large.
            if life.vcpu.ept02.present.count <= 256 || report.cases & 0xFF == 0 || report.cases == cases {
                let (checked, bad) = life.checkInvariants()
                report.ept02EntriesChecked += checked
                if let bad, report.violations.count < 20 { report.violations.append("case \(report.cases): \(bad)") }
            }
        }
        report.nanos = monotonicNanos() - started
        return report
    }

    /// One vCPU and its memory.
    struct Life {
        let vcpu: L0VCPU
        let host: SharedRegion

        init(path: NestingPath) throws {
            let config = ExitFuzzer.config(path)
            host = try SharedRegion(anonymous: config.hostMemoryBytes)
            var slots = L1Memslots(hostSize: host.size)
            try slots.add(config.l1Slot)
            let controlMemory = try ControlMemory.anonymous(layout: config.layout)
            L0VCPU.initialize(controlMemory)
            vcpu = L0VCPU(id: 0, path: path, control: controlMemory,
                          l1Memory: L1MemoryAccess(memslots: slots, host: HostMemory(region: host)))
            vcpu.backend.configure(config)
        }

        /// The path's start, and for three lives in four on a nested path, what a well-behaved
        /// L1 does to run L2 (so L2's exits and the reflections reach their handlers too): PV
        /// negotiate, map, create and enter; VMXON, a valid vmcs12 (EPT on, EPT12 for the first
        /// 256 KiB) or eVMCS (named in the VP assist page), VMLAUNCH.
        func begin(_ g: inout FuzzRandom) throws -> NextStep {
            var next = try vcpu.start()
            // pvm-rfc: L1 is a one-level guest; there is nothing to set up for L0.
            guard case .resume(.l1) = next, g.below(4) != 0, !vcpu.path.usesSwitcher else { return next }
            let l1 = vcpu.l1Run
            func exit(_ reason: ExitReason, operand: UInt64 = 0, _ regs: [Register: UInt64] = [:]) -> NextStep {
                for (r, v) in regs { l1[register: r] = v }
                return vcpu.handleL1Exit(L1ExitInfo(reason: reason, instructionLength: 3, vmxOperand: operand))
            }
            let mem = vcpu.l1Memory
            if vcpu.path == .pv {
                let call: (PVHypercall, UInt64, UInt64, UInt64, UInt64) -> NextStep = { c, a, b, d, e in
                    exit(.vmcall, [.rax: c.rawValue, .rbx: a, .rcx: b, .rdx: d, .rsi: e])
                }
                _ = call(.negotiate, PVABIVersion.current.packed, PVFeatures.all.rawValue, 0x8000, 0)
                _ = call(.mapGPARange, 0, 0x40_0000, 0x10_0000, PVMapFlags.rwx)
                _ = call(.createVCPU, 0x4000, 0, 0, 0)
                next = call(.enterL2, 0, 0, 0, 0)
            } else {
                try mem.store32(VMCS12Layout.revisionID, L1GPA(0x1000))
                _ = exit(.vmxon, operand: 0x1000)
                let enlightened = vcpu.path == .nvmxEVMCS
                try mem.store32(enlightened ? EnlightenedVMCS.revision : VMCS12Layout.revisionID, L1GPA(0x2000))
                if enlightened {
                    // Hyper-V style, as the real L1 does: the eVMCS named in the VP assist page
                    // at 0x3000, enabled by a write to its MSR.
                    try mem.store64(0x2000, L1GPA(0x3000) + VPAssistPage.currentNestedVMCS)
                    try mem.store32(1, L1GPA(0x3000) + VPAssistPage.enlightenVMEntry)
                    let (hi, lo) = EDXEAX.split(0x3000 | VPAssistPage.enable)
                    _ = exit(.msrWrite, [.rcx: UInt64(VPAssistPage.msr), .rdx: hi, .rax: lo])
                }
                let v = try HostMemory(region: host).vmcs(at: ExitFuzzer.slotHost + 0x2000)
                v.launched = false
                v[.cpuBasedVMExecControl] = CPUBased.activateSecondaryControls
                v[.secondaryVMExecControl] = SecondaryExec.enableEPT
                v[.eptPointer] = 0x10_0000 | EPT.memoryTypeWB | EPT.eptpWalkLength4
                v[.hostCR0] = 1 | 1 << 31
                v[.hostCR4] = 1 << 5
                v[.vmExitControls] = VMExitControl.hostAddressSpaceSize
                v[.hostRIP] = 0x20_0000
                v[.hostRSP] = 0x28_0000
                v[.vmEntryControls] = VMEntryControl.ia32eModeGuest
                v[.guestCR0] = 1 | 1 << 31
                v[.guestCR4] = 1 << 5
                v[.guestRFLAGS] = 0x2
                v[.guestRIP] = 0x1000
                v[.guestRSP] = 0x8000
                // EPT12: L2 GPA [0, 256 KiB) -> L1 0x40_0000 onwards, through tables at 1 MiB
                // (inside the scribbled range, so the walker also meets garbage there).
                let tables: [UInt64] = [0x10_0000, 0x10_1000, 0x10_2000, 0x10_3000]
                for i in 0..<3 { try mem.store64(tables[i + 1] | EPT.rwxMask, L1GPA(tables[i])) }
                for i in UInt64(0)..<64 {
                    try mem.store64((0x40_0000 + i << 12) | EPT.rwxMask | EPT.memoryTypeWB << EPT.memoryTypeShift,
                                    L1GPA(tables[3] + i * 8))
                }
                if !enlightened { _ = exit(.vmptrld, operand: 0x2000) }
                next = exit(.vmlaunch)
            }
            return next
        }

        /// A few words of garbage somewhere in L1's first 8 MiB (where L1 keeps its VMCSs, EPT12
        /// tables and argument pages), as a hostile L1 may write its own memory.
        func scribbleL1Memory(_ g: inout FuzzRandom) {
            for _ in 0..<(1 + g.below(8)) {
                let offset = (g.below(8 << 20) & ~7) + ExitFuzzer.slotHost.raw
                try? host.store(g.edge(), at: offset)
            }
        }

        /// An L1 GPA: mostly inside L1 memory (page-aligned or not), sometimes anywhere.
        static func l1Address(_ g: inout FuzzRandom) -> UInt64 {
            switch g.below(4) {
            case 0: g.edge()
            case 1: g.below(ExitFuzzer.slotSize)
            default: g.below(ExitFuzzer.slotSize >> 12) << 12
            }
        }

        static let l1Reasons: [ExitReason] = [.vmcall, .vmcall, .vmcall, .vmread, .vmwrite, .vmptrld, .vmclear, .vmlaunch,
                                              .vmresume, .vmxon, .vmxoff, .vmptrst, .invept, .invvpid, .msrRead, .msrWrite,
                                              .cpuid, .eptViolation, .hlt, .ioInstruction, .crAccess]
        static let l2Reasons: [ExitReason] = [.cpuid, .ioInstruction, .msrRead, .msrWrite, .eptViolation, .eptMisconfig,
                                              .vmcall, .hlt, .crAccess, .drAccess, .wbinvd, .rdtsc, .exceptionNMI, .invlpg,
                                              .xsetbv, .pause, .vmread, .vmlaunch, .externalInterrupt, .interruptWindow, .preemptionTimer]

        /// Garbage in every exit field and register of `page`, with `reason`.
        static func writeExit(_ page: RunPageView, reason: ExitReason, _ g: inout FuzzRandom) {
            page[RunPage.exitReason] = g.below(16) == 0 ? g.edge() : UInt64(reason.rawValue)
            for field in [RunPage.exitQualification, RunPage.guestLinearAddress, RunPage.instructionInfo,
                          RunPage.exitInterruptionInfo, RunPage.interruptibility, RunPage.eventInjection] {
                page[field] = g.below(2) == 0 ? g.below(16) : g.edge()
            }
            page[RunPage.guestPhysicalAddress] = switch g.below(4) {
            case 0, 1: g.below(1 << 20)               // where the booted lives have memory
            case 2: g.below(ExitFuzzer.l2Limit)
            default: g.edge()
            }
            page[RunPage.vmxOperand] = l1Address(&g)
            page[RunPage.instructionLength] = g.below(4) == 0 ? g.edge() : 1 + g.below(15)
            for r in Register.allCases { page[register: r] = g.below(2) == 0 ? g.below(0x1_0000) : (g.below(2) == 0 ? l1Address(&g) : g.edge()) }
        }

        /// Returns whether it wrote a PV hypercall.
        func writeL1Exit(_ g: inout FuzzRandom) -> Bool {
            let reason = g.pick(Self.l1Reasons)
            Self.writeExit(vcpu.l1Run, reason: reason, &g)
            // Half of L1's MSR accesses aim at its own x2APIC (nvmx: L0 runs L1's APICs), a
            // quarter of those at its timer (the LVT entry, a deadline of any value).
            if reason == .msrRead || reason == .msrWrite, g.below(2) == 0 {
                vcpu.l1Run[register: .rcx] = g.below(4) == 0 ? UInt64(g.pick([LocalAPICMSR.lvtTimer, LocalAPICMSR.tscDeadline]))
                    : UInt64(LocalAPICMSR.range.lowerBound) + g.below(0x100)
            }
            if vcpu.path.usesSwitcher, g.below(2) == 0 { writeForwardedUcall(&g) }
            guard reason == .vmcall, g.below(4) != 0 else { return false }
            let call = g.pick(PVHypercall.allCases)
            vcpu.l1Run[register: .rax] = call.rawValue
            vcpu.l1Run[register: .rbx] = g.below(2) == 0 ? g.below(300) : Self.l1Address(&g)
            vcpu.l1Run[register: .rcx] = g.below(2) == 0 ? Self.l1Address(&g) : g.below(300)
            vcpu.l1Run[register: .rdx] = g.below(2) == 0 ? g.below(64) << 12 : g.edge()
            vcpu.l1Run[register: .rsi] = g.below(2) == 0 ? g.below(16) : g.edge()
            return true
        }

        /// pvm-rfc: L1 passing on a ucall, with the block's L1 GPA in RDI (anywhere, often in
        /// L1's memory) and, half the time, a plausible block there.
        func writeForwardedUcall(_ g: inout FuzzRandom) {
            vcpu.l1Run.exitReason = .ioInstruction
            vcpu.l1Run[RunPage.exitQualification] = IOQualification.make(port: Ucall.port, size: 1, isIn: true)
            let block = Self.l1Address(&g)
            vcpu.l1Run[register: .rdi] = block
            guard g.below(2) == 0, block < ExitFuzzer.slotSize - 8 else { return }
            let commands: [UcallCommand] = [.sync, .sync, .report, .printf, .abort, .done]
            try? host.store(g.below(8) == 0 ? g.edge() : g.pick(commands).rawValue, at: ExitFuzzer.slotHost.raw + block)
            try? host.store(g.below(2) == 0 ? g.pick([UcallStage.measureStart, UcallStage.measureEnd]) : g.edge(),
                            at: ExitFuzzer.slotHost.raw + block + 8)
        }

        func writeL2Exit(_ g: inout FuzzRandom) {
            let reason = g.pick(Self.l2Reasons)
            Self.writeExit(vcpu.l2Run, reason: reason, &g)
            let run = vcpu.l2Run
            // Half the time, aim at the interrupt and TLB handlers: x2APIC and steal-time MSRs
            // (any value: ICRs with garbage vectors, modes and destinations; steal-time GPAs
            // anywhere), the timer (its LVT entry, any deadline, its exit), the xAPIC page, KVM_HC_SEND_IPI and the flush hypercall with garbage
            // bitmaps, RFLAGS.IF on, and the kick words scribbled.
            guard g.below(2) == 0 else { return }
            run[register: .rflags] = g.below(2) == 0 ? 0x202 : g.edge()
            switch reason {
            case .msrRead, .msrWrite:
                run[register: .rcx] = g.below(2) == 0 ? UInt64(LocalAPICMSR.range.lowerBound) + g.below(0x100)
                    : UInt64(g.pick([LocalAPICMSR.icr, LocalAPICMSR.selfIPI, LocalAPICMSR.eoi, LocalAPICMSR.lvtTimer,
                                     LocalAPICMSR.tscDeadline, KVMStealTime.msr]))
                // The value in EDX:EAX: a small GPA with the enable bit, or an edge (a GPA that
                // wraps, reserved bits).
                let value = g.below(2) == 0 ? (g.below(1 << 20) & ~0x3F) | 1 : g.edge()
                run[register: .rdx] = value >> 32
                run[register: .rax] = value & 0xFFFF_FFFF
            case .vmcall:
                run[register: .rax] = g.pick([KVMHypercall.sendIPI, L2Hypercall.flushTLB.rawValue])
            case .eptViolation:
                // The xAPIC page: any offset, size and value (RAX), and the pages around it.
                run[RunPage.guestPhysicalAddress] = XAPIC.base &- pageSize &+ g.below(3 * pageSize)
                run[RunPage.instructionInfo] = g.below(2) == 0 ? 4 : g.edge()
                run[register: .rax] = g.below(2) == 0 ? g.below(1 << 20) : g.edge()
            default: break
            }
            if g.below(4) == 0 { run[RunPage.kick] = g.edge() }
            if g.below(4) == 0 { run[RunPage.flushTLB] = g.edge() }
        }

        /// Every present EPT02 entry (and every PV mapping) inside L1's memory; the first one
        /// that is not, described.
        func checkInvariants() -> (checked: UInt64, violation: String?) {
            let low = ExitFuzzer.slotHost.raw, high = low + ExitFuzzer.slotSize
            var checked: UInt64 = 0
            for frame in vcpu.ept02.present {
                checked += 1
                let gpa = L2GPA(frame << pageShift)
                guard let h = vcpu.ept02.translate(gpa, access: 0) else { continue }
                if h.raw < low || h.raw >= high {
                    return (checked, "EPT02 maps L2 \(gpa) to host offset 0x\(String(h.raw, radix: 16)), outside L1's memory")
                }
            }
            if vcpu.path.usesSwitcher, checked > 0 {
                return (checked, "pvm-rfc: L0 built EPT02 entries for an L2 it never runs")
            }
            if let pv = vcpu.backend as? PVBackend {
                for m in pv.map.mappings {
                    let (end, overflow) = m.l1.raw.addingReportingOverflow(m.l2.length)
                    if overflow || end > ExitFuzzer.slotSize {
                        return (checked, "PV map sends L2 \(m.l2.start) to L1 \(m.l1), beyond L1's memory")
                    }
                }
            }
            return (checked, nil)
        }
    }
}

/// SplitMix64, with the edge values hostile inputs favour.
public struct FuzzRandom {
    var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func below(_ n: UInt64) -> UInt64 { n == 0 ? 0 : next() % n }
    mutating func pick<T>(_ a: [T]) -> T { a[Int(below(UInt64(a.count)))] }
    static let edges: [UInt64] = [0, 1, 2, 7, 0xFFF, 0x1000, 0x1001, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0x1_0000_0000,
                                  0x7FFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_F000, ~0]
    mutating func edge() -> UInt64 { below(2) == 0 ? pick(Self.edges) : next() }
}

extension String {
    /// A hash that is the same in every process (Swift's `hashValue` is seeded per run).
    var hashValueStable: UInt64 { utf8.reduce(0xCBF2_9CE4_8422_2325) { ($0 ^ UInt64($1)) &* 0x100_0000_01B3 } }
}
