import CPVMShim

/// A basic VMX exit reason (SDM Appendix C), numbered by linux-libc-dev's <asm/vmx.h>.
/// Used for every exit in the stack: L2 -> L0 and L1 -> L0 alike, as on hardware.
public struct ExitReason: RawRepresentable, Hashable, Sendable, Comparable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    init(_ v: Int32) { self.rawValue = UInt32(v) }
    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }

    public static let exceptionNMI = ExitReason(EXIT_REASON_EXCEPTION_NMI)
    public static let externalInterrupt = ExitReason(EXIT_REASON_EXTERNAL_INTERRUPT)
    public static let tripleFault = ExitReason(EXIT_REASON_TRIPLE_FAULT)
    public static let interruptWindow = ExitReason(EXIT_REASON_INTERRUPT_WINDOW)
    public static let taskSwitch = ExitReason(EXIT_REASON_TASK_SWITCH)
    public static let cpuid = ExitReason(EXIT_REASON_CPUID)
    public static let hlt = ExitReason(EXIT_REASON_HLT)
    public static let invd = ExitReason(EXIT_REASON_INVD)
    public static let invlpg = ExitReason(EXIT_REASON_INVLPG)
    public static let rdpmc = ExitReason(EXIT_REASON_RDPMC)
    public static let rdtsc = ExitReason(EXIT_REASON_RDTSC)
    public static let vmcall = ExitReason(EXIT_REASON_VMCALL)
    public static let vmclear = ExitReason(EXIT_REASON_VMCLEAR)
    public static let vmlaunch = ExitReason(EXIT_REASON_VMLAUNCH)
    public static let vmptrld = ExitReason(EXIT_REASON_VMPTRLD)
    public static let vmptrst = ExitReason(EXIT_REASON_VMPTRST)
    public static let vmread = ExitReason(EXIT_REASON_VMREAD)
    public static let vmresume = ExitReason(EXIT_REASON_VMRESUME)
    public static let vmwrite = ExitReason(EXIT_REASON_VMWRITE)
    public static let vmxoff = ExitReason(EXIT_REASON_VMOFF)
    public static let vmxon = ExitReason(EXIT_REASON_VMON)
    public static let crAccess = ExitReason(EXIT_REASON_CR_ACCESS)
    public static let drAccess = ExitReason(EXIT_REASON_DR_ACCESS)
    public static let ioInstruction = ExitReason(EXIT_REASON_IO_INSTRUCTION)
    public static let msrRead = ExitReason(EXIT_REASON_MSR_READ)
    public static let msrWrite = ExitReason(EXIT_REASON_MSR_WRITE)
    public static let invalidState = ExitReason(EXIT_REASON_INVALID_STATE)
    public static let mwait = ExitReason(EXIT_REASON_MWAIT_INSTRUCTION)
    public static let monitor = ExitReason(EXIT_REASON_MONITOR_INSTRUCTION)
    public static let pause = ExitReason(EXIT_REASON_PAUSE_INSTRUCTION)
    public static let eptViolation = ExitReason(EXIT_REASON_EPT_VIOLATION)
    public static let eptMisconfig = ExitReason(EXIT_REASON_EPT_MISCONFIG)
    public static let invept = ExitReason(EXIT_REASON_INVEPT)
    public static let rdtscp = ExitReason(EXIT_REASON_RDTSCP)
    public static let preemptionTimer = ExitReason(EXIT_REASON_PREEMPTION_TIMER)
    public static let invvpid = ExitReason(EXIT_REASON_INVVPID)
    public static let xsetbv = ExitReason(EXIT_REASON_XSETBV)
    public static let nmiWindow = ExitReason(EXIT_REASON_NMI_WINDOW)
    public static let msrLoadFail = ExitReason(EXIT_REASON_MSR_LOAD_FAIL)
    public static let monitorTrapFlag = ExitReason(EXIT_REASON_MONITOR_TRAP_FLAG)
    public static let mceDuringVMEntry = ExitReason(EXIT_REASON_MCE_DURING_VMENTRY)
    public static let tprBelowThreshold = ExitReason(EXIT_REASON_TPR_BELOW_THRESHOLD)
    public static let apicAccess = ExitReason(EXIT_REASON_APIC_ACCESS)
    public static let eoiInduced = ExitReason(EXIT_REASON_EOI_INDUCED)
    public static let gdtrIdtr = ExitReason(EXIT_REASON_GDTR_IDTR)
    public static let ldtrTr = ExitReason(EXIT_REASON_LDTR_TR)
    public static let wbinvd = ExitReason(EXIT_REASON_WBINVD)
    public static let apicWrite = ExitReason(EXIT_REASON_APIC_WRITE)
    public static let rdrand = ExitReason(EXIT_REASON_RDRAND)
    public static let invpcid = ExitReason(EXIT_REASON_INVPCID)
    public static let vmfunc = ExitReason(EXIT_REASON_VMFUNC)
    public static let encls = ExitReason(EXIT_REASON_ENCLS)
    public static let rdseed = ExitReason(EXIT_REASON_RDSEED)
    public static let pmlFull = ExitReason(EXIT_REASON_PML_FULL)
    public static let xsaves = ExitReason(EXIT_REASON_XSAVES)
    public static let xrstors = ExitReason(EXIT_REASON_XRSTORS)
    public static let umwait = ExitReason(EXIT_REASON_UMWAIT)
    public static let tpause = ExitReason(EXIT_REASON_TPAUSE)
    public static let busLock = ExitReason(EXIT_REASON_BUS_LOCK)
    public static let notify = ExitReason(EXIT_REASON_NOTIFY)

    /// Bit 31 of the exit reason: the VM entry failed (SDM 26.8, reason 33 | 0x80000000).
    public static let failedVMEntryFlag = UInt32(VMX_EXIT_REASONS_FAILED_VMENTRY)
    public var basic: ExitReason { ExitReason(rawValue: rawValue & 0xFFFF) }
    public var isFailedEntry: Bool { rawValue & Self.failedVMEntryFlag != 0 }

    /// A reason a CPU can report for an exit of the guest it runs: a basic reason <asm/vmx.h>
    /// names, with no flag bits (a failed entry is the hypervisor's to report, not the guest's).
    /// Anything else in a run page was written by a tier that is not a CPU.
    @inline(__always)
    public var isArchitectural: Bool { rawValue < 128 && Self.architecturalBits[Int(rawValue >> 6)] & (1 << UInt64(rawValue & 63)) != 0 }

    private static let architecturalBits: [UInt64] = {
        var bits: [UInt64] = [0, 0]
        for r in names.keys where r < 128 { bits[Int(r >> 6)] |= 1 << UInt64(r & 63) }
        return bits
    }()

    /// The names perf and KVM's tracepoints print (VMX_EXIT_REASONS in <asm/vmx.h>).
    public var name: String {
        let prefix = isFailedEntry ? "FAILED_VMENTRY|" : ""
        if let n = Self.names[basic.rawValue] { return prefix + n }
        return prefix + "EXIT_\(basic.rawValue)"
    }
    public var description: String { name }

    private static let names: [UInt32: String] = {
        let table: [(Int32, String)] = [
            (EXIT_REASON_EXCEPTION_NMI, "EXCEPTION_NMI"), (EXIT_REASON_EXTERNAL_INTERRUPT, "EXTERNAL_INTERRUPT"),
            (EXIT_REASON_TRIPLE_FAULT, "TRIPLE_FAULT"), (EXIT_REASON_INIT_SIGNAL, "INIT_SIGNAL"),
            (EXIT_REASON_SIPI_SIGNAL, "SIPI_SIGNAL"), (EXIT_REASON_INTERRUPT_WINDOW, "INTERRUPT_WINDOW"),
            (EXIT_REASON_NMI_WINDOW, "NMI_WINDOW"), (EXIT_REASON_TASK_SWITCH, "TASK_SWITCH"),
            (EXIT_REASON_CPUID, "CPUID"), (EXIT_REASON_HLT, "HLT"), (EXIT_REASON_INVD, "INVD"),
            (EXIT_REASON_INVLPG, "INVLPG"), (EXIT_REASON_RDPMC, "RDPMC"), (EXIT_REASON_RDTSC, "RDTSC"),
            (EXIT_REASON_VMCALL, "VMCALL"), (EXIT_REASON_VMCLEAR, "VMCLEAR"), (EXIT_REASON_VMLAUNCH, "VMLAUNCH"),
            (EXIT_REASON_VMPTRLD, "VMPTRLD"), (EXIT_REASON_VMPTRST, "VMPTRST"), (EXIT_REASON_VMREAD, "VMREAD"),
            (EXIT_REASON_VMRESUME, "VMRESUME"), (EXIT_REASON_VMWRITE, "VMWRITE"), (EXIT_REASON_VMOFF, "VMOFF"),
            (EXIT_REASON_VMON, "VMON"), (EXIT_REASON_CR_ACCESS, "CR_ACCESS"), (EXIT_REASON_DR_ACCESS, "DR_ACCESS"),
            (EXIT_REASON_IO_INSTRUCTION, "IO_INSTRUCTION"), (EXIT_REASON_MSR_READ, "MSR_READ"),
            (EXIT_REASON_MSR_WRITE, "MSR_WRITE"), (EXIT_REASON_INVALID_STATE, "INVALID_STATE"),
            (EXIT_REASON_MSR_LOAD_FAIL, "MSR_LOAD_FAIL"), (EXIT_REASON_MWAIT_INSTRUCTION, "MWAIT_INSTRUCTION"),
            (EXIT_REASON_MONITOR_TRAP_FLAG, "MONITOR_TRAP_FLAG"), (EXIT_REASON_MONITOR_INSTRUCTION, "MONITOR_INSTRUCTION"),
            (EXIT_REASON_PAUSE_INSTRUCTION, "PAUSE_INSTRUCTION"), (EXIT_REASON_MCE_DURING_VMENTRY, "MCE_DURING_VMENTRY"),
            (EXIT_REASON_TPR_BELOW_THRESHOLD, "TPR_BELOW_THRESHOLD"), (EXIT_REASON_APIC_ACCESS, "APIC_ACCESS"),
            (EXIT_REASON_EOI_INDUCED, "EOI_INDUCED"), (EXIT_REASON_GDTR_IDTR, "GDTR_IDTR"), (EXIT_REASON_LDTR_TR, "LDTR_TR"),
            (EXIT_REASON_EPT_VIOLATION, "EPT_VIOLATION"), (EXIT_REASON_EPT_MISCONFIG, "EPT_MISCONFIG"),
            (EXIT_REASON_INVEPT, "INVEPT"), (EXIT_REASON_RDTSCP, "RDTSCP"), (EXIT_REASON_PREEMPTION_TIMER, "PREEMPTION_TIMER"),
            (EXIT_REASON_INVVPID, "INVVPID"), (EXIT_REASON_WBINVD, "WBINVD"), (EXIT_REASON_XSETBV, "XSETBV"),
            (EXIT_REASON_APIC_WRITE, "APIC_WRITE"), (EXIT_REASON_RDRAND, "RDRAND"), (EXIT_REASON_INVPCID, "INVPCID"),
            (EXIT_REASON_VMFUNC, "VMFUNC"), (EXIT_REASON_ENCLS, "ENCLS"), (EXIT_REASON_RDSEED, "RDSEED"),
            (EXIT_REASON_PML_FULL, "PML_FULL"), (EXIT_REASON_XSAVES, "XSAVES"), (EXIT_REASON_XRSTORS, "XRSTORS"),
            (EXIT_REASON_UMWAIT, "UMWAIT"), (EXIT_REASON_TPAUSE, "TPAUSE"), (EXIT_REASON_BUS_LOCK, "BUS_LOCK"),
            (EXIT_REASON_NOTIFY, "NOTIFY"),
        ]
        return Dictionary(uniqueKeysWithValues: table.map { (UInt32($0.0), $0.1) })
    }()
}

extension ExitReason {
    /// Counters kept by basic exit reason (L0's, and the pvm-rfc switcher's) have this many
    /// slots; reasons from the last slot up share it.
    public static let countedSlots = 80
}
