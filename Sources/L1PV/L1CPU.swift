import ABI
import GuestDevices
import Transport
#if canImport(Glibc)
import Glibc
#endif

/// How VMLAUNCH / VMRESUME came back to L1.
public enum VMEntryOutcome: Equatable, Sendable {
    /// L2 ran and exited to L1: L1 continues at HOST_RIP; exit information is in vmcs12.
    case vmExit
    /// The instruction failed (VMfailInvalid / VMfailValid): L1 continues after it.
    case failed(VMXInstructionResult)
}

/// L1's CPU: VMCALL and the VMX instructions, each an exit to L0 through the L1 run page; with
/// VMCS shadowing on, VMREAD/VMWRITE of shadowed fields go to the shadow VMCS without an exit,
/// exactly when the VMREAD/VMWRITE bitmaps L0 set say so.
public final class L1CPU: L1StoreTrap {
    let port: ExitPort
    var run: RunPageView { port.run }
    let shadow: VMCSImage
    let shadowActive: SharedFlag
    let vmreadBitmap: BitmapView, vmwriteBitmap: BitmapView
    let writeProtect: BitmapView
    /// With an enlightened VMCS, VMREAD/VMWRITE are plain accesses to it (no exit); a write
    /// clears its field group's clean bit, as Hyper-V's evmcs_write does.
    public private(set) var evmcs: VMCSImage?
    public func useEnlightenedVMCS(_ image: VMCSImage) { evmcs = image }

    public init(session: TierSession) {
        let control = session.l1Control()
        self.port = ExitPort(session: session)
        self.shadow = control.shadowVMCS
        self.shadowActive = control.shadowVMCSActive
        self.vmreadBitmap = control.vmreadBitmap
        self.vmwriteBitmap = control.vmwriteBitmap
        self.writeProtect = control.l1WriteProtect
    }

    public func waitForFirstEntry() { port.waitForFirstEntry() }

    /// The vector one L1 vCPU kicks another with (Linux's RESCHEDULE_VECTOR).
    public static let kickVector: UInt8 = 0xFD
    /// The vector of L1's own APIC timer (Linux's LOCAL_TIMER_VECTOR), in TSC-deadline mode.
    public static let timerVector: UInt8 = 0xEC

    /// Run for each interrupt L0 injects into this CPU, before its EOI: the hypervisor's
    /// interrupt handler (it notes what to look at before its next VMRESUME).
    public var interruptHandler: ((UInt8) -> Void)?

    /// Exits to L0 and waits to be entered again. Throws if L0 injected #UD. An interrupt L0
    /// injected (another vCPU's kick, L1's own timer) is taken after the instruction: its
    /// handler is `interruptHandler` and an EOI, and what it was about is looked at before the
    /// next VMRESUME.
    func vmexit(_ reason: ExitReason, length: UInt64, operand: UInt64 = 0, info: UInt64 = 0,
                qualification: UInt64 = 0, gpa: L1GPA = L1GPA(0)) throws {
        guard let event = port.exit(reason, length: length, qualification: qualification, gpa: gpa, info: info, operand: operand) else { return }
        if event.isHardwareException && event.vector == 6 { throw L1Fault.undefinedOpcode(reason.name) }
        if event.isExternalInterrupt {
            // Saved across the handler: the instruction's results and the exit it reports are
            // in the run page (its registers and the exit and entry slots, 0x000-0x077).
            let saved = run.registers
            let slots = stride(from: UInt64(0), to: RunPage.kick, by: 8).map { run[$0] }
            interruptHandler?(event.vector)
            try wrmsr(LocalAPICMSR.eoi, 0)
            run.registers = saved
            for (i, v) in slots.enumerated() where UInt64(i) * 8 != RunPage.eventInjection { run[UInt64(i) * 8] = v }
        }
    }

    /// HLT: L1's vCPU has nothing to run until an interrupt comes (L0 blocks it until then).
    public func hlt() throws { try vmexit(.hlt, length: 1) }

    /// The register file as L1 left it or L0 loaded it (after a VM exit: L2's GPRs).
    public subscript(r: Register) -> UInt64 {
        get { run[register: r] }
        set { run[register: r] = newValue }
    }

    var lastResult: VMXInstructionResult {
        switch run[RunPage.vmxResult] {
        case 0: .succeed
        case 1: .failInvalid
        default: .failValid(VMInstructionError(rawValue: UInt32(run[RunPage.vmInstructionError])) ?? .entryInvalidControlField)
        }
    }

    // MARK: hypercalls

    /// VMCALL: number in RAX, arguments in RBX, RCX, RDX, RSI; result in RAX.
    public func vmcall(_ nr: UInt64, _ a0: UInt64 = 0, _ a1: UInt64 = 0, _ a2: UInt64 = 0, _ a3: UInt64 = 0) throws -> UInt64 {
        run[register: .rax] = nr
        run[register: .rbx] = a0; run[register: .rcx] = a1; run[register: .rdx] = a2; run[register: .rsi] = a3
        try vmexit(.vmcall, length: 3)
        return run[register: .rax]
    }

    /// A PV hypercall that must succeed.
    @discardableResult
    public func hypercall(_ call: PVHypercall, _ args: any HypercallArgument...) throws -> UInt64 {
        let a = args.map(\.registerValue) + [0, 0, 0, 0]
        let r = try vmcall(call.rawValue, a[0], a[1], a[2], a[3])
        if let e = HypercallError.from(returnValue: r) { throw L1Fault.hypercallFailed(call, e) }
        return r
    }

    // MARK: VMX instructions

    public func vmxon(_ region: L1GPA) throws -> VMXInstructionResult {
        try vmexit(.vmxon, length: 4, operand: region.registerValue); return lastResult
    }
    public func vmclear(_ vmcs: L1GPA) throws -> VMXInstructionResult {
        try vmexit(.vmclear, length: 4, operand: vmcs.registerValue); return lastResult
    }
    public func vmptrld(_ vmcs: L1GPA) throws -> VMXInstructionResult {
        try vmexit(.vmptrld, length: 4, operand: vmcs.registerValue); return lastResult
    }
    public func invept(type: UInt64, eptp: UInt64) throws -> VMXInstructionResult {
        run[register: .rax] = type
        try vmexit(.invept, length: 5, operand: eptp, info: VMXInstructionInfo.make(typeRegister: .rax)); return lastResult
    }

    /// VMCS shadowing lets this access through without an exit: a shadow VMCS is linked and the
    /// field's bit is clear in the VMREAD/VMWRITE bitmap.
    @inline(__always)
    func bitmapAllows(_ bitmap: BitmapView, _ f: VMCSField) -> Bool {
        guard shadowActive.isOn, f.rawValue <= 0x7FFF else { return false }
        return !bitmap[UInt64(f.rawValue)]
    }

    static let vmxInfo = VMXInstructionInfo.make(valueRegister: .rax, fieldRegister: .rdx)

    /// A store to a page L0 write-protected: L1's own EPT violation; L0 emulates the store.
    public func trappedStore(_ value: UInt64, size: Int, at gpa: L1GPA) throws {
        run[register: .rax] = value
        try vmexit(.eptViolation, length: 3, info: UInt64(size), qualification: EPTViolationQualification.dataWrite, gpa: gpa)
    }

    public func isWriteProtected(_ gpa: L1GPA) -> Bool {
        let page = gpa.pageNumber
        return page < writeProtect.bitCount && writeProtect[page]
    }

    /// The harness's ucall port, from L1 itself: pvm-rfc's L1 passes its L2's ucall on to L0
    /// (as a VMM passes a guest's port I/O to its host), with the block's L1 GPA in RDI.
    public func ucall(block: L1GPA) throws {
        run[register: .rdi] = block.raw
        try vmexit(.ioInstruction, length: 1, qualification: IOQualification.make(port: Ucall.port, size: 1, isIn: true))
    }

    /// WRMSR / RDMSR of one of L1's own MSRs: an exit to L0.
    public func wrmsr(_ msr: UInt32, _ value: UInt64) throws {
        run[register: .rcx] = UInt64(msr)
        (run[register: .rdx], run[register: .rax]) = EDXEAX.split(value)
        try vmexit(.msrWrite, length: 2)
    }

    /// VMREAD: from the eVMCS, or from the shadow VMCS if the VMREAD bitmap bit is clear, else an exit.
    public func vmread(_ f: VMCSField) throws -> UInt64 {
        if let evmcs {
            guard !EnlightenedVMCS.lacks(f), let v = evmcs.read(f) else { throw L1Fault.vmxFailure("VMREAD \(f)", .failValid(.unsupportedVMCSComponent)) }
            return v
        }
        if bitmapAllows(vmreadBitmap, f), let v = shadow.read(f) { return v }
        run[register: .rdx] = UInt64(f.rawValue)
        try vmexit(.vmread, length: 3, info: Self.vmxInfo)
        let r = lastResult
        guard r == .succeed else { throw L1Fault.vmxFailure("VMREAD \(f)", r) }
        return run[register: .rax]
    }

    /// VMWRITE: to the eVMCS, or to the shadow VMCS if the VMWRITE bitmap bit is clear, else an exit.
    public func vmwrite(_ f: VMCSField, _ value: UInt64) throws -> VMXInstructionResult {
        if let evmcs {
            guard !f.isReadOnly, !EnlightenedVMCS.lacks(f), evmcs.write(f, value) else { return .failValid(.unsupportedVMCSComponent) }
            if let g = EnlightenedVMCS.group(of: f) { evmcs.evmcsCleanFields &= ~g.bit }
            return .succeed
        }
        if bitmapAllows(vmwriteBitmap, f), shadow.write(f, value) { return .succeed }
        run[register: .rdx] = UInt64(f.rawValue)
        run[register: .rax] = value
        try vmexit(.vmwrite, length: 3, info: Self.vmxInfo)
        return lastResult
    }

    /// The decoded access size of the faulting load or store behind the last VM exit (an EPT
    /// violation's): what L1's instruction emulator would learn by decoding the instruction
    /// from L2's memory, as L0 hands it over with the exit.
    public private(set) var exitAccessSize: UInt64 = 0

    /// VMLAUNCH / VMRESUME with L2's GPRs loaded from `guestRegisters` (KVM loads them from its
    /// vcpu struct right before the instruction); on a VM exit, L2's GPRs are saved back there.
    public func enter(launch: Bool, guestRegisters: inout SavedGuestRegisters) throws -> VMEntryOutcome {
        for r in Register.gprsOutsideVMCS {
            run[register: r] = guestRegisters[r]
        }
        try vmexit(launch ? .vmlaunch : .vmresume, length: 3)
        guard run[RunPage.enteredByVMExit] != 0 else { return .failed(lastResult) }
        for r in Register.gprsOutsideVMCS {
            guestRegisters[r] = run[register: r]
        }
        // Taken now: the run page's word is this CPU's own exit information, which L1's next
        // exiting VMREAD (nvmx-noshadow) overwrites.
        exitAccessSize = run[RunPage.instructionInfo]
        return .vmExit
    }
}
