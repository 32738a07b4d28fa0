import ABI
import Transport

/// L1 as a PV hypervisor: no VMCS, no EPT tables. It registers L2's CPUID with L0, maps L2's RAM
/// by hypercall (its own record of the map is `L1MemoryPlan`'s fixed layout), and runs L2 with
/// the enter-L2 hypercall, handling the exits L0 delivers in the PV exit page.
public final class PVHypervisor {
    let cpu: L1CPU
    let memory: L1Memory
    var devices = L1Devices()

    public init(cpu: L1CPU, memory: L1Memory) {
        self.cpu = cpu
        self.memory = memory
    }

    public func run() throws -> Never {
        try registerCPUID()
        // All of L2's RAM in one mapping, read/write/execute.
        try cpu.hypercall(.mapGPARange, 0, L1MemoryPlan.l2RAMBacking.raw, L1MemoryPlan.l2RAMSize, PVMapFlags.rwx)
        try memory.zero(L1MemoryPlan.pvExitPage, length: RunPage.size)
        try cpu.hypercall(.createVCPU, L1MemoryPlan.pvExitPage.raw)
        let page = try memory.runPage(L1MemoryPlan.pvExitPage)
        page[register: .rip] = L1MemoryPlan.l2EntryRIP
        page[register: .rsp] = L1MemoryPlan.l2StackTop
        page[register: .rflags] = 0x2
        while true {
            try cpu.hypercall(.enterL2)
            try handleExit(page)
        }
    }

    /// Writes the table as `kvm_cpuid_entry2[]` into the argument area and registers it.
    func registerCPUID() throws {
        let entries = L2CPUIDTable.entries
        for (i, e) in entries.enumerated() {
            let base = L1MemoryPlan.argumentArea.raw + UInt64(i) * CPUIDEntry.byteSize
            try memory.zero(L1GPA(base), length: CPUIDEntry.byteSize)
            for (word, offset) in zip(e.words, CPUIDEntry.wordOffsets) {
                try memory.store32(word, L1GPA(base + offset))
            }
        }
        try cpu.hypercall(.setCPUID, L1MemoryPlan.argumentArea.raw, UInt64(entries.count))
    }

    /// One exit L0 delivered. L1 edits L2's registers in the PV exit page.
    func handleExit(_ page: RunPageView) throws {
        let reason = page.exitReason
        let skip = { page[register: .rip] &+= page[RunPage.instructionLength] }
        switch reason {
        case .ioInstruction:
            let q = page[RunPage.exitQualification]
            let v = devices.portIO(port: IOQualification.port(q), isIn: IOQualification.isIn(q), value: page[register: .rax])
            if IOQualification.isIn(q) { page[register: .rax] = v }
            skip()
        case .eptViolation:
            // Nothing of L2's RAM is unmapped, so this is memory L1 never gave L2: unassigned.
            let write = page[RunPage.exitQualification] & EPTViolationQualification.dataWrite != 0
            let v = devices.unassigned(isWrite: write, size: Int(page[RunPage.instructionInfo]))
            if !write { page[register: .rax] = v }
            skip()
        case .cpuid:
            // Only reached if L0 does not emulate CPUID directly.
            let (a, b, c, d) = L2CPUIDTable.table.lookup(function: UInt32(truncatingIfNeeded: page[register: .rax]),
                                                         index: UInt32(truncatingIfNeeded: page[register: .rcx]))
            page[register: .rax] = UInt64(a); page[register: .rbx] = UInt64(b)
            page[register: .rcx] = UInt64(c); page[register: .rdx] = UInt64(d)
            skip()
        case .hlt:
            skip()
        case .msrRead:
            let v = devices.rdmsr(UInt32(truncatingIfNeeded: page[register: .rcx]))
            page[register: .rax] = v & 0xFFFF_FFFF; page[register: .rdx] = v >> 32
            skip()
        case .msrWrite:
            devices.wrmsr(UInt32(truncatingIfNeeded: page[register: .rcx]),
                          page[register: .rdx] << 32 | page[register: .rax] & 0xFFFF_FFFF)
            skip()
        case .vmcall:
            page[register: .rax] = devices.hypercall(page[register: .rax])
            skip()
        default:
            throw L1Fault.unexpectedExit(reason, "the PV L1 has no handler")
        }
    }
}
