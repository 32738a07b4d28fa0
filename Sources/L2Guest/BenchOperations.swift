import ABI

/// The benchmark table, in the shape of kvm-unit-tests' x86/vmexit.c: a name and one small
/// operation; the name is vmexit.c's where the meaning matches. `i` is the iteration number.
public struct BenchOperation: Sendable {
    public let name: String
    public let summary: String
    /// What the operation needs from the runner, as data (nil: it can repeat forever).
    public let needs: Needs?
    /// Sets the operation up on the guest CPU (outside the measurement: page tables, handlers,
    /// user mode) and returns the operation, called once per iteration with its number.
    public let prepare: @Sendable (GuestCPU) -> (UInt64) -> Void

    /// What the vCPUs past vCPU 0 do while it measures (the target of an IPI), if the test
    /// needs any: nil for a one-vCPU operation.
    public let helper: Helper?
    /// What of the machine model it uses, which a path may not have.
    public private(set) var requires: Requirements = []
    /// What it counts depends on how long its hypervisors took, not only on what it did: a
    /// timer armed a few microseconds ahead fires at its own exit, or already at the arming if
    /// the hypervisor got there late (as on real nested hardware). Checked by property
    /// (MultiVCPUTests), not against the golden table.
    public private(set) var countsDependOnTime = false

    /// The same operation, its counts depending on time.
    func racingTheClock() -> BenchOperation {
        var op = self
        op.countsDependOnTime = true
        return op
    }

    public struct Requirements: OptionSet, Sendable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        /// L2's own page tables (one L2 kernel's page pool, built by one vCPU).
        public static let l2Paging = Requirements(rawValue: 1 << 0)
        /// A local APIC for L2 (interrupts).
        public static let localAPIC = Requirements(rawValue: 1 << 1)
        /// KVM's steal-time area for L2 (a halted target seen as preempted).
        public static let stealTime = Requirements(rawValue: 1 << 2)
        /// L2's flush hypercall answered by L0.
        public static let l0TLBFlush = Requirements(rawValue: 1 << 3)
    }

    /// The same operation, needing `r` too.
    func requiring(_ r: Requirements) -> BenchOperation {
        var op = self
        op.requires.formUnion(r)
        return op
    }

    public init(name: String, summary: String, needs: Needs? = nil, helper: Helper? = nil,
                body: @escaping @Sendable (GuestCPU, UInt64) -> Void) {
        self.init(name: name, summary: summary, needs: needs, helper: helper, prepare: { cpu in { i in body(cpu, i) } })
    }

    public init(name: String, summary: String, needs: Needs? = nil, helper: Helper? = nil,
                prepare: @escaping @Sendable (GuestCPU) -> (UInt64) -> Void) {
        self.name = name
        self.summary = summary
        self.needs = needs
        self.helper = helper
        self.prepare = prepare
    }

    /// vCPUs 1..<vcpus of a test whose operation involves them: `setUp` before vCPU 0's
    /// warm-up, then `body` (one wait: a HLT, a PAUSE) over and over until vCPU 0 sets the stop
    /// word; `stop` runs on vCPU 0 after that, to make the helpers see it (a wake-up IPI).
    public struct Helper: Sendable {
        public var vcpus: Int
        public var setUp: @Sendable (GuestCPU) -> Void
        public var body: @Sendable (GuestCPU) -> Void
        public var stop: @Sendable (GuestCPU) -> Void
        /// L2 words the vCPUs share: vCPU 0 measuring (the helpers open their windows), and done.
        static let measuringWord = L2GPA(0x3800)
        static let stopWord = L2GPA(0x3808)
    }

    /// The vCPUs a run of this operation takes (at least).
    public var vcpus: Int { helper?.vcpus ?? 1 }

    /// Every iteration is new work on a page L2 never touched: the run takes at most `pages`
    /// iterations and no warm-up, and what one costs depends on how L1 maps L2's memory.
    public struct Needs: Sendable, Equatable {
        public var freshPages: UInt64
    }

    /// At most this many iterations (and no warm-up) when every iteration must be new work.
    public var iterationLimit: UInt64? { needs?.freshPages }
    /// The runner measures it under every L2 map mode on the nested paths.
    public var dependsOnMapMode: Bool { needs != nil }
    /// Whether every vCPU of a VM with several can run it at once: not the tests that need
    /// fresh pages (the vCPUs would share them), split roles (a helper), or L2's paging.
    public var runsOnSeveralVCPUs: Bool { needs == nil && helper == nil && !requires.contains(.l2Paging) }
    /// Whether `path` (with these PV features) has what this operation needs.
    /// The steal-time area is L0's (single; pv with `directAPIC`): the nested-VMX L1 offers none.
    /// L0 answers L2's flush hypercall on single, on pv with `directTLBFlush`, and on nvmx-evmcs
    /// (Hyper-V's L2 TLB flush).
    public func runs(on path: NestingPath, pvFeatures: PVFeatures) -> Bool {
        (!requires.contains(.localAPIC) || path.hasLocalAPIC(pvFeatures: pvFeatures))
            && (!requires.contains(.l0TLBFlush) || path == .single || path == .nvmxEVMCS || (path == .pv && pvFeatures.contains(.directTLBFlush)))
            && (!requires.contains(.stealTime) || path == .single || (path == .pv && pvFeatures.contains(.directAPIC)))
    }
}

public enum BenchOperations {
    /// Fresh pages for ept_first_touch: L2 RAM from 16 MiB up (below is the programs' own).
    static let firstTouchBase: UInt64 = 16 << 20
    static let firstTouchPages: UInt64 = (128 << 20) / pageSize - firstTouchBase / pageSize

    public static let all: [BenchOperation] = [
        BenchOperation(name: "cpuid", summary: "CPUID leaf 0 (vmexit.c cpuid)") { cpu, _ in
            _ = cpu.cpuid(0, 0)
        },
        BenchOperation(name: "vmcall", summary: "VMCALL with a number L1 does not implement (vmexit.c vmcall)") { cpu, _ in
            _ = cpu.vmcall(0x1234)
        },
        BenchOperation(name: "hlt", summary: "HLT; L1 resumes it at once, as if an interrupt were pending") { cpu, _ in
            cpu.hlt()
        },
        BenchOperation(name: "mmio", summary: "32-bit read of a device in L1's device model at 0xFEB00000") { cpu, _ in
            _ = cpu.read32(L2GPA(0xFEB0_0000))
        },
        BenchOperation(name: "rd_tsc_adjust_msr", summary: "RDMSR IA32_TSC_ADJUST: L0 emulates it on pv, L1 on nvmx") { cpu, _ in
            _ = cpu.rdmsr(0x3B)
        },
        BenchOperation(name: "wr_tsc_adjust_msr", summary: "WRMSR IA32_TSC_ADJUST") { cpu, i in
            cpu.wrmsr(0x3B, i)
        },
        BenchOperation(name: "rd_misc_enable_msr", summary: "RDMSR IA32_MISC_ENABLE: L1 handles it on every path") { cpu, _ in
            _ = cpu.rdmsr(0x1A0)
        },
        BenchOperation(name: "wr_misc_enable_msr", summary: "WRMSR IA32_MISC_ENABLE") { cpu, i in
            cpu.wrmsr(0x1A0, i)
        },
        BenchOperation(name: "rd_kernel_gs_base", summary: "RDMSR KERNEL_GS_BASE: passed through to L2 when L0 and L1 allow it") { cpu, _ in
            _ = cpu.rdmsr(0xC000_0102)
        },
        BenchOperation(name: "wr_kernel_gs_base", summary: "WRMSR KERNEL_GS_BASE") { cpu, i in
            cpu.wrmsr(0xC000_0102, 0xFFFF_8880_0000_0000 | i << 12)
        },
        BenchOperation(name: "inl_from_kernel", summary: "IN from port 0x4d0, an L0 device") { cpu, _ in
            _ = cpu.inPort(0x4D0, size: 4)
        },
        BenchOperation(name: "outl_to_kernel", summary: "OUT to port 0x4d0, an L0 device") { cpu, i in
            cpu.outPort(0x4D0, i, size: 4)
        },
        BenchOperation(name: "inl_from_qemu", summary: "IN from port 0x1234, a device of L1's device model") { cpu, _ in
            _ = cpu.inPort(0x1234, size: 4)
        },
        BenchOperation(name: "mov_from_cr8", summary: "read CR8 (the TPR): no TPR shadow is modelled, so it exits") { cpu, _ in
            _ = cpu.readCR(8)
        },
        BenchOperation(name: "mov_to_cr8", summary: "write 0 to CR8") { cpu, _ in
            cpu.writeCR(8, 0)
        },
        BenchOperation(name: "mov_dr", summary: "DR7 <- 0x400 (every MOV DR exits in this CPU model)") { cpu, _ in
            cpu.writeDR(7, 0x400)
        },
        BenchOperation(name: "wbinvd", summary: "WBINVD") { cpu, _ in
            cpu.wbinvd()
        },
        BenchOperation(name: "wr_ibpb_msr", summary: "WRMSR IA32_PRED_CMD (0x49) = 1, an indirect-branch barrier") { cpu, _ in
            cpu.wrmsr(0x49, 1)
        },
        BenchOperation(name: "toggle_cr0_wp", summary: "MOV to CR0 flipping WP: a bit KVM with EPT lets the guest own") { cpu, _ in
            cpu.writeCR(0, cpu.readCR(0) ^ ControlRegisterBits.cr0WP)
        },
        BenchOperation(name: "toggle_cr4_pge", summary: "MOV to CR4 flipping PGE: a bit KVM with EPT lets the guest own") { cpu, _ in
            cpu.writeCR(4, cpu.readCR(4) ^ ControlRegisterBits.cr4PGE)
        },
        BenchOperation(name: "inl_from_pmtimer", summary: "32-bit IN from the ACPI PM timer (port 0xb008), a device of a VMM's userspace") { cpu, _ in
            _ = cpu.inPort(0xB008, size: 4)
        },
        BenchOperation(name: "ept_first_touch", summary: "first write to a new L2 page", needs: .init(freshPages: firstTouchPages)) { cpu, i in
            cpu.write64(L2GPA(firstTouchBase + i * pageSize), i)
        },
    ] + PagingOperations.all.map { $0.requiring(.l2Paging) } + InterruptOperations.all.map { $0.requiring(.localAPIC) }
        + TLBShootdown.all

    public static func named(_ n: String) -> BenchOperation? { all.first { $0.name == n } }
}
