import Foundation

/// A hardware profile: unit prices, in cycles, for the events the cost model counts, each with
/// where it comes from. Profiles are data files (Sources/Bench/Profiles/*.json); the default is
/// built only from published single-level figures (../shared/reference/costs-and-floors.md),
/// never fitted to a nested total. `pvm calibrate` writes one measured on this host.
///
/// File format:
///     {"name": "...", "description": "...", "ghz": 2.5,
///      "prices": {"exit_round_trip": {"cycles": 250, "source": "..."}, ...}}
public struct CostProfile: Codable, Equatable, Sendable {
    public struct Price: Codable, Equatable, Sendable {
        public var cycles: Double
        public var source: String
        /// An estimate (no published figure): the model also reports its total with `low` and
        /// `high` in place of `cycles`, which an estimate must give.
        public var estimate: Bool?
        public var low: Double?
        public var high: Double?
        public init(cycles: Double, source: String) { self.cycles = cycles; self.source = source }
        public init(estimate cycles: Double, low: Double, high: Double, source: String) {
            self.cycles = cycles; self.source = source; self.estimate = true; self.low = low; self.high = high
        }
        public var isEstimate: Bool { estimate == true }
        /// The range the model uses: [low, high] for an estimate, the price itself otherwise.
        public var range: ClosedRange<Double> { isEstimate ? (low ?? cycles)...(high ?? cycles) : cycles...cycles }
    }
    public var name: String
    public var description: String
    /// Clock rate used to print cycles as time.
    public var ghz: Double
    public var prices: [String: Price]

    public init(name: String, description: String, ghz: Double, prices: [String: Price]) {
        self.name = name; self.description = description; self.ghz = ghz; self.prices = prices
    }

    /// Every price the model needs. A profile must give all of them, and nothing else.
    public enum Event: String, CaseIterable, Sendable {
        /// The hardware part of one VM exit and the VM entry back (world switch), any tier to L0.
        case exitRoundTrip = "exit_round_trip"
        /// L0 handling a simple exit in its kernel (CPUID, an MSR it emulates, an in-kernel port).
        case l0SimpleExit = "l0_simple_exit"
        /// L0 handling a hypercall in its kernel.
        case l0Hypercall = "l0_hypercall"
        /// L1 (a KVM) handling an exit L0 delivered to it: the same work L0 does for a simple exit.
        case l1ExitHandling = "l1_exit_handling"
        /// L0 emulating one exiting VMREAD/VMWRITE (decode, vmcs12 access, VMsucceed).
        case l0VMXInstruction = "l0_vmx_instruction"
        /// Hardware VMX instructions L0 executes on its own VMCSs in a nested transition.
        case hwVMREAD = "hw_vmread"
        case hwVMWRITE = "hw_vmwrite"
        case hwVMPTRLD = "hw_vmptrld"
        case hwVMCLEAR = "hw_vmclear"
        /// One vmcs12 or eVMCS field L0 reads, writes or copies in memory (not a VMREAD/VMWRITE).
        case vmcsFieldAccess = "vmcs_field_access"
        /// The software of nested_vmx_vmexit / nested_vmx_run beyond the VMCS operations counted.
        case nestedVMExitSoftware = "nested_vmexit_software"
        case nestedVMEntrySoftware = "nested_vmentry_software"
        /// One group of VM-entry consistency checks (software, in KVM).
        case consistencyCheckGroup = "consistency_check_group"
        /// The hardware's full VM-entry checks after a major control was written.
        case fullEntryChecks = "full_entry_checks"
        /// nested_vmx_prepare_msr_bitmap: merging L1's MSR bitmap into vmcs02's.
        case msrBitmapMerge = "msr_bitmap_merge"
        /// Switching L0's MMU between L1's root and the shadow-EPT root.
        case mmuRootSwitch = "mmu_root_switch"
        /// The transition TLB flush (INVVPID single-context).
        case tlbFlush = "tlb_flush"
        /// The deferred sync of vmcs02's 35 rarely used fields into vmcs12, as a whole.
        case rareFieldSync = "rare_field_sync"
        /// Reading one EPT12 entry during L0's walk (or a resync).
        case ept12WalkStep = "ept12_walk_step"
        /// Setting accessed/dirty bits in one EPT12 entry.
        case ept12ADUpdate = "ept12_ad_update"
        /// Installing one EPT02 entry after a walk (KVM's nested EPT violation work beyond the exit).
        case ept02Fill = "ept02_fill"
        /// Re-syncing one unsync leaf EPT12 table at INVEPT (re-protecting it; entries priced apart).
        case ept12Resync = "ept12_resync"
        /// The host side (seeds/000-002), priced for `pvm bench --suite host`, never in an exit:
        /// enabling virtualization on one CPU (kvm_enable_virtualization_cpu: VMXON and the
        /// per-CPU work and cpuhp callback around it).
        case cpuVirtualizationEnable = "cpu_virtualization_enable"
        /// Disabling it again on one CPU (kvm_disable_virtualization_cpu: VMXOFF and the cpuhp callback).
        case cpuVirtualizationDisable = "cpu_virtualization_disable"
        /// The one-time protected-VM setup (TDX module initialisation), one attempt.
        case oneTimeSetup = "one_time_setup"
        /// An exit a VMM's userspace handles: KVM_EXIT_IO/MMIO to the VMM and back.
        case vmmUserspaceExit = "vmm_userspace_exit"
        /// A port access an in-kernel device emulates (beyond the exit itself).
        case kernelDeviceEmulation = "kernel_device_emulation"
        /// L0 emulating INVEPT (freeing the roots, re-syncing unsync shadows apart).
        case l0INVEPT = "l0_invept"
        /// L0 emulating L1's store to a write-protected EPT12 page (decode and replay it).
        case l0EmulatedStore = "l0_emulated_store"
        /// The PV path's streamlined entry into L2: registers and event from the exit page.
        case pvEntry = "pv_entry"
        /// The PV path's delivery of an L2 exit into the exit page.
        case pvDelivery = "pv_delivery"

        // L2's own work, the same on every path (L2EventCounter): what the native kernel pays.
        /// A SYSCALL/SYSRET round trip.
        case l2Syscall = "l2_syscall"
        /// An exception delivered through L2's IDT and its IRET.
        case l2Exception = "l2_exception"
        /// A TLB miss walked in two dimensions (L2's tables through EPT02): the EPT paths.
        case l2TLBMiss2D = "l2_tlb_miss_2d"
        /// A TLB miss walked in one dimension (L1's shadow tables): pvm-rfc.
        case l2TLBMissShadow = "l2_tlb_miss_shadow"
        /// INVLPG of one page, and a CR3 load with its TLB flush (no PCID).
        case l2INVLPG = "l2_invlpg"
        case l2CR3Load = "l2_cr3_load"

        // The PVM RFC's design (pvm-rfc): the switcher and L1's shadow MMU.
        /// An L2 exit into L1 through the switcher and L1's entry back (no L0).
        case switcherRoundTrip = "switcher_round_trip"
        /// One crossing of the switcher's direct path (SYSCALL, SYSRET, IRET) with no L1.
        case directSwitch = "direct_switch"
        /// The switcher delivering an event L1 injected into L2's kernel.
        case eventInjection = "event_injection"
        /// One shadow entry installed after the walk (FNAME(fetch) and its SPTE).
        case shadowFill = "shadow_fill"
        /// Reading one of L2's page-table entries (a walk or a sync).
        case guestPTERead = "guest_pte_read"
        /// Setting accessed/dirty flags in one of L2's page-table entries.
        case guestADUpdate = "guest_ad_update"
        /// Emulating L2's write to a write-protected page table, or an MMIO access (the emulator).
        case shadowEmulatedWrite = "shadow_emulated_write"
        /// Marking a leaf shadow page unsync (kvm_unsync_page).
        case shadowUnsync = "shadow_unsync"
        /// Syncing one unsync shadow page again, or one entry at INVLPG (entries priced apart).
        case shadowResync = "shadow_resync"
        /// A CR3 load whose root is in the cache of roots (fast_pgd_switch).
        case rootCacheHit = "root_cache_hit"
        /// A CR3 load that builds a root.
        case rootBuild = "root_build"
        /// L1's INVLPG handling (the shadow walk to the entry).
        case shadowINVLPG = "shadow_invlpg"
        /// Zapping one shadow page (write flooding, a pool running dry).
        case shadowPageZap = "shadow_page_zap"
        /// Write-protecting one L2 page's leaf shadow entries (an rmap walk).
        case writeProtect = "write_protect"
        /// L2's TLB flushed at its next entry because shadow entries lost rights or went.
        case shadowTLBFlush = "shadow_tlb_flush"

        // Interrupts between vCPUs, where a hypervisor runs the local APICs (issue 15).
        /// Emulating one IPI's acceptance: the ICR decoded and the target's IRR set (beyond the exit).
        case apicIPIEmulation = "apic_ipi_emulation"
        /// Completing an access to the xAPIC page through the instruction emulator.
        case apicMMIOEmulation = "apic_mmio_emulation"
        /// The APIC timer's TSC deadline reached: its interrupt accepted (beyond the exit).
        case apicTimerExpiry = "apic_timer_expiry"
        /// vmx_start_preemption_timer at a nested entry with vmcs12's timer on: an hrtimer armed.
        case nestedTimerStart = "nested_preemption_timer_start"
        /// KVM_HC_SEND_IPI's own work beyond the exit: the bitmap walked (targets priced apart).
        case pvIPIHypercall = "pv_ipi_hypercall"
        /// A kick: the physical IPI that makes a target in guest mode exit (its exit priced apart).
        case vcpuKick = "vcpu_kick"
        /// A vCPU blocked at HLT (halt-polling, then scheduled out).
        case haltBlock = "halt_block"
        /// A halted vCPU woken and scheduled back in on its CPU.
        case vcpuWakeup = "vcpu_wakeup"
        /// An interrupt acknowledged and injected at a VM entry (VM_ENTRY_INTR_INFO).
        case interruptInjection = "interrupt_injection"
        /// One vCPU named in L2's flush hypercall: its request set (its kick priced apart).
        case tlbFlushRequest = "tlb_flush_request"
    }

    public enum LoadError: Error, CustomStringConvertible, Equatable {
        case unreadable(file: String, reason: String)
        case malformed(file: String, reason: String)
        case missingPrice(file: String, key: String)
        case unknownPrice(file: String, key: String)
        case badPrice(file: String, key: String, reason: String)

        public var description: String {
            switch self {
            case let .unreadable(f, r): "\(f): cannot read the profile: \(r)"
            case let .malformed(f, r): "\(f): not a cost profile: \(r)"
            case let .missingPrice(f, k): "\(f): no price for \"\(k)\""
            case let .unknownPrice(f, k): "\(f): \"\(k)\" is not an event the model prices (known: \(Event.allCases.map(\.rawValue).joined(separator: ", ")))"
            case let .badPrice(f, k, r): "\(f): price \"\(k)\": \(r)"
            }
        }
    }

    /// The largest price a profile may set (over 5 minutes at 3 GHz): every modelled total stays a
    /// finite number a table and a chart can print.
    public static let maxCycles: Double = 1e12

    /// Parses and validates a profile; errors name the file and the key.
    public static func decode(_ data: Data, file: String) throws -> CostProfile {
        let p: CostProfile
        do { p = try JSONDecoder().decode(CostProfile.self, from: data) } catch let e as DecodingError {
            throw LoadError.malformed(file: file, reason: Self.explain(e))
        } catch {
            throw LoadError.malformed(file: file, reason: "\(error)")
        }
        for e in Event.allCases where p.prices[e.rawValue] == nil { throw LoadError.missingPrice(file: file, key: e.rawValue) }
        for (k, v) in p.prices {
            guard Event(rawValue: k) != nil else { throw LoadError.unknownPrice(file: file, key: k) }
            guard v.cycles.isFinite, v.cycles >= 0, v.cycles <= maxCycles else {
                throw LoadError.badPrice(file: file, key: k, reason: "cycles must be a number in 0...\(Int(maxCycles))")
            }
            guard !v.source.trimmingCharacters(in: .whitespaces).isEmpty else { throw LoadError.badPrice(file: file, key: k, reason: "every price needs a source") }
            if v.isEstimate {
                guard let lo = v.low, let hi = v.high, lo.isFinite, hi.isFinite, 0 <= lo, lo <= v.cycles, v.cycles <= hi, hi <= maxCycles else {
                    throw LoadError.badPrice(file: file, key: k, reason: "an estimate needs low <= cycles <= high")
                }
            } else if v.low != nil || v.high != nil {
                throw LoadError.badPrice(file: file, key: k, reason: "low/high belong to estimates (\"estimate\": true)")
            }
        }
        guard p.ghz.isFinite, p.ghz > 0 else { throw LoadError.malformed(file: file, reason: "ghz must be > 0") }
        return p
    }

    /// A decoding error as a person reads it: where in the file (the key path) and what was
    /// expected there, instead of Swift's DecodingError dump.
    static func explain(_ e: DecodingError) -> String {
        func path(_ c: DecodingError.Context, _ last: CodingKey? = nil) -> String {
            let keys = (c.codingPath + (last.map { [$0] } ?? [])).map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }
            return keys.isEmpty ? "the top level" : "key \"" + keys.joined(separator: ".").replacingOccurrences(of: ".[", with: "[") + "\""
        }
        func kind(_ t: Any.Type) -> String {
            switch t {
            case is Double.Type, is Int.Type, is UInt64.Type: "a number"
            case is String.Type: "a string"
            case is Bool.Type: "true or false"
            default: "\(t)".contains("Dictionary") ? "an object" : "\(t)".contains("Array") ? "a list" : "\(t)"
            }
        }
        switch e {
        case let .keyNotFound(key, c): return "\(path(c, key)) is missing"
        case let .typeMismatch(t, c): return "\(path(c)): expected \(kind(t))"
        case let .valueNotFound(t, c): return "\(path(c)): expected \(kind(t)), found null"
        case let .dataCorrupted(c):
            return c.codingPath.isEmpty ? "not valid JSON" : "\(path(c)): \(c.debugDescription)"
        @unknown default: return "\(e)"
        }
    }

    public static func load(path: String) throws -> CostProfile {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw LoadError.unreadable(file: path, reason: "no such file, or not readable")
        }
        return try decode(data, file: path)
    }

    public func encoded() throws -> Data {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        return try e.encode(self)
    }

    public func cycles(_ e: Event) -> Double { prices[e.rawValue]?.cycles ?? 0 }
    /// `count` of `e` in nanoseconds at this profile's clock.
    public func nanos(_ e: Event, count: Int = 1) -> Double { Double(count) * cycles(e) / ghz }
    public func range(_ e: Event) -> ClosedRange<Double> { prices[e.rawValue]?.range ?? 0...0 }
}
