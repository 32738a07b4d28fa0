import ABI
import Atomics
import GuestDevices
import Transport
#if canImport(Glibc)
import Glibc
#endif

/// What a nested-VMX L1's vCPUs share: the L2 VM's EPT12 (vCPU 0 builds it), its device model,
/// and a lock over them (every exit L1 handles may touch either).
public final class NestedL1VM: @unchecked Sendable {
    var ept12: EPT12Builder
    var devices = L1Devices()
    /// L2's local APICs, which this L1 runs (KVM's in-kernel LAPIC for its guest): one per L2
    /// vCPU, each vCPU's state kept as L1 knows it (in L2, halted, or in L1).
    var l2APICs: LocalAPICs
    let lock = L1Lock()
    /// vCPU 0 has built EPT12: the other vCPUs may set up their VMCSs and launch.
    let ready = ManagedAtomic<Bool>(false)

    public init(memory: L1Memory, vcpus: Int = 1) throws {
        self.ept12 = try EPT12Builder(memory: memory, pool: L1MemoryPlan.ept12Pool, poolSize: L1MemoryPlan.ept12PoolSize)
        self.l2APICs = LocalAPICs(count: vcpus)
        for v in 0..<vcpus { l2APICs.setState(v, .notRunning) }
    }
}

/// L1 as KVM runs an L2 on VMX: VMXON, a vmcs12 set up with VMWRITEs, EPT12 tables, VMLAUNCH,
/// and for each VM exit the VMREADs and VMWRITEs KVM's handlers do, with KVM's register-cache
/// laziness (nested-vmx-facts 1.4): VM_EXIT_REASON and IDT_VECTORING_INFO_FIELD on every exit;
/// everything else only when a handler needs it; GUEST_RIP / GUEST_RSP written back only if dirty.
///
/// With several vCPUs there is one `NestedVMXHypervisor` per vCPU thread, each with its own
/// VMXON region, vmcs12, MSR bitmap and VPID, over one `NestedL1VM`: one EPT12 for the L2 VM
/// (vCPU 0 builds it), one device model, and a lock over them.
public final class NestedVMXHypervisor {
    let cpu: L1CPU
    let memory: L1Memory
    let vm: NestedL1VM
    let index: Int
    var devices: L1Devices {
        get { vm.devices }
        set { vm.devices = newValue }
    }
    /// The VM's EPT12, storing through this vCPU's CPU (a store to a table L0 write-protects
    /// traps on this vCPU).
    var ept12: EPT12Builder {
        get {
            var b = vm.ept12
            b.memory = memory
            return b
        }
        set { vm.ept12 = newValue }
    }
    /// L2's GPRs, saved at each VM exit and loaded before each entry (KVM: vcpu->arch.regs).
    var guestRegisters = SavedGuestRegisters()
    /// KVM's register cache for RIP and RSP: nil until read this exit; dirty once written.
    var cachedRIP: UInt64?
    var ripDirty = false
    var cachedRFLAGS: UInt64?
    /// Interrupt-window exiting is on in vmcs12 (an interrupt waits for L2's RFLAGS.IF).
    var windowRequested = false
    /// vmcs12's pin-based controls, without the VMX-preemption timer.
    let pinBasedControls = PinBased.externalInterruptExiting | PinBased.nmiExiting
    /// vmcs12's VMX-preemption timer is on: L2's APIC timer is armed (KVM's hv timer for its
    /// guest; never with an eVMCS, which has no such field).
    var preemptionTimerOn = false
    /// L1's own APIC timer (L0 runs it), which carries L2's timer where the preemption timer
    /// cannot (KVM's software timer, an hrtimer on L1's clockevent): with an eVMCS always, and
    /// while this vCPU halts. Its LVT entry is set at first use; the deadline last written.
    var ownTimerReady = false
    var ownTimerDeadline: UInt64 = 0
    /// L1's own timer interrupt came (its handler's note): L2's APIC timer is looked at before
    /// the next VMRESUME, or when this vCPU wakes.
    var ownTimerFired = false
    /// The primary processor-based controls this L1 runs L2 with.
    let cpuBasedControls = CPUBased.hltExiting | CPUBased.unconditionalIOExiting | CPUBased.useMSRBitmaps | CPUBased.activateSecondaryControls

    /// Use an enlightened VMCS (Hyper-V eVMCS) instead of VMCLEAR/VMPTRLD and VMREAD/VMWRITE.
    let enlightened: Bool

    /// When EPT12 entries are made: all at start, or at L2's first touch (KVM's TDP MMU faults
    /// them in), one page or a 64-page window at a time.
    let mapMode: L2MapMode

    public convenience init(cpu: L1CPU, memory: L1Memory, enlightened: Bool = false, mapMode: L2MapMode = .eager) throws {
        self.init(cpu: cpu, memory: memory, vm: try NestedL1VM(memory: memory), vcpu: 0, enlightened: enlightened, mapMode: mapMode)
    }

    public init(cpu: L1CPU, memory: L1Memory, vm: NestedL1VM, vcpu: Int, enlightened: Bool, mapMode: L2MapMode) {
        self.cpu = cpu
        self.memory = memory
        self.vm = vm
        self.index = vcpu
        self.enlightened = enlightened
        self.mapMode = mapMode
    }

    /// This vCPU's copy of a per-vCPU page.
    func mine(_ page: L1GPA) -> L1GPA { L1MemoryPlan.perVCPU(page, vcpu: index) }

    func check(_ what: String, _ r: VMXInstructionResult) throws {
        guard r == .succeed else { throw L1Fault.vmxFailure(what, r) }
    }

    public func run() throws -> Never {
        // L1's interrupt handler: its own timer's interrupt is noted (the kick's is an EOI).
        cpu.interruptHandler = { [unowned self] vector in
            if vector == L1CPU.timerVector { self.ownTimerFired = true }
        }
        try setUpVMX()
        vm.lock.withLock { vm.l2APICs.setState(index, .running) }      // L2 runs from the VMLAUNCH on
        var launch = true
        while true {
            switch try cpu.enter(launch: launch, guestRegisters: &guestRegisters) {
            case .failed(let r):
                throw L1Fault.vmxFailure(launch ? "VMLAUNCH" : "VMRESUME", r)
            case .vmExit:
                launch = false
                let halted = try vm.lock.withLock { () -> Bool in
                    vm.l2APICs.setState(index, .notRunning)
                    let halt = try handleExit()
                    if !halt { try enterPrepared() }
                    return halt
                }
                if halted { try waitForL2Interrupt() }
            }
        }
    }

    // MARK: setup (KVM: vmx_vcpu_setup + nested setup of L2's VMCS)

    func setUpVMX() throws {
        try memory.zero(mine(L1MemoryPlan.vmxonRegion), length: pageSize)
        try memory.store32(VMCS12Layout.revisionID, mine(L1MemoryPlan.vmxonRegion))
        try check("VMXON", cpu.vmxon(mine(L1MemoryPlan.vmxonRegion)))
        if enlightened {
            // Hyper-V style: the eVMCS is named in the VP assist page, enabled by an MSR write.
            try memory.zero(mine(L1MemoryPlan.evmcs), length: pageSize)
            try memory.store32(EnlightenedVMCS.revision, mine(L1MemoryPlan.evmcs))
            try memory.zero(mine(L1MemoryPlan.vpAssistPage), length: pageSize)
            try memory.store64(mine(L1MemoryPlan.evmcs).raw, mine(L1MemoryPlan.vpAssistPage) + VPAssistPage.currentNestedVMCS)
            try memory.store8(1, mine(L1MemoryPlan.vpAssistPage) + VPAssistPage.enlightenVMEntry)
            try cpu.wrmsr(VPAssistPage.msr, mine(L1MemoryPlan.vpAssistPage).raw | VPAssistPage.enable)
            cpu.useEnlightenedVMCS(try memory.vmcs(mine(L1MemoryPlan.evmcs)))
            // Hyper-V's "L2 TLB flush" (as KVM on Hyper-V turns it on): direct hypercalls in the
            // VP assist page and nested_flush_hypercall in the eVMCS, so L0 answers L2's flush
            // hypercall without this L1.
            try memory.store32(VPAssistPage.directHypercall, mine(L1MemoryPlan.vpAssistPage) + VPAssistPage.nestedControlFeatures)
            cpu.evmcs?.evmcsEnlightenmentsControl = EnlightenedVMCS.nestedFlushHypercall
        } else {
            try memory.zero(mine(L1MemoryPlan.vmcs12), length: pageSize)
            try memory.store32(VMCS12Layout.revisionID, mine(L1MemoryPlan.vmcs12))
            try check("VMCLEAR", cpu.vmclear(mine(L1MemoryPlan.vmcs12)))
            try check("VMPTRLD", cpu.vmptrld(mine(L1MemoryPlan.vmcs12)))
        }

        // No I/O bitmaps: KVM's vmx_exec_control clears USE_IO_BITMAPS and keeps unconditional
        // I/O exiting, so every IN/OUT of L2 exits to L1 (kvm-nested-work.md section 3). MSR
        // bitmap: intercept everything except the MSRs KVM passes through (FS/GS base,
        // KERNEL_GS_BASE).
        for i in stride(from: UInt64(0), to: pageSize, by: 8) {
            try memory.store64(~0, mine(L1MemoryPlan.msrBitmap) + i)
        }
        for msr: UInt32 in [0xC000_0100, 0xC000_0101, 0xC000_0102] {
            for base: UInt64 in [0x400, 0xC00] {
                let bit = UInt64(msr - 0xC000_0000)
                let byte = mine(L1MemoryPlan.msrBitmap) + base + bit / 8
                try memory.store8(try memory.load8(byte) & ~(1 << UInt8(bit % 8)), byte)
            }
        }

        // EPT12 for all of L2's RAM, 4 KiB pages, unless it is made at first touch: the VM's,
        // made by vCPU 0 (the others use it once it is there).
        if index == 0 {
            if mapMode == .eager { try mapEPT12(from: L2GPA(0), pages: L1MemoryPlan.l2RAMSize / pageSize) }
            vm.ready.store(true, ordering: .releasing)
        } else {
            while !vm.ready.load(ordering: .acquiring) { sched_yield() }
        }

        let cr0 = ControlRegisterBits.initialCR0, cr4 = ControlRegisterBits.initialCR4, efer: UInt64 = 0x500
        let fields: [(VMCSField, UInt64)] = [
            (.pinBasedVMExecControl, pinBasedControls),
            (.cpuBasedVMExecControl, cpuBasedControls),
            (.secondaryVMExecControl, SecondaryExec.enableEPT | SecondaryExec.enableVPID | SecondaryExec.rdtscp),
            (.exceptionBitmap, 1 << 1 | 1 << 6 | 1 << 17 | 1 << 18),
            (.msrBitmap, mine(L1MemoryPlan.msrBitmap).raw),
            (.eptPointer, ept12.eptp), (.virtualProcessorID, 1 + UInt64(index)), (.vmcsLinkPointer, ~0),
            (.vmEntryControls, VMEntryControl.ia32eModeGuest | VMEntryControl.loadIA32EFER),
            (.vmExitControls, VMExitControl.hostAddressSpaceSize | VMExitControl.ackInterruptOnExit | VMExitControl.loadIA32EFER),
            // KVM with EPT lets its guest own CR0.TS/WP and CR4.PGE and the like.
            (.cr0GuestHostMask, ControlRegisterBits.kvmCR0GuestHostMask), (.cr0ReadShadow, cr0),
            (.cr4GuestHostMask, ControlRegisterBits.kvmCR4GuestHostMask), (.cr4ReadShadow, cr4),
            (.guestCR0, cr0), (.guestCR3, 0), (.guestCR4, cr4), (.guestIA32EFER, efer),
            (.guestCSSelector, 0x10), (.guestCSARBytes, 0xA09B), (.guestSSSelector, 0x18), (.guestSSARBytes, 0xC093),
            (.guestRIP, L1MemoryPlan.l2EntryRIP), (.guestRSP, L1MemoryPlan.l2StackTop), (.guestRFLAGS, 0x2),
            (.guestActivityState, 0), (.guestInterruptibilityInfo, 0),
            (.hostCR0, cr0), (.hostCR3, 0x1000), (.hostCR4, cr4 | 1 << 13), (.hostIA32EFER, efer),
            (.hostCSSelector, 0x10), (.hostSSSelector, 0x18), (.hostTRSelector, 0x40),
            (.hostRIP, 0xFFFF_FFFF_8100_0000), (.hostRSP, 0xFFFF_C900_0000_0000),
        ]
        for (f, v) in fields { try check("VMWRITE \(f)", cpu.vmwrite(f, v)) }
        guestRegisters = SavedGuestRegisters()
    }

    /// EPT12 entries for [start, +pages) of L2's RAM with each page's initial rights; pages
    /// already mapped or given back are left alone.
    func mapEPT12(from start: L2GPA, pages: UInt64) throws {
        for p in 0..<pages {
            let gpa = start + p * pageSize
            guard let l1 = L1MemoryPlan.backing(of: gpa), !devices.isBallooned(gpa), try !ept12.isMapped(gpa) else { continue }
            try ept12.map(gpa, to: l1, permissions: L1MemoryPlan.initialPermissions(of: gpa))
        }
    }

    // MARK: exit handling (KVM: vmx_handle_exit and the per-reason handlers)

    /// Before VMRESUME (under the lock): L2's interrupt, if one is deliverable and L2 takes
    /// interrupts, goes into VM_ENTRY_INTR_INFO (kvm_inject_pending_event); dirty registers
    /// are written back; L2 counts as running for the other vCPUs' IPIs.
    func enterPrepared() throws {
        takeOwnTimer()
        if vm.l2APICs.deliverable(index) != nil {
            if try readRFLAGS() & (1 << 9) != 0, let vector = vm.l2APICs.acknowledge(index) {
                try check("VMWRITE", cpu.vmwrite(.vmEntryIntrInfoField, 1 << 31 | UInt64(vector)))
            } else if !windowRequested {
                // Interrupts off in L2: ask for an exit as soon as they are on (enable_irq_window).
                try check("VMWRITE", cpu.vmwrite(.cpuBasedVMExecControl, cpuBasedControls | CPUBased.interruptWindowExiting))
                windowRequested = true
            }
        }
        if !enlightened { try followPreemptionTimer() }
        try writeBackDirtyRegisters()
        vm.l2APICs.setState(index, .running)
    }

    // MARK: L2's APIC timer (KVM's lapic timer in TSC-deadline mode, for its guest)

    /// L1's own timer interrupt came: L2's APIC timer fires if its deadline has come (the
    /// hrtimer callback, apic_timer_expired).
    func takeOwnTimer() {
        guard ownTimerFired else { return }
        ownTimerFired = false
        ownTimerDeadline = 0
        expireL2Timer()
    }

    /// apic_timer_expired: L2's APIC timer fires if its deadline has come (its interrupt, for
    /// this vCPU, goes in at the VMRESUME).
    func expireL2Timer() { _ = vm.l2APICs.timerTick(index, now: monotonicNanos()) }

    /// vmx_update_hv_timer, at every VMRESUME: with L2's timer armed, the time left goes into
    /// VMX_PREEMPTION_TIMER_VALUE (this L0 counts it in ns of the guest clock), since L0 starts
    /// vmcs12's timer afresh at each nested entry; a deadline passed is 0, an exit at once. The
    /// pin-based control goes on while armed and off after, as KVM before 5.4 set and cleared it
    /// (today's KVM leaves it on and writes -1 to disarm).
    func followPreemptionTimer() throws {
        let deadline = vm.l2APICs.tscDeadline(index)
        if deadline != 0 {
            let now = monotonicNanos()
            let left = deadline > now ? min(deadline - now, UInt64(UInt32.max)) : 0
            try check("VMWRITE", cpu.vmwrite(.vmxPreemptionTimerValue, left))
        }
        guard (deadline != 0) != preemptionTimerOn else { return }
        preemptionTimerOn = deadline != 0
        try check("VMWRITE", cpu.vmwrite(.pinBasedVMExecControl, pinBasedControls | (preemptionTimerOn ? PinBased.preemptionTimer : 0)))
    }

    /// L2's timer on L1's own APIC timer (start_sw_tscdeadline): a deadline already passed
    /// fires now; a later one is written to L1's IA32_TSC_DEADLINE (an exit to L0, which runs
    /// L1's APIC) unless it is there already. Its interrupt (`takeOwnTimer`) fires L2's.
    func startSoftwareTimer() throws {
        let deadline = vm.l2APICs.tscDeadline(index)
        guard deadline != 0 else { return }
        guard deadline > monotonicNanos() else { return expireL2Timer() }
        if !ownTimerReady {
            try cpu.wrmsr(LocalAPICMSR.lvtTimer, UInt64(L1CPU.timerVector) | UInt64(LVTTimer.tscDeadlineMode))
            ownTimerReady = true
        }
        guard deadline != ownTimerDeadline else { return }
        try cpu.wrmsr(LocalAPICMSR.tscDeadline, deadline)
        ownTimerDeadline = deadline
    }

    /// The reflected RDMSR/WRMSR names IA32_TSC_DEADLINE (ECX).
    var isTSCDeadlineAccess: Bool { UInt32(truncatingIfNeeded: guestRegisters[.rcx]) == LocalAPICMSR.tscDeadline }

    /// RDMSR/WRMSR IA32_TSC_DEADLINE of L2's (kvm_set_lapic_tscdeadline_msr): L2's APIC timer
    /// armed, or fired at once (its interrupt goes in at the VMRESUME). With an eVMCS it
    /// starts on L1's own timer now; otherwise the VMRESUME hands it to the preemption timer.
    func emulateL2TSCDeadline(_ reason: ExitReason) throws {
        if reason == .msrWrite {
            let value = EDXEAX.combine(edx: guestRegisters[.rdx], eax: guestRegisters[.rax])
            _ = vm.l2APICs.armTSCDeadline(index, value, now: monotonicNanos())   // its own vCPU: taken at VMRESUME
            if enlightened { try startSoftwareTimer() }
        } else {
            (guestRegisters[.rdx], guestRegisters[.rax]) = EDXEAX.split(vm.l2APICs.tscDeadline(index))
        }
    }

    /// L2 halted with interrupts on and nothing to take: this vCPU of L1 halts too (its own
    /// HLT, an exit to L0) until an interrupt wakes it, then looks again. L2's timer, if armed,
    /// goes onto L1's own timer first (KVM's kvm_lapic_switch_to_sw_timer for a blocking
    /// vCPU: the preemption timer runs only in guest mode), so L0 wakes this vCPU at its deadline.
    func waitForL2Interrupt() throws {
        while true {
            let ready = try vm.lock.withLock { () -> Bool in
                takeOwnTimer()
                if vm.l2APICs.deliverable(index) == nil {
                    try startSoftwareTimer()
                    takeOwnTimer()               // it fired at its WRMSR: the deadline passed meanwhile
                }
                return vm.l2APICs.deliverable(index) != nil
            }
            if ready { break }
            try cpu.hlt()
        }
        try vm.lock.withLock { try enterPrepared() }
    }

    /// An IPI of L2's local APIC (ICR, SELF_IPI, KVM_HC_SEND_IPI) was accepted: a target L2
    /// vCPU that runs in L2 or halted needs its L1 vCPU's attention, so this L1 vCPU sends
    /// that one its own IPI (through L0, which runs L1's APICs); one in L1 will see it before
    /// its next VMRESUME. This vCPU takes its own at its VMRESUME.
    func kick(_ deliveries: [LocalAPICs.Delivery]) throws {
        for d in deliveries {
            switch d {
            case .notify(let k) where k != index, .wake(let k) where k != index:
                try cpu.wrmsr(LocalAPICMSR.icr, UInt64(L1CPU.kickVector) | UInt64(k) << 32)
            default: break
            }
        }
    }

    /// The reflected RDMSR/WRMSR names an x2APIC register (ECX).
    var isX2APICAccess: Bool { LocalAPICMSR.range.contains(UInt32(truncatingIfNeeded: guestRegisters[.rcx])) }

    /// An x2APIC register access of L2's (reflected by the MSR bitmap).
    func emulateL2APIC(_ reason: ExitReason) throws {
        let msr = UInt32(truncatingIfNeeded: guestRegisters[.rcx])
        if reason == .msrWrite {
            let value = EDXEAX.combine(edx: guestRegisters[.rdx], eax: guestRegisters[.rax])
            // A bad vector or mode: the APIC drops the IPI.
            if let d = try? vm.l2APICs.writeMSR(index, msr, value) { try kick(d) }
        } else {
            (guestRegisters[.rdx], guestRegisters[.rax]) = EDXEAX.split(vm.l2APICs.readMSR(index, msr))
        }
    }

    /// A MOV to or from L2's xAPIC page (apic_mmio_write / apic_mmio_read): the value in RAX.
    func emulateL2APICPage(offset: UInt64, write: Bool, size: UInt64) throws {
        if write {
            // A bad vector or mode: the APIC drops the IPI.
            if let d = try? vm.l2APICs.writeMMIO(index, offset: offset, size: size, guestRegisters[.rax]) { try kick(d) }
        } else {
            guestRegisters[.rax] = vm.l2APICs.readMMIO(index, offset: offset, size: size)
        }
    }

    /// KVM_HC_SEND_IPI from L2 (kvm_pv_send_ipi), as the KVM in L1 answers it.
    func emulatePVSendIPI() throws {
        let sent = vm.l2APICs.sendPV(from: index, bitmapLow: guestRegisters[.rbx], bitmapHigh: guestRegisters[.rcx],
                                     minID: guestRegisters[.rdx], icr: guestRegisters[.rsi])
        try kick(sent.deliveries)
        guestRegisters[.rax] = sent.error == nil ? UInt64(sent.deliveries.count) : HypercallError.invalid.returnValue
    }

    func readRFLAGS() throws -> UInt64 {
        if let r = cachedRFLAGS { return r }
        let r = try cpu.vmread(.guestRFLAGS)
        cachedRFLAGS = r
        return r
    }

    func readRIP() throws -> UInt64 {
        if let r = cachedRIP { return r }
        let r = try cpu.vmread(.guestRIP)
        cachedRIP = r
        return r
    }

    /// kvm_skip_emulated_instruction: RFLAGS (the single-step check), RIP +=
    /// VM_EXIT_INSTRUCTION_LEN, and drop STI/MOV-SS blocking.
    func skipInstruction() throws {
        _ = try readRFLAGS()
        let rip = try readRIP()
        let len = try cpu.vmread(.vmExitInstructionLen)
        let interruptibility = try cpu.vmread(.guestInterruptibilityInfo)
        if interruptibility & 3 != 0 {
            try check("VMWRITE", cpu.vmwrite(.guestInterruptibilityInfo, interruptibility & ~3))
        }
        cachedRIP = rip &+ len
        ripDirty = true
    }

    func writeBackDirtyRegisters() throws {
        if ripDirty, let rip = cachedRIP { try check("VMWRITE GUEST_RIP", cpu.vmwrite(.guestRIP, rip)) }
        ripDirty = false
        cachedRIP = nil
        cachedRFLAGS = nil
    }

    /// One exit of L2's; true when L2 halted and this vCPU must wait for an interrupt.
    func handleExit() throws -> Bool {
        let reason = ExitReason(rawValue: UInt32(truncatingIfNeeded: try cpu.vmread(.vmExitReason)))
        _ = try cpu.vmread(.idtVectoringInfoField)     // vmx_complete_interrupts, every exit
        switch reason {
        case .interruptWindow:
            // L2 takes interrupts again: the window is closed, the interrupt goes in at VMRESUME.
            try check("VMWRITE", cpu.vmwrite(.cpuBasedVMExecControl, cpuBasedControls))
            windowRequested = false
            return false
        case .externalInterrupt:
            // L1's own interrupt, acknowledged on exit (VM_EXIT_INTR_INFO): the kick another
            // vCPU sent (its handler is an EOI), or L1's own timer (noted: L2's timer fires
            // before the VMRESUME). L2's interrupt goes in at the VMRESUME.
            let info = try cpu.vmread(.vmExitIntrInfo)
            if UInt8(truncatingIfNeeded: info) == L1CPU.timerVector { ownTimerFired = true }
            try cpu.wrmsr(LocalAPICMSR.eoi, 0)
            return false                                 // no instruction to skip
        case .preemptionTimer:
            // vmcs12's VMX-preemption timer ran out in L2 (L0 emulates it): L2's APIC timer
            // fires (handle_preemption_timer); its interrupt goes in at the VMRESUME.
            expireL2Timer()
            return false                                 // no instruction to skip
        case .msrRead where isTSCDeadlineAccess, .msrWrite where isTSCDeadlineAccess:
            try emulateL2TSCDeadline(reason)
        case .msrRead where isX2APICAccess, .msrWrite where isX2APICAccess:
            try emulateL2APIC(reason)
        case .hlt where try readRFLAGS() & (1 << 9) != 0:
            // kvm_emulate_halt with interrupts on: L2 sleeps until one is deliverable.
            try skipInstruction()
            return vm.l2APICs.halt(index)
        case .vmcall where guestRegisters[.rax] == KVMHypercall.sendIPI:
            _ = try cpu.vmread(.guestCSARBytes)
            _ = try cpu.vmread(.guestSSARBytes)
            try emulatePVSendIPI()
        case .cpuid, .hlt, .msrRead, .msrWrite:
            // Handlers that need only GPRs (kvm_emulate_cpuid, kvm_emulate_halt, the MSR paths).
            _ = devices.emulate(reason, qualification: 0, accessSize: 0, &guestRegisters)
        case .ioInstruction:
            let q = try cpu.vmread(.exitQualification)
            _ = devices.emulate(reason, qualification: q, accessSize: 0, &guestRegisters)
        case .crAccess:
            // handle_cr: the qualification; kvm_set_cr0/cr4 write the guest value and its read
            // shadow (vmx_set_cr0/vmx_set_cr4); CR8 is the local APIC's TPR, no VMCS field.
            let q = try cpu.vmread(.exitQualification)
            _ = devices.emulate(reason, qualification: q, accessSize: 0, &guestRegisters)
            if CRAccessQualification.type(q) == CRAccessQualification.movToCR, let reg = CRAccessQualification.register(q) {
                let value = guestRegisters[reg]
                switch CRAccessQualification.cr(q) {
                case 0:
                    try check("VMWRITE", cpu.vmwrite(.cr0ReadShadow, value))
                    try check("VMWRITE", cpu.vmwrite(.guestCR0, value))
                case 4:
                    try check("VMWRITE", cpu.vmwrite(.cr4ReadShadow, value))
                    try check("VMWRITE", cpu.vmwrite(.guestCR4, value))
                default: break
                }
            }
        case .drAccess, .wbinvd:
            // Reached only if L1 asked (MOV-DR or WBINVD exiting); handled in its kernel.
            let q = try cpu.vmread(.exitQualification)
            _ = devices.emulate(reason, qualification: q, accessSize: 0, &guestRegisters)
        case .eptViolation:
            let q = try cpu.vmread(.exitQualification)
            let gpa = L2GPA(try cpu.vmread(.guestPhysicalAddress))
            if let l1 = L1MemoryPlan.backing(of: gpa), !devices.isBallooned(gpa) {
                let allowed = (q >> EPTViolationQualification.readableShift) & EPT.rwxMask
                if allowed == 0 {
                    // First touch (KVM's TDP fault path, kvm_tdp_mmu_map): make the EPT12 entries.
                    // No INVEPT: making a non-present entry present needs no flush.
                    let window: UInt64 = mapMode == .batch ? 64 : 1
                    let start = L2GPA(pageNumber: gpa.pageNumber / window * window)!
                    try mapEPT12(from: start, pages: window)
                } else {
                    // EPT12 maps it with fewer rights than the access: grant them (copy-on-write
                    // style). Replacing a present entry is what KVM flushes for: INVEPT, so L0
                    // drops the stale shadow, and L2 retries.
                    try ept12.map(gpa.pageBase, to: l1.pageBase, permissions: allowed | (q & EPT.rwxMask))
                    try check("INVEPT", cpu.invept(type: 1, eptp: ept12.eptp))
                }
                return false
            }
            // No memslot in L1 for this GPA: MMIO. The emulator fetches and decodes the
            // instruction (GUEST_RIP, CS access rights) and completes it: against L2's local
            // APIC in its xAPIC page, else against the device model (or nothing).
            _ = try readRIP()
            _ = try cpu.vmread(.guestCSARBytes)
            if let offset = XAPIC.offset(of: gpa) {
                try emulateL2APICPage(offset: offset, write: q & EPTViolationQualification.dataWrite != 0,
                                      size: cpu.exitAccessSize)
            } else {
                _ = devices.emulate(reason, qualification: q, accessSize: cpu.exitAccessSize, gpa: gpa, &guestRegisters)
            }
        case .eptMisconfig:
            throw L1Fault.unexpectedExit(reason, "EPT12 is misconfigured at \(L2GPA(try cpu.vmread(.guestPhysicalAddress)))")
        case .vmcall:
            // kvm_emulate_hypercall: CS AR (64-bit mode) and SS AR (CPL) first.
            _ = try cpu.vmread(.guestCSARBytes)
            _ = try cpu.vmread(.guestSSARBytes)
            try devices.l2Hypercall(&guestRegisters, isRAM: { L1MemoryPlan.backing(of: $0) != nil }) { gpa in
                try ept12.unmap(gpa)
                try check("INVEPT", cpu.invept(type: 1, eptp: ept12.eptp))
            }
        default:
            throw L1Fault.unexpectedExit(reason, "no handler in this L1")
        }
        try skipInstruction()
        return false
    }
}

// MARK: EPT12, the tables this L1 points vmcs12 at (its TDP MMU)

/// Builds EPT12: real 4-level EPT tables in L1's memory, the way a KVM L1 builds the tables it
/// points vmcs12's EPT_POINTER at. Table pages come from a pool in L1 memory.
public struct EPT12Builder {
    var memory: L1Memory
    let poolEnd: L1GPA
    var next: L1GPA
    public let root: L1GPA

    public init(memory: L1Memory, pool: L1GPA, poolSize: UInt64) throws {
        self.memory = memory
        self.poolEnd = pool + poolSize
        self.next = pool
        self.root = pool
        self.next = pool + pageSize
        try memory.zero(root, length: pageSize)
    }

    /// EPTP: write-back, 4-level walk.
    public var eptp: UInt64 { root.raw | EPT.memoryTypeWB | EPT.eptpWalkLength4 }

    mutating func allocateTable() throws -> L1GPA {
        guard next < poolEnd else { throw L1Fault.outsideOwnMemory(next) }
        let t = next
        next = next + pageSize
        try memory.zero(t, length: pageSize)
        return t
    }

    /// The 4 KiB leaf slot for `l2`, if its tables exist.
    func leafSlot(_ l2: L2GPA) throws -> L1GPA? {
        var table = root
        for level in stride(from: EPT.levels, to: 1, by: -1) {
            let index = EPT.tableIndex(l2, level: level)
            let entry = try memory.load64(table + index * 8)
            guard entry & EPT.rwxMask != 0 else { return nil }
            table = L1GPA(entry & EPT.addressMask)
        }
        return table + l2.pageNumber % EPT.entriesPerTable * 8
    }

    public func isMapped(_ l2: L2GPA) throws -> Bool {
        guard let slot = try leafSlot(l2) else { return false }
        return try memory.load64(slot) & EPT.rwxMask != 0
    }

    /// Clears the 4 KiB leaf for `l2`, if its tables exist.
    public mutating func unmap(_ l2: L2GPA) throws {
        guard let slot = try leafSlot(l2) else { return }
        try memory.store64(0, slot)
    }

    /// Maps one 4 KiB L2 page to an L1 page with `permissions` (EPT R/W/X), write-back.
    public mutating func map(_ l2: L2GPA, to l1: L1GPA, permissions: UInt64 = EPT.rwxMask) throws {
        var table = root
        for level in stride(from: EPT.levels, to: 1, by: -1) {
            let index = EPT.tableIndex(l2, level: level)
            let slot = table + index * 8
            var entry = try memory.load64(slot)
            if entry & EPT.rwxMask == 0 {
                entry = EPT.entry(try allocateTable(), EPT.rwxMask)
                try memory.store64(entry, slot)
            }
            table = L1GPA(entry & EPT.addressMask)
        }
        let leaf = table + l2.pageNumber % EPT.entriesPerTable * 8
        try memory.store64(EPT.entry(l1.pageBase, permissions | EPT.memoryTypeWB << EPT.memoryTypeShift), leaf)
    }
}
