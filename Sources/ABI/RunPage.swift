// The per-vCPU run page, in the spirit of `struct kvm_run`: one between L2 and L0, one between
// L1 and L0, and (same layout) the PV exit page L1 registers for each L2 vCPU. Every slot is a
// little-endian u64 at a fixed offset; the register file follows the slots.

public enum RunPage {
    public static let size: UInt64 = 4096

    // --- exit side: written by the tier that exits (or by L0 when it delivers an exit) ---
    /// Basic exit reason (EXIT_REASON_* from <asm/vmx.h>), bit 31 set for a failed VM entry.
    public static let exitReason: UInt64 = 0x000
    public static let exitQualification: UInt64 = 0x008
    public static let guestPhysicalAddress: UInt64 = 0x010
    public static let guestLinearAddress: UInt64 = 0x018
    public static let instructionLength: UInt64 = 0x020
    /// VMX_INSTRUCTION_INFO for VMREAD/VMWRITE/VMPTRLD... (which registers hold the operands).
    public static let instructionInfo: UInt64 = 0x028
    /// The 64-bit memory operand of VMXON/VMCLEAR/VMPTRLD/VMPTRST/INVEPT, already fetched.
    public static let vmxOperand: UInt64 = 0x030
    /// VM_EXIT_INTR_INFO for exception/NMI exits: bit 31 valid, bits 10:8 type, 7:0 vector.
    public static let exitInterruptionInfo: UInt64 = 0x038

    // --- entry side: written by L0 before it gives the tier its turn ---
    /// Result of the tier's last VMX instruction: 0 VMsucceed, 1 VMfailInvalid, 2 VMfailValid.
    public static let vmxResult: UInt64 = 0x040
    /// For VMfailValid: the VM_INSTRUCTION_ERROR number.
    public static let vmInstructionError: UInt64 = 0x048
    /// Event to inject at the next entry: bit 31 valid, bits 10:8 type, bits 7:0 vector (VM_ENTRY_INTR_INFO).
    public static let eventInjection: UInt64 = 0x050
    public static let eventErrorCode: UInt64 = 0x058
    /// L0 -> L1 on the nvmx path: 1 when L1 is entered through a VM exit of its L2 (VMLAUNCH /
    /// VMRESUME "returned" at HOST_RIP), 0 when its VMX instruction simply completed.
    public static let enteredByVMExit: UInt64 = 0x060
    /// VM_EXIT_INTR_ERROR_CODE: the error code of the exception that caused the exit.
    public static let exitInterruptionErrorCode: UInt64 = 0x068
    /// The tier's own interruptibility state (SDM 25.4.2): bit 0 blocking by STI, bit 1 blocking
    /// by MOV SS. A VMLAUNCH/VMRESUME under MOV-SS blocking VMfails (error 26).
    public static let interruptibility: UInt64 = 0x070
    /// Written by L0 while the tier runs: nonzero when an interrupt waits for this vCPU.
    /// `kickExternal` (kvm_vcpu_kick's IPI): the tier's CPU takes an EXTERNAL_INTERRUPT exit at
    /// its next interrupt window; `kickWindow` (interrupt-window exiting, requested at an
    /// entry with interrupts off): an INTERRUPT_WINDOW exit once interrupts are on. Either
    /// way L0 injects the interrupt at the entry after.
    public static let kick: UInt64 = 0x078
    public static let kickExternal: UInt64 = 1
    public static let kickWindow: UInt64 = 2
    /// Written by L0 before an entry (or while the tier runs, with a kick): nonzero asks the
    /// tier's CPU to flush its whole TLB before it runs guest code again (KVM's
    /// KVM_REQ_TLB_FLUSH_GUEST); the CPU clears it.
    public static let flushTLB: UInt64 = 0x080
    /// Written by L0 before an entry: the guest clock's reading (ns, the CPU's `now()`) at which
    /// the tier's CPU takes a PREEMPTION_TIMER exit, as the VMX-preemption timer KVM arms for a
    /// guest's TSC-deadline timer makes it exit: checked at every entry (a deadline already
    /// passed exits before the next instruction, as a zero timer does) and at every instruction
    /// boundary the CPU models (PAUSE, NOP); 0 = none. On nested VMX the earliest of vmcs12's
    /// emulated preemption timer and L1's own APIC timer.
    public static let timerDeadline: UInt64 = 0x088

    /// General-purpose registers, RIP and RFLAGS, 8 bytes each, in `Register` order.
    public static let registers: UInt64 = 0x100
    public static func offset(of r: Register) -> UInt64 { registers + UInt64(r.rawValue) * 8 }
    public static let registersEnd: UInt64 = registers + UInt64(Register.count) * 8
}

/// The register file carried by a run page, in the order KVM's `struct kvm_regs` uses.
public enum Register: Int, CaseIterable, Sendable {
    case rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags

    public static let count = 18

    /// The SDM's register numbering (exit qualifications, VMX_INSTRUCTION_INFO): RAX 0, RCX 1,
    /// RDX 2, RBX 3, RSP 4, RBP 5, RSI 6, RDI 7, R8-R15 8-15. Not kvm_regs order.
    public init?(sdmNumber n: UInt64) {
        let order: [Register] = [.rax, .rcx, .rdx, .rbx, .rsp, .rbp, .rsi, .rdi,
                                 .r8, .r9, .r10, .r11, .r12, .r13, .r14, .r15]
        guard n < 16 else { return nil }
        self = order[Int(n)]
    }
    public var sdmNumber: UInt64 {
        switch self {
        case .rax: 0
        case .rcx: 1
        case .rdx: 2
        case .rbx: 3
        case .rsp: 4
        case .rbp: 5
        case .rsi: 6
        case .rdi: 7
        case .rip, .rflags: 0xFF
        default: UInt64(rawValue)   // r8-r15: 8-15 in both orders
        }
    }
    /// The registers no VMCS holds (every GPR but RSP): what hardware leaves in the CPU across
    /// a VM exit and software saves and restores. In `Register` order.
    public static let gprsOutsideVMCS: [Register] = [.rax, .rbx, .rcx, .rdx, .rsi, .rdi, .rbp,
                                                     .r8, .r9, .r10, .r11, .r12, .r13, .r14, .r15]
}

/// VMX_INSTRUCTION_INFO for VMREAD/VMWRITE with register operands (SDM Table 28-13):
/// bit 10 = register operand, reg1 in bits 6:3 (value), reg2 in bits 31:28 (field encoding),
/// registers in the SDM's numbering. INVEPT/INVVPID name their type register in bits 31:28 too.
public enum VMXInstructionInfo {
    public static let registerOperand: UInt64 = 1 << 10
    public static func make(valueRegister: Register, fieldRegister: Register) -> UInt64 {
        registerOperand | valueRegister.sdmNumber << 3 | fieldRegister.sdmNumber << 28
    }
    public static func make(typeRegister: Register) -> UInt64 { typeRegister.sdmNumber << 28 }
    public static func valueRegister(_ info: UInt64) -> Register? { Register(sdmNumber: (info >> 3) & 0xF) }
    public static func fieldRegister(_ info: UInt64) -> Register? { Register(sdmNumber: (info >> 28) & 0xF) }
    public static func typeRegister(_ info: UInt64) -> Register? { Register(sdmNumber: (info >> 28) & 0xF) }
}

/// The ucall convention between a guest program and the harness, as in KVM selftests:
/// the guest fills a `Ucall` block in its own memory and writes its guest-physical address
/// to the ucall port (selftests' UCALL_PIO_PORT). L0 handles that port on every path.
public enum Ucall {
    public static let port: UInt16 = 0x1000
    public static let commandOffset: UInt64 = 0
    public static let argsOffset: UInt64 = 8
    public static let argCount = 6
    public static let messageOffset: UInt64 = 64
    public static let messageCapacity = 192
    public static let size: UInt64 = 256
}

/// `sync` stages the harness gives meaning to: the measurement window of a benchmark loop.
public enum UcallStage {
    public static let measureStart: UInt64 = 0x5354_4152   // "RATS"
    public static let measureEnd: UInt64 = 0x454E_4421     // "!DNE"
}

/// Ucall commands; the first five are numbered as KVM selftests' `enum ucall_cmd`.
public enum UcallCommand: UInt64, Sendable {
    case none = 0
    case sync = 1
    case abort = 2
    case printf = 3
    case done = 4
    /// Project-specific: a measurement the guest took (args: samples, min, p50, p99, max, total ns).
    case report = 0x100
}
