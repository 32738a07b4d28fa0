import ABI
import Atomics
import GuestDevices
import Transport
#if canImport(Glibc)
import Glibc
#endif

/// L1 as a PV hypervisor: no VMCS, no EPT tables. It negotiates the ABI, registers what L0 may
/// handle directly (CPUID table, MSR policies, ports), maps L2's memory by hypercall (keeping its
/// own `L2MemoryMap`), and runs L2 with enter-L2, handling the exits L0 delivers in the PV exit page.
///
/// With several vCPUs there is one `PVHypervisor` per vCPU thread, over one `PVL1VM`: vCPU 0
/// negotiates, registers and maps for the VM; the others wait for that, then each creates its
/// L2 vCPU with an exit page of its own and runs it.
public final class PVHypervisor {
    let cpu: L1CPU
    let memory: L1Memory
    let vm: PVL1VM
    let index: Int
    var wanted: PVFeatures { vm.wanted }
    var mapMode: L2MapMode { vm.mapMode }
    var enabled: PVFeatures {
        get { vm.enabled }
        set { vm.enabled = newValue }
    }
    var devices: L1Devices {
        get { vm.devices }
        set { vm.devices = newValue }
    }
    public var map: PVMap {
        get { vm.map }
        set { vm.map = newValue }
    }
    /// Pages mapped around each first touch in batch mode.
    static let faultAroundPages: UInt64 = 64

    public convenience init(cpu: L1CPU, memory: L1Memory, features: PVFeatures = .all, mapMode: L2MapMode = .eager) {
        self.init(cpu: cpu, memory: memory, vm: PVL1VM(features: features, mapMode: mapMode), vcpu: 0)
    }

    public init(cpu: L1CPU, memory: L1Memory, vm: PVL1VM, vcpu: Int) {
        self.cpu = cpu
        self.memory = memory
        self.vm = vm
        self.index = vcpu
    }

    public func run() throws -> Never {
        if index == 0 {
            try setUpVM()
            vm.ready.store(true, ordering: .releasing)
        } else {
            while !vm.ready.load(ordering: .acquiring) { sched_yield() }
        }
        let exitPage = L1MemoryPlan.perVCPU(L1MemoryPlan.pvExitPage, vcpu: index)
        try memory.zero(exitPage, length: RunPage.size)
        try cpu.hypercall(.createVCPU, exitPage)
        let page = try memory.runPage(exitPage)
        page[register: .rip] = L1MemoryPlan.l2EntryRIP
        page[register: .rsp] = L1MemoryPlan.l2StackTop
        page[register: .rflags] = 0x2
        while true {
            try cpu.hypercall(.enterL2)
            try vm.lock.withLock { try handleExit(page) }
        }
    }

    /// What vCPU 0 does for the VM: negotiate, register what L0 handles, map L2's RAM.
    func setUpVM() throws {
        try negotiate()
        if enabled.contains(.directCPUID) { try registerCPUID() }
        if enabled.contains(.directMSR) { try registerMSRPolicies() }
        if enabled.contains(.l0Ports) {
            try cpu.hypercall(.registerL0Ports, UInt64(L0PortsPlan.kernelPort), UInt64(2), PVL0Device.latch.rawValue)
        }
        if mapMode == .eager { try mapAllOfL2RAM() }
    }

    /// Version check and feature negotiation: enable what L1 wants and L0 offers.
    func negotiate() throws {
        let l0 = PVABIVersion(packed: try cpu.hypercall(.getVersion))
        guard l0.major == PVABIVersion.current.major else { throw L1Fault.abiMismatch(l1: .current, l0: l0) }
        let offered = PVFeatures(rawValue: try cpu.hypercall(.getFeatures))
        enabled = wanted.intersection(offered)
        try memory.zero(L1MemoryPlan.pvArgumentPage, length: PVArgumentPage.size)
        try cpu.hypercall(.negotiate, PVABIVersion.current.packed, enabled.rawValue, L1MemoryPlan.pvArgumentPage)
    }

    /// Writes the table as `kvm_cpuid_entry2[]` into the argument page and registers it.
    func registerCPUID() throws {
        let entries = GuestCPUIDTable.entries
        for (i, e) in entries.enumerated() {
            let base = L1MemoryPlan.argumentArea + UInt64(i) * CPUIDEntry.byteSize
            try memory.zero(base, length: CPUIDEntry.byteSize)
            for (word, offset) in zip(e.words, CPUIDEntry.wordOffsets) {
                try memory.store32(word, base + offset)
            }
        }
        try cpu.hypercall(.setCPUID, L1MemoryPlan.argumentArea, UInt64(entries.count))
    }

    /// TSC_ADJUST: L0 emulates it (every bit writable). MISC_ENABLE: L1 keeps it. A bogus MSR:
    /// #GP. FS/GS/KERNEL_GS_BASE: L2 reaches them directly, as the KVM-like L1's MSR bitmap allows.
    func registerMSRPolicies() throws {
        let policies: [(UInt32, PVMSRAction, UInt64, UInt64)] = [
            (L1MemoryPlan.tscAdjustMSR, .emulate, 0, ~0),
            (L1MemoryPlan.miscEnableMSR, .passToL1, 0, 0),
            (L1MemoryPlan.bogusMSR, .injectGP, 0, 0),
        ] + PassthroughMSRs.all.map { ($0, .passthrough, 0, 0) }
        for (i, (msr, action, value, mask)) in policies.enumerated() {
            let base = L1MemoryPlan.pvArgumentPage + UInt64(i) * PVMSRPolicyEntry.size
            try memory.store64(UInt64(msr) | UInt64(action.rawValue) << 32, base + PVMSRPolicyEntry.index)
            try memory.store64(value, base + PVMSRPolicyEntry.value)
            try memory.store64(mask, base + PVMSRPolicyEntry.writableMask)
        }
        try cpu.hypercall(.setMSRPolicy, UInt64(policies.count))
    }

    // MARK: mapping

    /// Maps L2 GPA [start, +pages) with each page's initial rights, as few ranges as possible.
    func ranges(from start: L2GPA, pages: UInt64) -> [PVMapping] {
        var out: [PVMapping] = []
        for p in 0..<pages {
            let gpa = start + p * pageSize
            guard let l1 = L1MemoryPlan.backing(of: gpa), map.lookup(gpa) == nil else { continue }
            let perms = L1MemoryPlan.initialPermissions(of: gpa)
            if let last = out.last, last.permissions == perms, last.l2.end == gpa {
                out[out.count - 1].l2 = AddressRange(start: last.l2.start, length: last.l2.length + pageSize)!
            } else {
                out.append(PVMapping(l2: AddressRange(start: gpa, length: pageSize)!, l1: l1, permissions: perms))
            }
        }
        return out
    }

    func mapAllOfL2RAM() throws {
        try install(ranges(from: L2GPA(0), pages: L1MemoryPlan.l2RAMSize / pageSize), flags: 0)
    }

    /// Sends ranges to L0: one batch hypercall when the feature is on, else one call per range.
    func install(_ rs: [PVMapping], flags: UInt64) throws {
        guard !rs.isEmpty else { return }
        if enabled.contains(.batchMap) && rs.count > 1 {
            for chunk in stride(from: 0, to: rs.count, by: Int(PVMapBatchEntry.maxPerCall)) {
                let part = rs[chunk..<min(chunk + Int(PVMapBatchEntry.maxPerCall), rs.count)]
                for (i, r) in part.enumerated() {
                    let base = L1MemoryPlan.pvArgumentPage + UInt64(i) * PVMapBatchEntry.size
                    try memory.store64(r.l2.start.registerValue, base + PVMapBatchEntry.l2GPA)
                    try memory.store64(r.l1.registerValue, base + PVMapBatchEntry.l1GPA)
                    try memory.store64(r.l2.length, base + PVMapBatchEntry.length)
                    try memory.store64(r.permissions | flags, base + PVMapBatchEntry.flags)
                }
                try cpu.hypercall(.mapGPABatch, UInt64(part.count))
            }
        } else {
            for r in rs { try cpu.hypercall(.mapGPARange, r.l2.start, r.l1, r.l2.length, r.permissions | flags) }
        }
        for r in rs { map.record(r) }
    }

    /// First touch of an unmapped page of L2's RAM: map it (per-page) or its window (batch),
    /// one batch entry per page, as a hypervisor whose backing is not contiguous would.
    func mapOnFirstTouch(_ gpa: L2GPA) throws {
        switch mapMode {
        case .eager, .perPage:
            try install(ranges(from: gpa.pageBase, pages: 1), flags: 0)
        case .batch:
            let start = L2GPA(pageNumber: gpa.pageNumber / Self.faultAroundPages * Self.faultAroundPages)!
            let pages = (0..<Self.faultAroundPages).compactMap { p -> PVMapping? in
                ranges(from: start + p * pageSize, pages: 1).first
            }
            try install(pages, flags: 0)
        }
    }

    // MARK: exits

    /// One exit L0 delivered. L1 edits L2's registers in the PV exit page.
    func handleExit(_ page: RunPageView) throws {
        let reason = page.exitReason
        let q = page[RunPage.exitQualification]
        var regs = page
        if reason == .eptViolation {
            let gpa = L2GPA(page[RunPage.guestPhysicalAddress])
            if let l1 = L1MemoryPlan.backing(of: gpa), !devices.isBallooned(gpa) {
                let access = q & EPT.rwxMask, allowed = (q >> EPTViolationQualification.readableShift) & EPT.rwxMask
                if allowed == 0 {
                    try mapOnFirstTouch(gpa)            // not mapped yet: map, and L2 retries
                } else {
                    // A permission fault: L1 grants the access (copy-on-write style) and L2 retries.
                    let r = PVMapping(l2: AddressRange(start: gpa.pageBase, length: pageSize)!, l1: l1.pageBase, permissions: allowed | access)
                    try install([r], flags: PVMapFlags.replace)
                }
                return
            }
        }
        if reason == .vmcall {
            try devices.l2Hypercall(&regs, isRAM: { L1MemoryPlan.backing(of: $0) != nil }) { gpa in
                if map.lookup(gpa) != nil {
                    try cpu.hypercall(.unmapGPARange, gpa, pageSize)
                    map.remove(AddressRange(start: gpa, length: pageSize)!)
                }
            }
        } else if !devices.emulate(reason, qualification: q, accessSize: page[RunPage.instructionInfo],
                                   gpa: L2GPA(page[RunPage.guestPhysicalAddress]), &regs) {
            throw L1Fault.unexpectedExit(reason, "the PV L1 has no handler")
        }
        page[register: .rip] &+= page[RunPage.instructionLength]
    }
}

/// What a PV L1's vCPUs share: the features it enabled, its device model, its PV map, and a
/// lock over them (an exit L1 handles may map memory or touch a device).
public final class PVL1VM: @unchecked Sendable {
    let wanted: PVFeatures
    let mapMode: L2MapMode
    var enabled: PVFeatures = []
    var devices = L1Devices()
    var map = PVMap()
    let lock = L1Lock()
    /// vCPU 0 has negotiated, registered and mapped: the other vCPUs may create theirs.
    let ready = ManagedAtomic<Bool>(false)

    public init(features: PVFeatures, mapMode: L2MapMode) {
        self.wanted = features
        self.mapMode = mapMode
    }
}

/// Ports L1 leaves to L0's devices.
public enum L0PortsPlan {
    public static let kernelPort: UInt16 = 0x4D0
}
