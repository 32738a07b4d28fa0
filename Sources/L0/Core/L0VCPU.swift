import ABI
import GuestDevices
import Transport

/// One vCPU as L0 holds it: what every path shares (the run pages, L1's memory and memslots,
/// EPT02, L2's MSR page, L0's devices, the counters and the harness) and the path's backend.
/// `handleL2Exit` / `handleL1Exit` (VCPULoop.swift) decode an exit once and hand it to the
/// backend; the services below are what backends share.
public final class L0VCPU {
    public let id: Int
    public let path: NestingPath
    public let control: ControlMemory
    public var counters = TransitionCounters()
    public let l2Run: RunPageView
    public let l1Run: RunPageView
    // The VM's state, reached in place (no copy of the struct, and of its references, per use).
    public var l1Memory: L1MemoryAccess {
        _read { yield shared.l1Memory }
        _modify { yield &shared.l1Memory }
    }
    public let ept02: EPT02
    public var harness = Harness()
    /// What this vCPU shares with the VM's other vCPUs (L1's memory and memslots, L0's
    /// devices, the VM): one object per stack, so a memslot change made on one vCPU holds on all.
    public let shared: L0VMState
    /// vmcs02's MSR bitmap for L2 (a set bit exits) and the pass-through MSR values L2 reaches
    /// without an exit.
    public let l2MSRBitmap: MSRBitmapView
    public let l2PassthroughMSRs: PassthroughMSRValues
    /// MSRs L0 serves for L2 itself (by PV policy, or those L1's MSR bitmap passes on nvmx).
    /// Unset MSRs read as 0.
    public var l0MSRs: [UInt32: UInt64] = [:]
    /// L1's own MSRs (the VP assist page among them), kept by L0.
    public var l1MSRs: [UInt32: UInt64] = [:]
    public static let l1MSRCapacity = 512
    public var vm: VMHandle {
        get { shared.vm }
        set { shared.vm = newValue }
    }
    public var memslotZapPolicy: MemslotZapPolicy {
        get { shared.memslotZapPolicy }
        set { shared.memslotZapPolicy = newValue }
    }
    public var l0Devices: L0Devices {
        _read { yield shared.l0Devices }
        _modify { yield &shared.l0Devices }
    }
    /// The path's own state and handlers.
    public let backend: any NestingBackend

    /// A VM's only vCPU (in-process drivers and tests).
    public convenience init(id: Int, path: NestingPath, control: ControlMemory, l1Memory: L1MemoryAccess) {
        self.init(id: id, path: path, control: control, shared: L0VMState(l1Memory: l1Memory),
                  backend: path.makeBackend(control: control, vcpu: id, vm: path.makeBackendVMState()))
    }

    init(id: Int, path: NestingPath, control: ControlMemory, shared: L0VMState, backend: any NestingBackend) {
        self.id = id
        self.path = path
        self.control = control
        self.shared = shared
        self.l2Run = control.runPage(.l2, vcpu: id)
        self.l1Run = control.runPage(.l1, vcpu: id)
        self.ept02 = EPT02(control.ept02)
        self.l2MSRBitmap = control.l2MSRBitmap(vcpu: id)
        self.l2PassthroughMSRs = control.l2PassthroughMSRs(vcpu: id)
        self.backend = backend
        if id == 0 { shared.l0Devices = backend.initialL0Devices }
    }

    /// Every vCPU of a VM of `count` vCPUs: one shared VM state and one path state for the
    /// VM (`NestingPath.makeBackendVMState`), one backend per vCPU.
    public static func makeVCPUs(count: Int, path: NestingPath, control: ControlMemory, l1Memory: L1MemoryAccess) -> [L0VCPU] {
        precondition(count >= 1 && count <= control.layout.vcpuCount, "\(count) vCPUs in a layout of \(control.layout.vcpuCount)")
        let shared = L0VMState(l1Memory: l1Memory)
        let vmState = path.makeBackendVMState()
        let vcpus = (0..<count).map { i in
            L0VCPU(id: i, path: path, control: control, shared: shared,
                   backend: path.makeBackend(control: control, vcpu: i, vm: vmState))
        }
        shared.backends = vcpus.map(\.backend)
        return vcpus
    }

    /// Control memory's initial contents: L2's MSR bitmaps intercept everything, and L2 runs
    /// with KVM's CR0/CR4 guest/host masks (EPT on: the guest owns CR0.TS/WP, CR4.PGE...). A
    /// backend sets up what only its path uses (the VMREAD/VMWRITE bitmaps; vmcs02's masks).
    public static func initialize(_ control: ControlMemory) {
        for i in 0..<control.layout.vcpuCount {
            control.l2MSRBitmap(vcpu: i).bits.setAll(true)
            let masks = control.l2CRGuestHostMasks(vcpu: i)
            masks[0] = ControlRegisterBits.kvmCR0GuestHostMask
            masks[1] = ControlRegisterBits.kvmCR4GuestHostMask
        }
    }

    // MARK: services every backend may use

    /// Queues an exception for `tier` at its next entry (VM_ENTRY_INTR_INFO format); RIP stays.
    func inject(into tier: Tier, vector: UInt8, errorCode: UInt64? = nil) {
        let page = tier == .l1 ? l1Run : l2Run
        let hardwareException: UInt64 = 3 << 8
        let deliverErrorCode: UInt64 = errorCode != nil ? 1 << 11 : 0
        page[RunPage.eventInjection] = 1 << 31 | hardwareException | deliverErrorCode | UInt64(vector)
        page[RunPage.eventErrorCode] = errorCode ?? 0
    }

    /// Sets whether L2's access to `msr` exits (both directions when `write` is nil).
    func setL2Intercept(_ msr: UInt32, write: Bool? = nil, _ intercept: Bool) {
        for w in write.map({ [$0] }) ?? [false, true] { l2MSRBitmap.setIntercept(msr, write: w, intercept) }
    }

    /// RDMSR/WRMSR that reach L0 and stay there. A pass-through-able MSR lives where L2's direct
    /// accesses find it.
    func handleL0MSR(_ exit: L2Exit, _ regs: inout RegisterFile) -> NextStep {
        switch exit.kind {
        case let .msrWrite(msr, value):
            if PassthroughMSRs.contains(msr) { l2PassthroughMSRs[msr] = value } else { l0MSRs[msr] = value }
        case let .msrRead(msr):
            regs.edxEax = l2PassthroughMSRs[msr] ?? l0MSRs[msr] ?? 0
        default: break
        }
        regs.skipInstruction(length: exit.info.instructionLength)
        return .resume(.l2)
    }

    /// Port I/O that reaches L0: the ucall port, an L0 device, or a port nobody claims (reads
    /// float high, writes are dropped, as on a PC).
    func handleL0PortIO(_ io: PortIO, _ exit: L2Exit, _ regs: inout RegisterFile) -> NextStep {
        if io.port == Ucall.port {
            let next = handleUcall(blockGPA: L2GPA(regs[.rdi]))
            if case .stop = next { return next }
        } else {
            // An in-kernel device completes it; a port no device claims goes to the VMM's
            // userspace (KVM_EXIT_IO), which finds nothing there either.
            if l0Devices.owns(io.port) { counters.kernelDeviceAccesses += 1 } else { counters.vmmUserspaceExits += 1 }
            if io.isIn {
                let v = l0Devices.read(port: io.port) ?? ~0
                regs[.rax] = (regs[.rax] & ~io.mask) | (v & io.mask)
            } else {
                l0Devices.write(port: io.port, value: io.value)
            }
        }
        regs.skipInstruction(length: exit.info.instructionLength)
        return .resume(.l2)
    }

    /// An L2 access that reached no memory and no device: reads float high, writes are dropped.
    func completeUnbackedAccess(_ exit: L2Exit, _ regs: inout RegisterFile) -> NextStep {
        if exit.info.qualification & EPTViolationQualification.dataWrite == 0 {
            regs[.rax] = AccessSize.mask(exit.info.instructionInfo)
        }
        counters.unbackedAccesses += 1
        regs.skipInstruction(length: exit.info.instructionLength)
        return .resume(.l2)
    }

    /// L1's RDMSR/WRMSR: L0 keeps L1's MSRs. The VP assist page MSR (how L1 names its eVMCS)
    /// must name L1 memory when enabled, or L1 gets #GP.
    func handleL1MSR(_ exit: L1Exit, _ regs: inout RegisterFile) -> NextStep {
        regs.skipInstruction(length: exit.info.instructionLength)
        switch exit.kind {
        case let .msrWrite(msr, v):
            // L1 picks the MSR numbers: L0 keeps at most `l1MSRCapacity` of them, and a write
            // to one more is refused as KVM refuses an MSR it does not know (#GP).
            guard acceptsL1MSRWrite(msr, v), l1MSRs[msr] != nil || l1MSRs.count < Self.l1MSRCapacity else {
                inject(into: .l1, vector: 13, errorCode: 0)
                return .resume(.l1)
            }
            l1MSRs[msr] = v
        case let .msrRead(msr):
            regs.edxEax = l1MSRs[msr] ?? 0
        default: break
        }
        return .resume(.l1)
    }

    /// Whether WRMSR of `v` to L1's `msr` is allowed: an enabled VP assist page must be L1 memory.
    func acceptsL1MSRWrite(_ msr: UInt32, _ v: UInt64) -> Bool {
        guard msr == VPAssistPage.msr, v & VPAssistPage.enable != 0 else { return true }
        return (try? l1Memory.memslots.translate(L1GPA(v).pageBase, length: pageSize)) != nil
    }

    /// A VMCALL on a path with no hypercalls for L1: counted, and refused with -KVM_ENOSYS.
    func refuseHypercall(_ nr: UInt64, _ exit: L1Exit, _ regs: inout RegisterFile) -> NextStep {
        counters.hypercalls.record(nr)
        regs.skipInstruction(length: exit.info.instructionLength)
        regs[.rax] = HypercallError.noSys.returnValue
        return .resume(.l1)
    }

    /// Counts an exit that the receiving hypervisor completes in its VMM's userspace: a port or
    /// the MMIO range of the device model (`L1Devices`: the serial console, the QEMU latch, the
    /// MMIO latch). L0 cannot see inside L1; this is what L1's platform says about its devices,
    /// and what KVM does with them (KVM_EXIT_IO / KVM_EXIT_MMIO to the VMM and back).
    func countVMMUserspaceExit(_ exit: L2Exit) {
        switch exit.kind {
        case .io(let io) where L1Devices.kernelPorts.contains(io.port): counters.kernelDeviceAccesses += 1
        case .io(let io) where L1Devices().owns(port: io.port): counters.vmmUserspaceExits += 1
        case .eptViolation(let gpa, _, _) where L1Devices.mmioDevice.contains(gpa): counters.vmmUserspaceExits += 1
        default: break
        }
    }

    // MARK: memslots (KVM_SET_USER_MEMORY_REGION): MemslotChanges.swift
}
