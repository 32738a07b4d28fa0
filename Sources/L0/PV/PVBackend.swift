import ABI
import Transport

/// The PV path (docs/abi.md): L1 runs L2 through hypercalls. This backend owns the PV state:
/// what L0 offers and L1 negotiated, the CPUID table and MSR policies L1 registered, the PV map
/// (L2 GPA -> L1 GPA) and the PV exit page. L0 emulates the hot L2 exits from what L1
/// registered and delivers the rest to L1 through the exit page.
public final class PVBackend: NestingBackend {
    /// The PV state of the VM, which every vCPU's backend shares: L1 negotiates and registers
    /// once, on any vCPU, for all of them.
    public let vmState: PVVMState
    public var offered: PVFeatures {
        get { vmState.offered }
        set { vmState.offered = newValue }
    }
    public var negotiated: Bool {
        get { vmState.negotiated }
        set { vmState.negotiated = newValue }
    }
    public var enabled: PVFeatures {
        get { vmState.enabled }
        set { vmState.enabled = newValue }
    }
    public var argumentPage: L1GPA? {
        get { vmState.argumentPage }
        set { vmState.argumentPage = newValue }
    }
    public var refusal: PVRefusal? {
        get { vmState.refusal }
        set { vmState.refusal = newValue }
    }
    public var cpuid: CPUIDTable? {
        get { vmState.cpuid }
        set { vmState.cpuid = newValue }
    }
    public var msrPolicy: [UInt32: MSRPolicy] {
        get { vmState.msrPolicy }
        set { vmState.msrPolicy = newValue }
    }
    public var map: PVMap {
        get { vmState.map }
        set { vmState.map = newValue }
    }
    /// This vCPU's PV exit page, registered with create-vCPU: where L2 exits L1 must see are written.
    public internal(set) var exitPageGPA: L1GPA?
    public var vcpuCreated: Bool { exitPageGPA != nil }
    public var hasL2VCPU: Bool { vcpuCreated }

    /// KVM_MAX_CPUID_ENTRIES.
    public static let maxCPUIDEntries: UInt64 = 256

    public init(vmState: PVVMState = PVVMState()) { self.vmState = vmState }

    /// L1 hands L0 its ports itself (`registerL0Ports`).
    public var initialL0Devices: L0Devices { L0Devices() }

    public func configure(_ config: StackConfig) { offered = config.pvOffered }

    public func start(_ vcpu: L0VCPU, l2: inout RegisterFile) throws -> NextStep { .resume(.l1) }

    // MARK: L2 exits

    public func handleL2Exit(_ exit: L2Exit, _ regs: inout RegisterFile, _ vcpu: L0VCPU) -> NextStep {
        // L2's local APICs and its flush hypercall, where L1 enabled L0 to run them.
        if !enabled.isDisjoint(with: [.directAPIC, .directTLBFlush]),
           let next = vcpu.handleInterruptExit(exit, &regs, apic: enabled.contains(.directAPIC),
                                               flushHypercall: enabled.contains(.directTLBFlush)) { return next }
        switch exit.kind {
        case let .cpuid(leaf, subleaf):
            guard enabled.contains(.directCPUID), let table = cpuid else { return deliver(exit, regs, vcpu) }
            let (a, b, c, d) = table.lookup(function: leaf, index: subleaf)
            regs[.rax] = UInt64(a); regs[.rbx] = UInt64(b); regs[.rcx] = UInt64(c); regs[.rdx] = UInt64(d)
            regs.skipInstruction(length: exit.info.instructionLength)
            return .resume(.l2)
        case .msrRead(let msr), .msrWrite(let msr, _):
            guard enabled.contains(.directMSR), let policy = msrPolicy[msr] else { return deliver(exit, regs, vcpu) }
            switch policy.action {
            case .emulate: return emulatePolicyMSR(exit, msr: msr, writableMask: policy.writableMask, &regs, vcpu)
            case .injectGP:
                vcpu.inject(into: .l2, vector: 13, errorCode: 0)
                return .resume(.l2)
            case .passToL1: return deliver(exit, regs, vcpu)
            case .passthrough: return vcpu.handleL0MSR(exit, &regs)   // only if L2 exits anyway (it should not)
            }
        case .io(let io):
            if io.port == Ucall.port || (enabled.contains(.l0Ports) && vcpu.l0Devices.owns(io.port)) {
                return vcpu.handleL0PortIO(io, exit, &regs)
            }
            return deliver(exit, regs, vcpu)
        case let .eptViolation(gpa, access, _):
            if refill(gpa, access: access, vcpu) { return .resume(.l2) }     // lazily rebuilt after a fast zap
            // Nothing L1 mapped there: the xAPIC page, if L0 runs L2's APICs.
            if enabled.contains(.directAPIC), map.lookup(gpa) == nil, let next = vcpu.handleAPICPageAccess(exit, &regs) { return next }
            // Tell L1 what the current mapping allows (bits 3-5), so a permission fault and a
            // missing mapping look different.
            var e = exit
            e.info.qualification = access | vcpu.ept02.permissions(gpa) << EPTViolationQualification.readableShift
            return deliver(e, regs, vcpu)
        default:
            return deliver(exit, regs, vcpu)
        }
    }

    /// An MSR L0 emulates under L1's policy: reads return L0's value; a write may change only
    /// writable bits (anything else is #GP, as KVM does for reserved bits).
    func emulatePolicyMSR(_ exit: L2Exit, msr: UInt32, writableMask: UInt64, _ regs: inout RegisterFile, _ vcpu: L0VCPU) -> NextStep {
        let old = vcpu.l0MSRs[msr] ?? 0
        if case .msrWrite(_, let new) = exit.kind {
            guard (new ^ old) & ~writableMask == 0 else {
                vcpu.inject(into: .l2, vector: 13, errorCode: 0)
                return .resume(.l2)
            }
            vcpu.l0MSRs[msr] = new
        } else {
            regs.edxEax = old
        }
        regs.skipInstruction(length: exit.info.instructionLength)
        return .resume(.l2)
    }

    /// After a fast zap, PV mappings still stand: rebuild the EPT02 entry on first touch.
    func refill(_ gpa: L2GPA, access: UInt64, _ vcpu: L0VCPU) -> Bool {
        guard let m = map.lookup(gpa), access & ~m.permissions == 0,
              let l1 = m.l1Address(for: gpa.pageBase),
              let host = try? vcpu.l1Memory.memslots.translate(l1, length: pageSize),
              let slot = vcpu.l1Memory.memslots.slot(containing: l1) else { return false }
        vcpu.ept02.install(gpa.pageBase, host: host, permissions: m.permissions, memslot: slot.slot)
        vcpu.counters.ept02Fills += 1
        return true
    }

    /// Completes L1's pending enter-L2 hypercall with this exit in its PV exit page: L2's
    /// registers, then the exit as L0 reports it. L1 resumes with RAX = 0.
    func deliver(_ exit: L2Exit, _ regs: RegisterFile, _ vcpu: L0VCPU) -> NextStep {
        guard let page = exitPage(vcpu) else { return .stop(.fatal(.noPVExitPage(exit.info.reason))) }
        vcpu.l2Run.copy(to: page)      // the raw exit as L2 left it...
        page.registers = regs          // ...L2's registers...
        page.write(exit.info)          // ...and the exit as L0 reports it
        vcpu.counters.countDelivery(exit.info.reason)
        vcpu.counters.pvDeliveries += 1
        vcpu.countVMMUserspaceExit(exit)
        vcpu.l1Run[register: .rax] = 0
        return .resume(.l1)
    }

    /// The registered exit page, if it is still inside L1's memory.
    func exitPage(_ vcpu: L0VCPU) -> RunPageView? {
        guard let gpa = exitPageGPA else { return nil }
        return try? vcpu.l1Memory.runPage(at: gpa)
    }

    // MARK: L1 exits

    public func handleL1Exit(_ exit: L1Exit, _ regs: inout RegisterFile, _ vcpu: L0VCPU) -> NextStep {
        switch exit.kind {
        case let .hypercall(nr, args):
            return hypercall(nr, args, exit, &regs, vcpu)
        case .msrRead, .msrWrite:
            return vcpu.handleL1MSR(exit, &regs)
        case .vmx:
            // No VMX for a PV L1 (CR4.VMXE stays clear): the instruction raises #UD.
            vcpu.inject(into: .l1, vector: 6)
            return .resume(.l1)
        default:
            return .stop(.fatal(.unhandledL1Exit(exit.info.reason)))
        }
    }

    // MARK: memslots

    /// The PV map may no longer point into memory L1 does not have.
    public func memoryRemoved(_ range: AddressRange<L1GPA>, slot: UInt32, fastZap: Bool, _ vcpu: L0VCPU) {
        for m in map.mappings {
            guard let gone = m.l1Range.intersection(range),
                  let l2 = m.l2Address(for: gone.start) else { continue }
            map.remove(AddressRange(start: l2, length: gone.length)!)
        }
    }
}

/// The PV state of one VM: what this L0 offers (a stack option, so a test can offer less), what
/// L1 negotiated and its argument page, the CPUID table and MSR policies L1 registered, the PV
/// map (L2 GPA -> L1 GPA, one for the VM, as L2's memory is), and the last refusal (naming both
/// versions on a major mismatch, the host's reason for a protected-state VM).
public final class PVVMState {
    public var offered: PVFeatures = .all
    public var negotiated = false
    public var enabled: PVFeatures = []
    public var argumentPage: L1GPA?
    public var refusal: PVRefusal?
    public var cpuid: CPUIDTable?
    public var msrPolicy: [UInt32: MSRPolicy] = [:]
    public var map = PVMap()
    public init() {}
}

/// An MSR policy L1 registered for its L2.
public struct MSRPolicy: Equatable, Sendable {
    public var action: PVMSRAction
    public var writableMask: UInt64
}

/// Why L0 refused a PV request, as a value (`StackResult.pvRefusal`, printed by `pvm launch`).
public enum PVRefusal: Equatable, Sendable, CustomStringConvertible {
    case majorVersion(l1: PVABIVersion, l0: PVABIVersion)
    case unknownFeatures(UInt64)
    case notOffered(PVFeatures)
    /// The host will not run a nested guest in this VM (PV nesting in a protected-state L1,
    /// nested VMX in a TDX L1).
    case host(HostError)

    public var description: String {
        switch self {
        case let .majorVersion(l1, l0): "L1 speaks PV ABI \(l1), this L0 speaks \(l0): majors differ"
        case .unknownFeatures(let bits): "unknown feature bits 0x\(String(bits, radix: 16))"
        case .notOffered(let f): "features \(f) are not offered"
        case .host(let e): "\(e)"
        }
    }
}
