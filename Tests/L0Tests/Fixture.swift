import ABI
@testable import L0
import Testing
import Transport

/// Where the tests put things in L1 memory. L1's single memslot is L1 GPA [0, 32 MiB) backed by
/// host offset 16 MiB on purpose: an L1 GPA mistaken for a host offset lands somewhere else.
enum Plan {
    static let slotSize: UInt64 = 32 << 20
    static let slotHost = HostOffset(16 << 20)
    static let hostSize: UInt64 = 64 << 20
    static let l2Limit: UInt64 = 1 << 30

    static let vmxonRegion = L1GPA(0x1000)
    static let vmcs12 = L1GPA(0x2000)
    static let otherVMCS = L1GPA(0x3000)
    static let exitPage = L1GPA(0x4000)
    static let ioBitmapA = L1GPA(0x5000)
    static let ioBitmapB = L1GPA(0x6000)
    static let msrBitmap = L1GPA(0x7000)
    static let argumentPage = L1GPA(0x8000)
    static let cpuidBuffer = L1GPA(0x1_0000)
    /// EPT12 tables: PML4, PDPT, PD, PT.
    static let ept12Tables = [L1GPA(0x10_0000), L1GPA(0x10_1000), L1GPA(0x10_2000), L1GPA(0x10_3000)]
    static var ept12Root: L1GPA { ept12Tables[0] }
    static let eptp = ept12Tables[0].raw | EPT.memoryTypeWB | EPT.eptpWalkLength4
    /// L1 pages that back L2 memory.
    static let l2Backing = L1GPA(0x40_0000)

    static let hostRIP: UInt64 = 0x20_0000
    static let hostRSP: UInt64 = 0x28_0000
    static let guestRIP: UInt64 = 0x1000
    static let guestRSP: UInt64 = 0x8000

    static let cr0PE: UInt64 = 1, cr0PG: UInt64 = 1 << 31, cr4PAE: UInt64 = 1 << 5
}

/// One L0 vCPU built in-process, as Firecracker's `run_emulation` tests build a vCPU: over
/// private anonymous memory (no memfd, no other process), fed made-up exits.
final class Fixture {
    let path: NestingPath
    let layout: ControlLayout
    let control: ControlMemory
    let host: SharedRegion
    let vcpu: L0VCPU
    /// The path's backend, for the state a test inspects.
    var pv: PVBackend { vcpu.backend as! PVBackend }
    var nested: NestedVMXBackend { vcpu.backend as! NestedVMXBackend }

    /// On the pv path, `negotiate` (PV ABI v1) with these features first, unless nil.
    init(_ path: NestingPath, negotiating features: PVFeatures? = .all, l2Limit: UInt64 = Plan.l2Limit) throws {
        self.path = path
        layout = ControlLayout(vcpuCount: 1, l2AddressLimit: l2Limit)
        control = try ControlMemory.anonymous(layout: layout)
        host = try SharedRegion(anonymous: Plan.hostSize)
        var slots = L1Memslots(hostSize: host.size)
        try slots.add(MemorySlot(slot: 0, guestPhysAddr: L1GPA(0), memorySize: Plan.slotSize, hostOffset: Plan.slotHost))
        L0VCPU.initialize(control)
        vcpu = L0VCPU(id: 0, path: path, control: control,
                      l1Memory: L1MemoryAccess(memslots: slots, host: HostMemory(region: host)))
        if path == .pv, let features {
            let r = negotiate(features)
            #expect(r == 0, "negotiate failed: \(String(describing: HypercallError.from(returnValue: r)))")
        }
    }

    /// PV ABI v1 negotiation: this build's version, `features`, the argument page.
    func negotiate(_ features: PVFeatures, version: PVABIVersion = .current, argumentPage: L1GPA = Plan.argumentPage) -> UInt64 {
        hypercall(.negotiate, version.packed, features.rawValue, argumentPage.raw).rax
    }

    var l1Run: RunPageView { vcpu.l1Run }
    var l2Run: RunPageView { vcpu.l2Run }

    // MARK: L1 memory

    func hostOffset(_ gpa: L1GPA) -> HostOffset { Plan.slotHost + gpa.raw }
    func store64(_ v: UInt64, _ gpa: L1GPA) throws { try vcpu.l1Memory.store64(v, gpa) }
    func store32(_ v: UInt32, _ gpa: L1GPA) throws { try vcpu.l1Memory.store32(v, gpa) }
    func store8(_ v: UInt8, _ gpa: L1GPA) throws { try host.store(v, at: hostOffset(gpa).raw) }
    func vmcs(at gpa: L1GPA) throws -> VMCSImage { try HostMemory(region: host).vmcs(at: hostOffset(gpa)) }
    func runPage(at gpa: L1GPA) throws -> RunPageView { try HostMemory(region: host).runPage(at: hostOffset(gpa)) }

    /// The whole EPT02 table and its present set: what an erroring hypercall must leave alone.
    func ept02Snapshot() throws -> ([UInt8], Set<UInt64>) {
        (try control.l2Tables.readBytes(at: layout.ept02.raw, count: Int(layout.ept02Entries * 8)), vcpu.ept02.present)
    }

    // MARK: hypercalls (VMCALL from L1)

    @discardableResult
    func hypercall(_ nr: UInt64, _ a0: UInt64 = 0, _ a1: UInt64 = 0, _ a2: UInt64 = 0, _ a3: UInt64 = 0)
        -> (outcome: NextStep, rax: UInt64) {
        l1Run[register: .rax] = nr
        l1Run[register: .rbx] = a0
        l1Run[register: .rcx] = a1
        l1Run[register: .rdx] = a2
        l1Run[register: .rsi] = a3
        let outcome = vcpu.handleL1Exit(L1ExitInfo(reason: .vmcall, instructionLength: 3))
        return (outcome, l1Run[register: .rax])
    }

    @discardableResult
    func hypercall(_ call: PVHypercall, _ a0: UInt64 = 0, _ a1: UInt64 = 0, _ a2: UInt64 = 0, _ a3: UInt64 = 0)
        -> (outcome: NextStep, rax: UInt64) {
        hypercall(call.rawValue, a0, a1, a2, a3)
    }

    /// mapGPARange's RAX.
    func map(l2: UInt64, l1: UInt64, length: UInt64, flags: UInt64 = PVMapFlags.rwx) -> UInt64 {
        hypercall(.mapGPARange, l2, l1, length, flags).rax
    }

    func unmap(l2: UInt64, length: UInt64) -> UInt64 {
        hypercall(.unmapGPARange, l2, length).rax
    }

    /// Writes `entries` as `kvm_cpuid_entry2[]` at `gpa`.
    func writeCPUIDEntries(_ entries: [CPUIDEntry], at gpa: L1GPA) throws {
        for (i, e) in entries.enumerated() {
            let base = gpa + UInt64(i) * CPUIDEntry.byteSize
            for (offset, word) in zip(CPUIDEntry.wordOffsets, e.words) {
                try store32(word, base + offset)
            }
        }
    }

    // MARK: L2 exits

    /// An L2 exit as the stack delivers it: the exit is in L2's run page and handed to L0.
    func l2Exit(_ exit: L2ExitInfo) -> NextStep { vcpu.handleL2Exit(exit) }

    /// An L2 exit followed by the entry the stack's loop would count (resume L2 or enter L1).
    func l2ExitCountingEntries(_ exit: L2ExitInfo) -> NextStep {
        let outcome = l2Exit(exit)
        switch outcome {
        case .resume(.l2), .enterL2: vcpu.counters.l2Entries += 1
        case .resume: vcpu.counters.l1Entries += 1
        case .stop, .block: break
        }
        return outcome
    }

    func l2CPUID(function: UInt64, index: UInt64 = 0, length: UInt64 = 2) -> NextStep {
        l2Run[register: .rax] = function
        l2Run[register: .rcx] = index
        return l2Exit(L2ExitInfo(reason: .cpuid, instructionLength: length))
    }

    var l2CPUIDResult: [UInt64] { [l2Run[register: .rax], l2Run[register: .rbx], l2Run[register: .rcx], l2Run[register: .rdx]] }

    // MARK: VMX instructions (L1 exits)

    static let sentinel: UInt64 = 0xEE

    /// Runs one VMX instruction; the VMX result slot is preset to a sentinel so a test can tell
    /// whether L0 wrote it.
    @discardableResult
    func vmx(_ reason: ExitReason, operand: UInt64 = 0, length: UInt64 = 3, info: UInt64 = 0) -> NextStep {
        l1Run[RunPage.vmxResult] = Self.sentinel
        l1Run[RunPage.vmInstructionError] = 0
        return vcpu.handleL1Exit(L1ExitInfo(reason: reason, instructionLength: length, instructionInfo: info, vmxOperand: operand))
    }

    @discardableResult
    func vmx(_ reason: ExitReason, _ operand: L1GPA) -> NextStep { vmx(reason, operand: operand.raw) }

    /// The outcome of the last VMX instruction as L1 sees it, or nil if L0 did not set one.
    var vmxResult: VMXInstructionResult? {
        switch l1Run[RunPage.vmxResult] {
        case 0: .succeed
        case 1: .failInvalid
        case 2: VMInstructionError(rawValue: UInt32(l1Run[RunPage.vmInstructionError])).map { .failValid($0) }
        default: nil
        }
    }

    static let vmxInfo = VMXInstructionInfo.make(valueRegister: .rax, fieldRegister: .rdx)

    @discardableResult
    func vmwrite(_ field: UInt64, _ value: UInt64) -> NextStep {
        l1Run[register: .rdx] = field
        l1Run[register: .rax] = value
        return vmx(.vmwrite, info: Self.vmxInfo)
    }

    @discardableResult
    func vmwrite(_ field: VMCSField, _ value: UInt64) -> NextStep { vmwrite(UInt64(field.rawValue), value) }

    /// VMREAD into RAX; returns RAX (preset to a marker so an untouched register shows).
    func vmread(_ field: UInt64) -> UInt64 {
        l1Run[register: .rdx] = field
        l1Run[register: .rax] = 0xBAD0_BAD0_BAD0_BAD0
        vmx(.vmread, info: Self.vmxInfo)
        return l1Run[register: .rax]
    }

    func vmread(_ field: VMCSField) -> UInt64 { vmread(UInt64(field.rawValue)) }

    /// VMXON on a region with the right revision id.
    func enterVMXOperation() throws {
        try store32(VMCS12Layout.revisionID, Plan.vmxonRegion)
        vmx(.vmxon, Plan.vmxonRegion)
        #expect(vmxResult == .succeed)
    }

    /// Fills a vmcs12 in L1 memory (before VMPTRLD, as L1 would with VMCLEAR + VMWRITEs) with
    /// state that passes every entry check: EPT on, a 64-bit host and a 64-bit guest.
    @discardableResult
    func prepareValidVMCS12(at gpa: L1GPA = Plan.vmcs12) throws -> VMCSImage {
        try store32(VMCS12Layout.revisionID, gpa)
        let v = try vmcs(at: gpa)
        v.launched = false
        v[.cpuBasedVMExecControl] = CPUBased.activateSecondaryControls
        v[.secondaryVMExecControl] = SecondaryExec.enableEPT
        v[.eptPointer] = Plan.eptp
        v[.hostCR0] = Plan.cr0PE | Plan.cr0PG
        v[.hostCR4] = Plan.cr4PAE
        v[.vmExitControls] = VMExitControl.hostAddressSpaceSize
        v[.hostRIP] = Plan.hostRIP
        v[.hostRSP] = Plan.hostRSP
        v[.vmEntryControls] = VMEntryControl.ia32eModeGuest
        v[.guestCR0] = Plan.cr0PE | Plan.cr0PG
        v[.guestCR4] = Plan.cr4PAE
        v[.guestRFLAGS] = 0x2
        v[.guestRIP] = Plan.guestRIP
        v[.guestRSP] = Plan.guestRSP
        return v
    }

    /// VMXON, a valid vmcs12 made current; nothing launched yet.
    @discardableResult
    func loadValidVMCS12() throws -> VMCSImage {
        try enterVMXOperation()
        let v = try prepareValidVMCS12()
        vmx(.vmptrld, Plan.vmcs12)
        #expect(vmxResult == .succeed)
        return v
    }

    /// VMXON, VMPTRLD of a valid vmcs12 and a VMLAUNCH that enters L2.
    @discardableResult
    func launchL2() throws -> VMCSImage {
        let v = try loadValidVMCS12()
        let outcome = vmx(.vmlaunch)
        #expect(outcome == .enterL2)
        #expect(self.nested.guestMode)
        return v
    }

    /// A field change L1 makes after VMPTRLD: a shadowed read-write field goes to the shadow
    /// VMCS (the VMWRITE does not exit on nvmx); anything else is an exiting VMWRITE.
    func l1SetField(_ field: VMCSField, _ value: UInt64) {
        if self.nested.shadowing, ShadowedFields.readWrite.contains(field) {
            self.nested.shadowVMCS[field] = value
        } else {
            vmwrite(field, value)
            #expect(vmxResult == .succeed)
        }
    }

    // MARK: EPT12

    static func eptIndex(_ gpa: UInt64, level: Int) -> UInt64 { (gpa >> UInt64(12 + 9 * (level - 1))) & 511 }

    /// Writes the EPT12 path for `gpa` through `Plan.ept12Tables`: non-leaf entries at levels
    /// 4..leafLevel+1 (with `nonLeafPermissions[4 - level]`, default RWX), then `leaf`.
    func writeEPT12Path(gpa: UInt64, leafLevel: Int, leaf: UInt64, nonLeafPermissions: [UInt64] = [7, 7, 7]) throws {
        let tables = Plan.ept12Tables
        var level = 4
        while level > leafLevel {
            let i = 4 - level
            try store64(tables[i + 1].raw | nonLeafPermissions[i], L1GPA(tables[i].raw + Self.eptIndex(gpa, level: level) * 8))
            level -= 1
        }
        try store64(leaf, L1GPA(tables[4 - leafLevel].raw + Self.eptIndex(gpa, level: leafLevel) * 8))
    }

    /// A write-back EPT leaf.
    static func eptLeaf(_ l1: UInt64, permissions: UInt64 = EPT.rwxMask, large: Bool = false) -> UInt64 {
        l1 | permissions | EPT.memoryTypeWB << EPT.memoryTypeShift | (large ? EPT.largePage : 0)
    }
}

extension HypercallError {
    static let success: UInt64 = 0
}
