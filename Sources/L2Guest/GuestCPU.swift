import ABI
import Transport
#if canImport(Glibc)
import Glibc
#endif

/// The result of CPUID.
public struct CPUIDResult: Equatable, Sendable {
    public var eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32
}

/// L2's CPU: what a guest program executes on. Sensitive instructions exit to L0 through the L2
/// run page; loads and stores go straight to host memory through EPT02, and exit as an EPT
/// violation where EPT02 has no (sufficient) entry. After every exit the CPU looks at RIP, as
/// hardware resumes wherever the hypervisor left it: advanced past the instruction means it was
/// emulated, unchanged means "execute it again" (e.g. after the page was mapped).
public final class GuestCPU {
    let port: ExitPort
    var run: RunPageView { port.run }
    let memory: HostMemory
    /// EPT02 as L0 writes it: this CPU's MMU.
    let ept02: EPT02TableView
    /// vmcs02's MSR bitmap and the pass-through MSR values it lets L2 reach without an exit.
    let msrBitmap: MSRBitmapView
    let passthroughMSRs: PassthroughMSRValues
    /// The CR0/CR4 guest/host masks L2 runs with (index 0 CR0, 1 CR4), and this CPU's own CR0
    /// and CR4: a MOV to CR0/CR4 that changes only guest-owned bits completes with no exit.
    let crMasks: U64TableView
    /// What this CPU counts of its own work (`L2EventCounter`): syscalls, exceptions, TLB misses.
    let events: U64TableView
    /// L0's tables as this process maps them (read-only): only the defence-testing programs touch it.
    let tables: SharedRegion
    var cr0 = ControlRegisterBits.initialCR0
    var cr4 = ControlRegisterBits.initialCR4
    /// L2's first stage (its own page tables, from CR3) and its TLB: nil until the program loads
    /// CR3, and then a guest-virtual address is walked through L2's tables. Before that (the
    /// GPA-only programs) a virtual address is the guest-physical one, as if through an identity
    /// map the TLB never misses.
    var addressSpace: PageWalk.Context?
    var tlb = GuestTLB<L2GPA>()
    /// Privilege and the exception/syscall entry (GuestPrivilege.swift).
    var privilege = Privilege()
    /// RFLAGS.IF and the interrupt handlers (GuestSMP.swift).
    var interrupts = GuestInterrupts()
    /// Where this guest keeps its ucall block (guest-physical, in its own RAM): each vCPU its
    /// own, side by side in one page.
    public var ucallBlock = L2GPA(0x1000)
    /// This CPU's vCPU index and how many the VM has (KVM selftests hand guest_code its vCPU id).
    public let vcpuIndex: Int
    public let vcpuCount: Int
    var rip: UInt64 = 0

    /// pvm-rfc: the switcher area in L1's memory. L2's exits go to L1 through it, and its MMU
    /// walks L1's shadow tables (GuestShadowMMU.swift) instead of L2's tables and EPT02.
    let switcher: SwitcherView?
    var shadowTLB = GuestTLB<L1GPA>()
    /// The switcher's flush generation this CPU's TLB is current with.
    var flushSeen: UInt64 = 0

    init(session: TierSession) throws {
        self.vcpuIndex = session.vcpu
        self.vcpuCount = session.launch.layout.vcpuCount
        precondition(UInt64(vcpuCount) * Ucall.size <= pageSize, "\(vcpuCount) ucall blocks do not fit in a page")
        self.ucallBlock = L2GPA(0x1000) + UInt64(session.vcpu) * Ucall.size
        if session.launch.path.usesSwitcher {
            let sw = try SwitcherView(memory: session.hostMemory, l1Base: session.launch.l1Slot.hostOffset, vcpu: session.vcpu)
            self.switcher = sw
            self.port = ExitPort(session: session, switcher: sw)
        } else {
            self.switcher = nil
            self.port = ExitPort(session: session)
        }
        self.memory = session.hostMemory
        let control = session.l2Control()
        self.ept02 = control.ept02
        self.msrBitmap = control.msrBitmap
        self.passthroughMSRs = control.passthroughMSRs
        self.crMasks = control.crGuestHostMasks
        self.events = control.events
        self.tables = control.tables
    }

    /// True while the harness's ucall runs: its own accesses are not the program's work, so
    /// they stay out of L2's event counters (and out of a measurement window).
    var inHarness = false

    @inline(__always)
    func count(_ e: L2EventCounter) { if !inHarness { events[UInt64(e.rawValue)] &+= 1 } }

    /// Waits for the first entry and takes the RIP L0 entered with.
    func waitForFirstEntry() {
        port.waitForFirstEntry()
        rip = run[register: .rip]
        honourFlushRequest()
    }

    enum Resumption: Equatable { case completed, retry, fault(UInt8) }

    /// One exit to L0 and back. The run page carries the exit; RIP tells what happened.
    @inline(__always)
    func vmexit(_ reason: ExitReason, length: UInt64, qualification: UInt64 = 0, gpa: L2GPA = L2GPA(0), info: UInt64 = 0) -> Resumption {
        if switcher != nil { return switcherExit(reason, length: length, qualification: qualification, gpa: gpa, info: info) }
        let event = exitAndEnter(reason, length: length, qualification: qualification, gpa: gpa, info: info)
        let newRIP = run[register: .rip]
        // An injected exception becomes the instruction's fault, which the program sees (as
        // selftests' rdmsr_safe does); an external interrupt is taken after the instruction,
        // through the program's handler (GuestSMP.swift).
        if let event, event.isHardwareException { return .fault(event.vector) }
        let outcome: Resumption = newRIP == rip ? .retry : .completed
        rip = newRIP
        if let event, event.isExternalInterrupt { takeInterrupt(event.vector) }
        if run[RunPage.timerDeadline] != 0 { takeTimerExits() }
        return outcome
    }

    /// The VMX-preemption timer its hypervisor armed (`RunPage.timerDeadline`): once the guest
    /// clock reaches it the CPU exits PREEMPTION_TIMER before its next instruction, whatever
    /// RFLAGS.IF says (a deadline already passed at the entry exits at once, as a zero timer
    /// does). The hypervisor fires the timer and moves or clears the deadline; an interrupt it
    /// injects is taken on the way back.
    func takeTimerExits() {
        while true {
            let deadline = run[RunPage.timerDeadline]
            guard deadline != 0, now() >= deadline else { return }
            let event = exitAndEnter(.preemptionTimer, length: 0)
            rip = run[register: .rip]
            if let event, event.isExternalInterrupt { takeInterrupt(event.vector) }
        }
    }

    /// The exit itself and the entry after it: RIP and RFLAGS out, the exit, a TLB flush the
    /// hypervisor asked for at the entry; the event it injected, if any.
    @inline(__always)
    func exitAndEnter(_ reason: ExitReason, length: UInt64, qualification: UInt64 = 0, gpa: L2GPA = L2GPA(0),
                      info: UInt64 = 0) -> ExitPort.Event? {
        run[register: .rip] = rip
        run[register: .rflags] = interrupts.enabled ? 0x202 : 0x2
        let event = port.exit(reason, length: length, qualification: qualification, gpa: gpa, info: info)
        honourFlushRequest()
        return event
    }

    // MARK: instructions that always exit

    public func cpuid(_ leaf: UInt32, _ subleaf: UInt32 = 0) -> CPUIDResult {
        repeat {
            run[register: .rax] = UInt64(leaf)
            run[register: .rcx] = UInt64(subleaf)
        } while vmexit(.cpuid, length: 2) == .retry
        return CPUIDResult(eax: UInt32(truncatingIfNeeded: run[register: .rax]),
                           ebx: UInt32(truncatingIfNeeded: run[register: .rbx]),
                           ecx: UInt32(truncatingIfNeeded: run[register: .rcx]),
                           edx: UInt32(truncatingIfNeeded: run[register: .rdx]))
    }

    /// L2's MSR bitmap lets this access through without an exit (a pass-through MSR, bit clear).
    @inline(__always)
    func passesThrough(_ msr: UInt32, write: Bool) -> Bool {
        switcher == nil && PassthroughMSRs.contains(msr) && !msrBitmap.intercepts(msr, write: write)
    }

    /// RDMSR; the vector if it faulted (selftests' rdmsr_safe).
    public func rdmsrSafe(_ msr: UInt32) -> (value: UInt64, fault: UInt8?) {
        if passesThrough(msr, write: false), let v = passthroughMSRs[msr] { return (v, nil) }
        var r: Resumption
        repeat {
            run[register: .rcx] = UInt64(msr)
            r = vmexit(.msrRead, length: 2)
        } while r == .retry
        if case .fault(let v) = r { return (0, v) }
        return (EDXEAX.combine(edx: run[register: .rdx], eax: run[register: .rax]), nil)
    }

    /// WRMSR; the vector if it faulted (selftests' wrmsr_safe).
    @discardableResult
    public func wrmsrSafe(_ msr: UInt32, _ value: UInt64) -> UInt8? {
        if passesThrough(msr, write: true) {
            passthroughMSRs[msr] = value
            return nil
        }
        var r: Resumption
        repeat {
            run[register: .rcx] = UInt64(msr)
            (run[register: .rdx], run[register: .rax]) = EDXEAX.split(value)
            r = vmexit(.msrWrite, length: 2)
        } while r == .retry
        if case .fault(let v) = r { return v }
        return nil
    }

    public func rdmsr(_ msr: UInt32) -> UInt64 {
        let (v, fault) = rdmsrSafe(msr)
        guestAssert(fault == nil, "RDMSR 0x\(String(msr, radix: 16)) faulted with vector \(fault ?? 0)")
        return v
    }

    public func wrmsr(_ msr: UInt32, _ value: UInt64) {
        let fault = wrmsrSafe(msr, value)
        guestAssert(fault == nil, "WRMSR 0x\(String(msr, radix: 16)) faulted with vector \(fault ?? 0)")
    }

    /// IN of `size` bytes (1, 2 or 4) from `port`.
    public func inPort(_ port: UInt16, size: Int = 4) -> UInt64 {
        repeat { run[register: .rdx] = UInt64(port) } while vmexit(.ioInstruction, length: size == 2 ? 2 : 1,
            qualification: IOQualification.make(port: port, size: size, isIn: true)) == .retry
        return run[register: .rax] & AccessSize.mask(UInt64(size))
    }

    public func outPort(_ port: UInt16, _ value: UInt64, size: Int = 4) {
        repeat {
            run[register: .rdx] = UInt64(port)
            run[register: .rax] = value
        } while vmexit(.ioInstruction, length: size == 2 ? 2 : 1,
                       qualification: IOQualification.make(port: port, size: size, isIn: false)) == .retry
    }

    public func hlt() { while vmexit(.hlt, length: 1) == .retry {} }

    public func wbinvd() { while vmexit(.wbinvd, length: 2) == .retry {} }

    /// MOV to CR0/CR3/CR4/CR8 from RAX. CR0 and CR4: no exit when only bits the guest owns
    /// change (the guest/host mask the hypervisors set). CR3: no exit on these paths, as KVM
    /// clears CR3-load exiting when it has EPT (and a KVM L1 does too): it switches L2's page
    /// tables and flushes its TLB (0 turns L2's first stage off again). CR8: an exit.
    /// On pvm-rfc L2 runs deprivileged: every MOV to a CR traps to L1 through the switcher.
    public func writeCR(_ n: UInt64, _ value: UInt64) {
        if n == 3 && switcher == nil {
            loadCR3(value)
            return
        }
        if (n == 0 || n == 4) && switcher == nil {
            let current = n == 0 ? cr0 : cr4
            if (value ^ current) & crMasks[n == 0 ? 0 : 1] == 0 {
                if n == 0 { cr0 = value } else { cr4 = value }
                return
            }
        }
        repeat { run[register: .rax] = value } while vmexit(.crAccess, length: 3,
            qualification: CRAccessQualification.make(cr: n, type: CRAccessQualification.movToCR, register: .rax)) == .retry
        if n == 0 { cr0 = value } else if n == 4 { cr4 = value } else if n == 3 { loadCR3(value) }
    }

    /// MOV from CR0/CR3/CR4 (never an exit: the CPU has them, CR3 as CR3-store exiting is off
    /// with EPT) or CR8 (an exit) into RAX.
    public func readCR(_ n: UInt64) -> UInt64 {
        if n == 0 { return cr0 }
        if n == 4 { return cr4 }
        if n == 3 { return addressSpace?.cr3 ?? 0 }
        while vmexit(.crAccess, length: 3,
                     qualification: CRAccessQualification.make(cr: n, type: CRAccessQualification.movFromCR, register: .rax)) == .retry {}
        return run[register: .rax]
    }

    /// MOV to DR`n` from RAX (every MOV DR exits in this CPU model).
    public func writeDR(_ n: UInt64, _ value: UInt64) {
        repeat { run[register: .rax] = value } while vmexit(.drAccess, length: 3,
            qualification: DRAccessQualification.make(dr: n, toDR: true, register: .rax)) == .retry
    }

    /// VMCALL with KVM's convention: number in RAX, arguments in RBX, RCX, RDX, RSI; result in RAX.
    public func vmcall(_ nr: UInt64, _ a0: UInt64 = 0, _ a1: UInt64 = 0, _ a2: UInt64 = 0, _ a3: UInt64 = 0) -> UInt64 {
        repeat {
            run[register: .rax] = nr; run[register: .rbx] = a0; run[register: .rcx] = a1
            run[register: .rdx] = a2; run[register: .rsi] = a3
        } while vmexit(.vmcall, length: 3) == .retry
        return run[register: .rax]
    }

    /// The time-stamp counter as an unintercepted RDTSC would read it (ns, monotonic).
    @inline(__always)
    public func now() -> UInt64 { monotonicNanos() }

    // MARK: memory

    /// EPT02 says where an L2 page lives for this access, or nil (an EPT violation).
    @inline(__always)
    func translate(_ gpa: L2GPA, access: UInt64) -> HostOffset? { ept02.lookup(gpa, access: access) }

    /// Fetches one instruction byte at `gpa` (a jump there): needs execute permission.
    public func fetch(_ gpa: L2GPA) -> UInt8 { fetch(L2GVA(directMap: gpa)) }

    /// Fetches one instruction byte at `gva` (a jump there): L2's tables must allow execution.
    public func fetch(_ gva: L2GVA) -> UInt8 {
        if switcher != nil {
            return UInt8(truncatingIfNeeded: shadowAccess(gva, size: 1, kind: [.fetch]))
        }
        let gpa = firstStage(gva, .fetch)
        while true {
            if let host = translate(gpa, access: EPT.execute), let b: UInt8 = try? memory.load(at: host) { return b }
            run[register: .rax] = 0
            if vmexit(.eptViolation, length: 1, qualification: EPTViolationQualification.instructionFetch,
                      gpa: gpa, info: 1) == .completed {
                return UInt8(truncatingIfNeeded: run[register: .rax])
            }
        }
    }

    /// The load or store itself, in host memory, once a translation gave `host`: 1, 2, 4 or 8
    /// bytes; a load returns the value, a store 0. Throws outside this process's mapping.
    @inline(__always)
    func hostAccess(_ host: HostOffset, size: Int, write: Bool, value: UInt64) throws -> UInt64 {
        if write {
            switch size {
            case 1: try memory.store(UInt8(truncatingIfNeeded: value), at: host)
            case 2: try memory.store(UInt16(truncatingIfNeeded: value), at: host)
            case 4: try memory.store(UInt32(truncatingIfNeeded: value), at: host)
            default: try memory.store(value, at: host)
            }
            return 0
        }
        switch size {
        case 1: return UInt64(try memory.load(UInt8.self, at: host))
        case 2: return UInt64(try memory.load(UInt16.self, at: host))
        case 4: return UInt64(try memory.load(UInt32.self, at: host))
        default: return try memory.load(UInt64.self, at: host)
        }
    }

    /// A naturally aligned load or store of 1, 2, 4 or 8 bytes at a guest-physical address
    /// (`mov` with RAX as the data register): the second stage alone. Exits as an EPT violation
    /// when unmapped; if the hypervisor emulates it (MMIO), the loaded value comes back in RAX.
    func physicalAccess(_ gpa: L2GPA, size: Int, write: Bool, value: UInt64 = 0) -> UInt64 {
        guard gpa.raw % UInt64(size) == 0 else {
            // A program's bug, reported as its own failed assertion (the stack stops with it).
            guestAssert(false, "\(size)-byte access at \(gpa) is not naturally aligned")
            return 0
        }
        let mask = AccessSize.mask(UInt64(size))
        while true {
            if let host = translate(gpa, access: write ? EPT.write : EPT.read) {
                do {
                    return try hostAccess(host, size: size, write: write, value: value)
                } catch {
                    // EPT02 pointing outside host memory would be an L0 bug; never touch it.
                    fatalError("L2 MMU: EPT02 entry for \(gpa) points outside host memory")
                }
            }
            run[register: .rax] = write ? value & mask : 0
            let q = write ? EPTViolationQualification.dataWrite : EPTViolationQualification.dataRead
            switch vmexit(.eptViolation, length: 3, qualification: q, gpa: gpa, info: UInt64(size)) {
            case .completed: return write ? 0 : run[register: .rax] & mask
            case .retry: continue
            case .fault(let v):
                guestAssert(false, "access to \(gpa) faulted with vector \(v)")
                return 0
            }
        }
    }

    // An L2GPA given to these is reached as L2's kernel reaches physical memory: directly while
    // L2 has no page tables, through its direct map (the same virtual address) once it has.
    public func read64(_ gpa: L2GPA) -> UInt64 { access(L2GVA(directMap: gpa), size: 8, write: false) }
    public func write64(_ gpa: L2GPA, _ v: UInt64) { _ = access(L2GVA(directMap: gpa), size: 8, write: true, value: v) }
    public func read32(_ gpa: L2GPA) -> UInt32 { UInt32(truncatingIfNeeded: access(L2GVA(directMap: gpa), size: 4, write: false)) }
    public func write32(_ gpa: L2GPA, _ v: UInt32) { _ = access(L2GVA(directMap: gpa), size: 4, write: true, value: UInt64(v)) }
    public func read8(_ gpa: L2GPA) -> UInt8 { UInt8(truncatingIfNeeded: access(L2GVA(directMap: gpa), size: 1, write: false)) }
    public func write8(_ gpa: L2GPA, _ v: UInt8) { _ = access(L2GVA(directMap: gpa), size: 1, write: true, value: UInt64(v)) }
    public func read64(_ gva: L2GVA) -> UInt64 { access(gva, size: 8, write: false) }
    public func write64(_ gva: L2GVA, _ v: UInt64) { _ = access(gva, size: 8, write: true, value: v) }
}
