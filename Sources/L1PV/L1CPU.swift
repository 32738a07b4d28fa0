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
    let run: RunPageView
    let session: TierSession
    let control: SharedRegion
    let layout: ControlLayout
    let shadow: VMCSImage
    let shadowActiveFlag: UInt64
    /// With an enlightened VMCS, VMREAD/VMWRITE are plain accesses to it (no exit); a write
    /// clears its field group's clean bit, as Hyper-V's evmcs_write does.
    public private(set) var evmcs: VMCSImage?
    public func useEnlightenedVMCS(_ image: VMCSImage) { evmcs = image }

    public init(session: TierSession) throws {
        let control = session.control, layout = session.launch.layout, vcpu = session.launch.vcpu
        self.session = session
        self.run = try session.runPage()
        self.control = control
        self.layout = layout
        self.shadow = try VMCSImage(region: control, base: layout.shadowVMCS(vcpu))
        self.shadowActiveFlag = layout.handoff(vcpu) + HandoffLayout.shadowVMCSActive
    }

    public func waitForFirstEntry() { session.waitForTurn() }

    /// Exits to L0 and waits to be entered again. Throws if L0 injected #UD.
    func vmexit(_ reason: ExitReason, length: UInt64, operand: UInt64 = 0, info: UInt64 = 0) throws {
        run.exitReason = reason
        run[RunPage.instructionLength] = length
        run[RunPage.vmxOperand] = operand
        run[RunPage.instructionInfo] = info
        session.exitToL0()
        let event = run[RunPage.eventInjection]
        if event & (1 << 31) != 0 {
            run[RunPage.eventInjection] = 0
            if event & 0xFF == 6 { throw L1Fault.undefinedOpcode(reason.name) }
        }
    }

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
    public func hypercall(_ call: PVHypercall, _ a0: UInt64 = 0, _ a1: UInt64 = 0, _ a2: UInt64 = 0, _ a3: UInt64 = 0) throws -> UInt64 {
        let r = try vmcall(call.rawValue, a0, a1, a2, a3)
        if let e = HypercallError.from(returnValue: r) { throw L1Fault.hypercallFailed(call, e) }
        return r
    }

    // MARK: VMX instructions

    public func vmxon(_ region: L1GPA) throws -> VMXInstructionResult {
        try vmexit(.vmxon, length: 4, operand: region.raw); return lastResult
    }
    public func vmclear(_ vmcs: L1GPA) throws -> VMXInstructionResult {
        try vmexit(.vmclear, length: 4, operand: vmcs.raw); return lastResult
    }
    public func vmptrld(_ vmcs: L1GPA) throws -> VMXInstructionResult {
        try vmexit(.vmptrld, length: 4, operand: vmcs.raw); return lastResult
    }
    public func invept(type: UInt64, eptp: UInt64) throws -> VMXInstructionResult {
        run[register: .rax] = type
        try vmexit(.invept, length: 5, operand: eptp, info: VMXInstructionInfo.make(typeRegister: .rax)); return lastResult
    }

    @inline(__always)
    func bitmapAllows(_ bitmap: UInt64, _ f: VMCSField) -> Bool {
        guard control.unchecked(load: UInt32.self, at: shadowActiveFlag) != 0, f.rawValue <= 0x7FFF else { return false }
        let byte = control.unchecked(load: UInt8.self, at: bitmap + UInt64(f.rawValue) / 8)
        return byte & (1 << UInt8(f.rawValue % 8)) == 0
    }

    static let vmxInfo = VMXInstructionInfo.make(valueRegister: .rax, fieldRegister: .rdx)

    /// A store to a page L0 write-protected: L1's own EPT violation; L0 emulates the store.
    public func trappedStore(_ value: UInt64, size: Int, at gpa: L1GPA) throws {
        run[register: .rax] = value
        run[RunPage.guestPhysicalAddress] = gpa.raw
        run[RunPage.exitQualification] = EPTViolationQualification.dataWrite
        try vmexit(.eptViolation, length: 3, info: UInt64(size))
    }

    public func isWriteProtected(_ gpa: L1GPA) -> Bool {
        let page = gpa.pageNumber
        guard page < ControlLayout.l1WriteProtectLimit / pageSize else { return false }
        return control.unchecked(load: UInt8.self, at: layout.l1WriteProtectBitmap + page / 8) & (1 << UInt8(page % 8)) != 0
    }

    /// WRMSR / RDMSR of one of L1's own MSRs: an exit to L0.
    public func wrmsr(_ msr: UInt32, _ value: UInt64) throws {
        run[register: .rcx] = UInt64(msr)
        run[register: .rax] = value & 0xFFFF_FFFF
        run[register: .rdx] = value >> 32
        try vmexit(.msrWrite, length: 2)
    }

    /// VMREAD: from the eVMCS, or from the shadow VMCS if the VMREAD bitmap bit is clear, else an exit.
    public func vmread(_ f: VMCSField) throws -> UInt64 {
        if let evmcs {
            guard let v = evmcs.read(f) else { throw L1Fault.vmxFailure("VMREAD \(f)", .failValid(.unsupportedVMCSComponent)) }
            return v
        }
        if bitmapAllows(layout.vmreadBitmap, f), let v = shadow.read(f) { return v }
        run[register: .rdx] = UInt64(f.rawValue)
        try vmexit(.vmread, length: 3, info: Self.vmxInfo)
        let r = lastResult
        guard r == .succeed else { throw L1Fault.vmxFailure("VMREAD \(f)", r) }
        return run[register: .rax]
    }

    /// VMWRITE: to the eVMCS, or to the shadow VMCS if the VMWRITE bitmap bit is clear, else an exit.
    public func vmwrite(_ f: VMCSField, _ value: UInt64) throws -> VMXInstructionResult {
        if let evmcs {
            guard !f.isReadOnly, evmcs.write(f, value) else { return .failValid(.unsupportedVMCSComponent) }
            if let g = EnlightenedVMCS.group(of: f) {
                let at = evmcs.base + EnlightenedVMCS.cleanFieldsOffset
                evmcs.region.unchecked(store: evmcs.region.unchecked(load: UInt32.self, at: at) & ~g.bit, at: at)
            }
            return .succeed
        }
        if bitmapAllows(layout.vmwriteBitmap, f), shadow.write(f, value) { return .succeed }
        run[register: .rdx] = UInt64(f.rawValue)
        run[register: .rax] = value
        try vmexit(.vmwrite, length: 3, info: Self.vmxInfo)
        return lastResult
    }

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
        return .vmExit
    }
}
