import Transport

/// The calibration guest: 2 MiB of RAM, identity-mapped by one 2 MiB page, started directly in
/// 64-bit long mode at CPL 0 (no firmware, no real-mode trampoline). Its code is hand-assembled
/// x86-64, one loop per exit kind; the encodings are spelled out next to each byte sequence.
///
/// Each loop is entered with RDI = iterations and RSI = the result area. It reads the TSC,
/// runs the exiting instruction RDI times, reads the TSC again, stores
///     [RSI] = TSC delta, [RSI+8] = RAX after the last iteration, [RSI+16] = RBX after it,
/// and reports "done" with an OUT to `donePort`, which is the run's only other userspace exit.
enum CalibrationGuest {
    static let memoryBytes = 2 << 20
    // Guest-physical layout (all below 2 MiB, so inside the one large page).
    static let pml4: UInt64 = 0x1000
    static let pdpt: UInt64 = 0x2000
    static let pd: UInt64 = 0x3000
    static let gdt: UInt64 = 0x4000
    static let result: UInt64 = 0x5000
    static let codeBase: UInt64 = 0x10000
    static let stackTop: UInt64 = 0x1F_F000

    /// The port the I/O loop writes: claimed by no in-kernel device, so every OUT exits to userspace.
    static let benchPort: UInt16 = 0xE0
    /// The port the guest writes once the loop is over.
    static let donePort: UInt16 = 0xE1
    /// The MSR the filter denies: IA32_TSC_ADJUST, the MSR vmexit.c's rd_tsc_adjust_msr reads.
    static let filteredMSR: UInt32 = 0x3B
    /// A hypercall number KVM does not know: kvm_emulate_hypercall answers -KVM_ENOSYS in RAX.
    static let unknownHypercall: UInt32 = 0x7FFF_0000
    /// The CPUID leaf the CPUID loop asks for, and the EBX the guest's CPUID table gives it, so
    /// the run proves KVM (not something above it) answered: KVM's hypervisor signature leaf.
    static let cpuidLeaf: UInt32 = 0x4000_0000
    static let cpuidMarkerEBX: UInt32 = 0x6D76_7063   // "cpvm"

    // GDT: null, 64-bit code (selector 0x08), data (selector 0x10).
    static let codeSelector: UInt16 = 0x08
    static let dataSelector: UInt16 = 0x10
    static let gdtEntries: [UInt64] = [
        0,
        0x00AF_9B00_0000_FFFF,   // P, DPL 0, S, type 0xB (execute/read, accessed), L, G: 64-bit code
        0x00CF_9300_0000_FFFF,   // P, DPL 0, S, type 0x3 (read/write, accessed), D/B, G: flat data
    ]

    /// The hidden segment state matching the GDT entries above (KVM_SET_SREGS loads the hidden
    /// parts directly; the GDT is there for anything that reloads a selector).
    static var systemState: KVMSystemState {
        KVMSystemState(
            cr0: 1 << 0 | 1 << 1 | 1 << 4 | 1 << 5 | 1 << 16 | 1 << 31,   // PE, MP, ET, NE, WP, PG
            cr3: pml4,
            cr4: 1 << 5,                                                 // PAE
            efer: 1 << 8 | 1 << 10,                                      // LME, LMA
            gdtBase: gdt, gdtLimit: UInt16(gdtEntries.count * 8 - 1),
            code: KVMSegment(base: 0, limit: 0xFFFF_FFFF, selector: codeSelector, type: 0xB,
                             present: true, dpl: 0, db: false, s: true, l: true, g: true),
            data: KVMSegment(base: 0, limit: 0xFFFF_FFFF, selector: dataSelector, type: 0x3,
                             present: true, dpl: 0, db: true, s: true, l: false, g: true))
    }

    /// (guest-physical address, bytes) to copy into guest memory before the first run.
    static var image: [(UInt64, [UInt8])] {
        let present: UInt64 = 1 << 0, writable: UInt64 = 1 << 1, large: UInt64 = 1 << 7
        return [
            (pml4, le(pdpt | present | writable)),
            (pdpt, le(pd | present | writable)),
            (pd, le(0 | present | writable | large)),   // PDE 0: the 2 MiB page at 0, identity
            (gdt, gdtEntries.flatMap(le)),
        ]
    }

    static func entry(_ kind: CalibrationExitKind) -> UInt64 {
        codeBase + UInt64(CalibrationExitKind.allCases.firstIndex(of: kind)!) * 0x1000
    }

    /// The exiting instruction(s) each iteration runs. `amd` picks VMMCALL over VMCALL.
    static func body(_ kind: CalibrationExitKind, amd: Bool) -> [UInt8] {
        switch kind {
        case .cpuid:
            return [0xB8] + le32(cpuidLeaf)        // mov eax, leaf
                 + [0x31, 0xC9]                    // xor ecx, ecx
                 + [0x0F, 0xA2]                    // cpuid
        case .hypercall:
            // KVM emulates the other vendor's instruction too (it traps the #UD and patches the
            // call site), but that detour would be timed: use the native one.
            return [0xB8] + le32(unknownHypercall) // mov eax, nr
                 + (amd ? [0x0F, 0x01, 0xD9]       // vmmcall
                        : [0x0F, 0x01, 0xC1])      // vmcall
        case .io:
            return [0xE6, UInt8(benchPort)]        // out imm8, al
        case .msr:
            return [0xB9] + le32(filteredMSR)      // mov ecx, msr
                 + [0x0F, 0x32]                    // rdmsr
        case .hlt:
            return [0xF4]                          // hlt (RFLAGS.IF = 0: nothing to wake it but KVM)
        }
    }

    /// The whole loop for one kind, position-independent.
    static func code(_ kind: CalibrationExitKind, amd: Bool) -> [UInt8] {
        let readTSC: [UInt8] = [0x0F, 0xAE, 0xE8,         // lfence: earlier instructions done
                                0x0F, 0x31,               // rdtsc
                                0x48, 0xC1, 0xE2, 0x20,   // shl rdx, 32
                                0x48, 0x09, 0xD0]         // or rax, rdx
        let body = body(kind, amd: amd)
        let loopTail: [UInt8] = [0x49, 0xFF, 0xC9]        // dec r9
        let back = -Int32(body.count + loopTail.count + 6)
        return [0x49, 0x89, 0xF9]                         // mov r9, rdi      (iteration counter)
             + readTSC
             + [0x49, 0x89, 0xC0]                         // mov r8, rax      (start TSC)
             + body + loopTail
             + [0x0F, 0x85] + le32(UInt32(bitPattern: back))   // jnz body
             + [0x49, 0x89, 0xC2]                         // mov r10, rax     (last RAX)
             + [0x49, 0x89, 0xDB]                         // mov r11, rbx     (last RBX)
             + readTSC
             + [0x4C, 0x29, 0xC0]                         // sub rax, r8
             + [0x48, 0x89, 0x06]                         // mov [rsi], rax
             + [0x4C, 0x89, 0x56, 0x08]                   // mov [rsi+8], r10
             + [0x4C, 0x89, 0x5E, 0x10]                   // mov [rsi+16], r11
             + [0xE6, UInt8(donePort)]                    // out donePort, al
             + [0xF4, 0xEB, 0xFD]                         // hlt; jmp hlt  (never resumed)
    }

    private static func le(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
    private static func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
}
