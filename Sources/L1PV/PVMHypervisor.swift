import ABI
import GuestDevices
import Transport
#if canImport(Glibc)
import Glibc
#endif

/// L1 as the PVM RFC's hypervisor (pvm-rfc): L2 runs deprivileged behind a switcher, and every
/// exit L2 takes (CPUID, MSRs, I/O, hypercalls, the exceptions it does not handle in place,
/// CR3 loads, INVLPG, shadow page faults) comes straight here through the switcher lane in L1's
/// memory, with no L0 transition. L1 handles them all itself: its device model, its CPUID table
/// and its shadow MMU (`ShadowMMU`) for L2's memory. L1 is an ordinary one-level guest of L0: the
/// only exits it takes are its own (here: passing L2's harness calls on).
public final class PVMHypervisor {
    let cpu: L1CPU
    let memory: L1Memory
    let switcher: SwitcherView
    let policy: WaitPolicy
    var devices = L1Devices()
    var mmu: ShadowMMU!
    /// This vCPU, and how many the VM has: each vCPU's shadow MMU has its own slice of the pool
    /// (several vCPUs run only the programs without L2 paging, whose shadow tables are each
    /// vCPU's own identity map).
    let index: Int, vcpus: Int

    public init(cpu: L1CPU, memory: L1Memory, session: TierSession) throws {
        self.cpu = cpu
        self.memory = memory
        self.switcher = try SwitcherView(memory: session.hostMemory, l1Base: session.launch.l1Slot.hostOffset, vcpu: session.vcpu)
        self.policy = session.policy
        self.index = session.vcpu
        self.vcpus = session.launch.layout.vcpuCount
    }

    public func run() throws -> Never {
        try switcher.reset()
        let sw = switcher
        let slice = L1MemoryPlan.ept12PoolSize / UInt64(vcpus) / pageSize * pageSize
        mmu = ShadowMMU(memory: L1ShadowMemory(memory: memory),
                        pool: AddressRange(start: L1MemoryPlan.ept12Pool + UInt64(index) * slice, length: slice)!,
                        backing: .init(translate: L1MemoryPlan.backing(of:)),
                        count: { c, n in sw.count(c, n) })
        let page = switcher.run
        page[register: .rip] = L1MemoryPlan.l2EntryRIP
        page[register: .rsp] = L1MemoryPlan.l2StackTop
        page[register: .rflags] = 0x2
        while true {
            enterL2()
            try handleExit(page)
        }
    }

    /// Through the switcher into L2: the shadow root it walks and a TLB flush if one is due,
    /// then the turn; back when L2 exits (or exits 0 when L0 stops the stack).
    func enterL2() {
        switcher[SwitcherLayout.shadowRoot] = mmu.root.raw
        if mmu.takeFlushRequest() { switcher[SwitcherLayout.flushGeneration] &+= 1 }
        switcher.count(.entries)
        switcher.lane.pass(to: .l2)
        guard switcher.wait(for: .l1, policy: policy) else { exit(0) }
    }

    /// Injects an exception into L2 at the next entry (the switcher's event delivery).
    func inject(_ vector: ExceptionVector, errorCode: UInt32 = 0, cr2: UInt64 = 0, _ page: RunPageView) {
        page[RunPage.eventInjection] = 1 << 31 | 3 << 8 | UInt64(vector.rawValue)
        page[RunPage.eventErrorCode] = UInt64(errorCode)
        switcher[SwitcherLayout.injectedCR2] = cr2
        switcher.count(.injectedEvents)
    }

    /// One exit of L2, from the switcher's run page; L1 edits L2's registers there.
    func handleExit(_ page: RunPageView) throws {
        let reason = page.exitReason
        let q = page[RunPage.exitQualification]
        var regs = page
        switch reason {
        case .exceptionNMI:
            let vector = UInt8(truncatingIfNeeded: page[RunPage.exitInterruptionInfo])
            if vector == ExceptionVector.pageFault.rawValue {
                try shadowFault(page, gva: L2GVA(q), errorCode: UInt32(truncatingIfNeeded: page[RunPage.exitInterruptionErrorCode]))
                return
            }
            // Anything else L2 raised is L2's to handle: delivered back to its handler. #BP is a
            // trap (L2 goes on after INT3); the others are faults (the instruction runs again).
            guard let v = ExceptionVector(rawValue: vector) else { throw L1Fault.unexpectedExit(reason, "vector \(vector)") }
            inject(v, errorCode: UInt32(truncatingIfNeeded: page[RunPage.exitInterruptionErrorCode]), page)
            if v == .breakpoint { page[register: .rip] &+= page[RunPage.instructionLength] }
            return
        case .crAccess where CRAccessQualification.cr(q) == 3 && CRAccessQualification.type(q) == CRAccessQualification.movToCR:
            guard let reg = CRAccessQualification.register(q) else { throw L1Fault.unexpectedExit(reason, "no register") }
            mmu.loadCR3(regs[reg])
        case .invlpg:
            mmu.invlpg(L2GVA(q))
        case .ioInstruction where IOQualification.port(q) == Ucall.port:
            // The harness's port: L0's, passed on with the block's L1 GPA.
            guard let block = L1MemoryPlan.backing(of: L2GPA(regs[.rdi])) else {
                throw L1Fault.unexpectedExit(reason, "ucall block \(L2GPA(regs[.rdi])) outside L2's RAM")
            }
            try cpu.ucall(block: block)
        case .vmcall:
            devices.l2Hypercall(&regs, isRAM: { L1MemoryPlan.backing(of: $0) != nil }) { gpa in mmu.remove(gpa) }
        default:
            guard devices.emulate(reason, qualification: q, accessSize: page[RunPage.instructionInfo], &regs) else {
                throw L1Fault.unexpectedExit(reason, "the PVM L1 has no handler")
            }
            if reason == .ioInstruction {
                switcher.count(L1Devices.kernelPorts.contains(IOQualification.port(q)) ? .kernelDeviceAccesses : .vmmUserspaceExits)
            }
        }
        page[register: .rip] &+= page[RunPage.instructionLength]
    }

    /// A #PF L2's CPU took on the shadow tables: fixed (L2 retries), L2's own (#PF injected),
    /// MMIO (emulated, L2 goes on), or a write to an L2 page table (emulated, L2 goes on).
    func shadowFault(_ page: RunPageView, gva: L2GVA, errorCode: UInt32) throws {
        var access: PageWalk.Access = []
        if errorCode & PageWalk.ErrorCode.write != 0 { access.insert(.write) }
        if errorCode & PageWalk.ErrorCode.user != 0 { access.insert(.user) }
        if errorCode & PageWalk.ErrorCode.fetch != 0 { access.insert(.fetch) }
        let size = page[RunPage.instructionInfo]
        var regs = page
        switch mmu.fault(gva, access) {
        case .fixed:
            return
        case .inject(let code):
            inject(.pageFault, errorCode: code, cr2: gva.raw, page)
            return
        case .injectGeneralProtection:
            inject(.generalProtection, page)
            return
        case .mmio(let gpa):
            switcher.count(.mmioEmulations)
            let q = access.contains(.write) ? EPTViolationQualification.dataWrite : EPTViolationQualification.dataRead
            _ = devices.emulate(.eptViolation, qualification: q, accessSize: size, gpa: gpa, &regs)
            switcher.count(.vmmUserspaceExits)
        case .emulateWrite(let gpa):
            guard let l1 = L1MemoryPlan.backing(of: gpa) else { throw L1Fault.unexpectedExit(.exceptionNMI, "emulated write outside RAM") }
            let value = regs[.rax]
            switch size {
            case 1: try memory.store8(UInt8(truncatingIfNeeded: value), l1)
            case 2: try memory.store16(UInt16(truncatingIfNeeded: value), l1)
            case 4: try memory.store32(UInt32(truncatingIfNeeded: value), l1)
            default: try memory.store64(value, l1)
            }
            mmu.emulatedWrite(at: gpa)
        }
        page[register: .rip] &+= page[RunPage.instructionLength]
    }
}

/// L1's memory as the shadow MMU reads and writes it.
struct L1ShadowMemory: ShadowMMUMemory {
    let memory: L1Memory
    func load(_ gpa: L1GPA) -> UInt64? { try? memory.load64(gpa) }
    @discardableResult func store(_ gpa: L1GPA, _ value: UInt64) -> Bool { (try? memory.store64(value, gpa)) != nil }
}
