import ABI

/// Why the host refused an operation. Every refusal leaves the host as it was: no CPU left
/// enabled by a failed attempt, the usage count unchanged, no VM half-created.
public enum HostError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Enabling virtualization on this CPU failed (VMXON refused). The CPUs the same attempt had
    /// already enabled were disabled again; a CPU being brought online stays offline.
    case enableFailed(cpu: Int)
    /// The one-time protected-VM setup (TDX module initialisation) failed; it is retried next time.
    case oneTimeSetupFailed
    /// KVM_CREATE_VM with a type this host does not advertise in KVM_CAP_VM_TYPES.
    case unsupportedVMType(rawType: UInt32, supported: VMTypeMask)
    /// A type the hardware supports but that needs the one-time setup, which is off on this host.
    case vmTypeNeedsOneTimeSetup(VMType)
    /// A PV-nested L2 was asked for inside a VM with protected state.
    case pvNestingRefused(vm: Int, type: VMType)
    /// VMXON inside a TDX VM: a TDX guest has no VMX.
    case nestedVMXRefused(vm: Int, type: VMType)
    case noSuchVM(Int)
    case noSuchCPU(Int, cpuCount: Int)
    /// The last online CPU cannot go offline (Linux keeps one CPU online).
    case lastOnlineCPU(Int)
    /// Nothing but resume runs while the host is suspended.
    case suspended
    /// The host cannot be unloaded while VMs exist (each VM pins the module).
    case vmsStillExist(Int)
    /// The host was unloaded.
    case unloaded

    public var description: String {
        switch self {
        case .enableFailed(let cpu):
            "enabling virtualization failed on CPU \(cpu); every CPU this attempt had enabled was disabled again"
        case .oneTimeSetupFailed:
            "the one-time protected-VM setup (TDX module initialisation) failed; it will be retried by the next attempt"
        case let .unsupportedVMType(raw, supported):
            "VM type \(raw)\(VMType(rawValue: raw).map { " (\($0.uapiName))" } ?? "") is not supported by this host; "
                + "KVM_CAP_VM_TYPES = \(supported)"
        case .vmTypeNeedsOneTimeSetup(let t):
            "VM type \(t) needs the one-time protected-VM setup, which is off on this host "
                + "(opt in with --one-time-setup at-load or --one-time-setup on-first-protected-vm)"
        case let .pvNestingRefused(vm, type):
            "VM \(vm) (\(type.name)) has protected state: a PV-nested L2 needs L0 to emulate instructions "
                + "and map memory for L2 on L1's behalf, and L0 cannot leave the TCB of a protected-state L1, "
                + "so the PV nesting ABI refuses to create an L2 vCPU there"
        case let .nestedVMXRefused(vm, type):
            "VM \(vm) (\(type.name)) is a TDX guest, and a TDX guest has no VMX (the TDX module does not "
                + "virtualize it): its VMXON is #UD, so nested VMX cannot run there; use --vm-type default "
                + "or sw-protected for a nested-VMX L1"
        case .noSuchVM(let id): "no VM with id \(id) on this host"
        case let .noSuchCPU(cpu, count): "no CPU \(cpu): this host models CPUs 0..<\(count)"
        case .lastOnlineCPU(let cpu): "CPU \(cpu) is the last online CPU and cannot go offline"
        case .suspended: "the host is suspended; resume it first"
        case .vmsStillExist(let n): "cannot unload the host while \(n) VM\(n == 1 ? "" : "s") exist"
        case .unloaded: "the host was unloaded"
        }
    }
}
