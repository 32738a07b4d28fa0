import ABI
import Synchronization

/// The host side of KVM as a whole: the loaded module with its CPUs, the VMs it created, and
/// when virtualization is enabled on each CPU. Every operation takes the one lock (KVM's
/// `kvm_usage_lock` with the CPU-hotplug lock), so VM creation, VM destruction, hotplug and
/// suspend/resume are serialized, as cpuhp bring-up is serialized across CPUs. What the per-CPU
/// enables and the one-time setup cost is not spent here: the host counts them (`Status`), and
/// the cost profile prices them (`pvm bench --suite host` prints those figures as modelled).
///
/// The stacks `L0Stack` runs are one VM each; this object models what happens around them.
public final class L0Host: Sendable {
    /// What the modelled hardware can run: an Intel host with TDX (VMXON is what enabling costs).
    public static let defaultHardwareVMTypes = VMTypeMask([.default, .swProtected, .tdx])
    /// The default CPU count: this machine's online CPUs.
    public static var machineCPUCount: Int { HostCPUs.machineCount }

    public let cpuCount: Int
    /// KVM's `enable_virt_at_load`: the loaded host holds a usage reference of its own.
    public let enableVirtAtLoad: Bool
    public let oneTimeSetupPolicy: OneTimeSetupPolicy
    /// The types the hardware could run, before the host's own configuration narrows them.
    public let hardwareVMTypes: VMTypeMask
    /// What KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES) answers: the hardware's types, less the
    /// protected-state ones when the one-time setup they need is off (as KVM without enable_tdx).
    public let supportedVMTypes: VMTypeMask

    private struct State {
        var enabling: VirtualizationEnabling
        var setup: OneTimeSetup
        var vms: [Int: VMHandle] = [:]
        var nextVMID = 1
        var loaded = true
    }
    private let state: Mutex<State>

    /// Loads the host ("module load"). With `enableVirtAtLoad`, enables virtualization on every
    /// online CPU now; with `oneTimeSetup: .atLoad`, runs the setup now (enabling virtualization
    /// around it if it is not already on). Either failing fails the load, with nothing left on.
    ///
    /// `failingEnableCPUs` and `failOneTimeSetup` are the failure hooks: enabling on those CPUs,
    /// or the setup, fails until cleared (`setEnableFailure`, `setOneTimeSetupFailure`).
    public init(cpuCount: Int = L0Host.machineCPUCount,
                enableVirtAtLoad: Bool = true,
                oneTimeSetup: OneTimeSetupPolicy = .off,
                hardwareVMTypes: VMTypeMask = L0Host.defaultHardwareVMTypes,
                failingEnableCPUs: Set<Int> = [],
                failOneTimeSetup: Bool = false) throws(HostError) {
        self.cpuCount = cpuCount
        self.enableVirtAtLoad = enableVirtAtLoad
        self.oneTimeSetupPolicy = oneTimeSetup
        self.hardwareVMTypes = hardwareVMTypes
        self.supportedVMTypes = oneTimeSetup == .off
            ? VMTypeMask(hardwareVMTypes.types.filter { !VMCapabilities(type: $0).needsOneTimeSetup })
            : hardwareVMTypes
        var s = State(
            enabling: VirtualizationEnabling(cpus: HostCPUs(count: cpuCount, failingEnable: failingEnableCPUs)),
            setup: OneTimeSetup(policy: oneTimeSetup, failing: failOneTimeSetup))
        if enableVirtAtLoad { try s.enabling.acquire() }
        if oneTimeSetup == .atLoad {
            // The setup needs every CPU enabled; without enable_virt_at_load, only for its duration.
            if !enableVirtAtLoad { try s.enabling.acquire() }
            do {
                try s.setup.ensureDone()
            } catch {
                s.enabling.release()
                throw error
            }
            if !enableVirtAtLoad { s.enabling.release() }
        }
        self.state = Mutex(s)
    }

    // MARK: VMs

    /// KVM_CREATE_VM. Takes a usage reference (the first one enables every online CPU, rolled back
    /// if one fails); a protected-state type then runs the one-time setup if it is not done yet.
    /// On any error the host is as it was: no VM, the same usage count, no CPU newly enabled.
    public func createVM(type: VMType = .default) throws(HostError) -> VMHandle {
        try createVM(rawType: type.rawValue)
    }

    /// KVM_CREATE_VM with the raw type number userspace passes, unknown numbers included.
    public func createVM(rawType: UInt32) throws(HostError) -> VMHandle {
        guard let type = VMType(rawValue: rawType), supportedVMTypes.contains(type) else {
            if let type = VMType(rawValue: rawType), hardwareVMTypes.contains(type) {
                throw .vmTypeNeedsOneTimeSetup(type)
            }
            throw .unsupportedVMType(rawType: rawType, supported: supportedVMTypes)
        }
        return try state.withLock { (s) throws(HostError) -> VMHandle in
            guard s.loaded else { throw .unloaded }
            try s.enabling.acquire()
            let vm = VMHandle(id: s.nextVMID, type: type)
            if vm.capabilities.needsOneTimeSetup {
                do throws(HostError) {
                    try s.setup.ensureDone()
                } catch {
                    s.enabling.release()
                    throw error
                }
            }
            s.nextVMID += 1
            s.vms[vm.id] = vm
            return vm
        }
    }

    /// The last reference of the file descriptor goes: drops the VM's usage reference (the last
    /// one disables every CPU when virtualization is not held on at load).
    public func destroyVM(_ vm: VMHandle) throws(HostError) {
        try state.withLock { (s) throws(HostError) in
            guard !s.enabling.suspended else { throw .suspended }
            guard s.vms.removeValue(forKey: vm.id) != nil else { throw .noSuchVM(vm.id) }
            s.enabling.release()
        }
    }

    /// Module unload: refused while VMs exist; drops the load's usage reference.
    public func unload() throws(HostError) {
        try state.withLock { (s) throws(HostError) in
            guard s.loaded else { throw .unloaded }
            guard !s.enabling.suspended else { throw .suspended }
            guard s.vms.isEmpty else { throw .vmsStillExist(s.vms.count) }
            if enableVirtAtLoad { s.enabling.release() }
            s.loaded = false
        }
    }

    // MARK: CPU hotplug and power management

    /// A CPU comes online: virtualization is enabled on it iff the usage count is > 0. If that
    /// enable fails the CPU stays offline and the error names it.
    public func cpuOnline(_ cpu: Int) throws(HostError) {
        try state.withLock { (s) throws(HostError) in
            guard s.enabling.cpus.contains(cpu) else { throw .noSuchCPU(cpu, cpuCount: cpuCount) }
            try s.enabling.online(cpu)
        }
    }

    /// A CPU goes offline, disabling virtualization on it first. VMs keep running on the others.
    public func cpuOffline(_ cpu: Int) throws(HostError) {
        try state.withLock { (s) throws(HostError) in
            guard s.enabling.cpus.contains(cpu) else { throw .noSuchCPU(cpu, cpuCount: cpuCount) }
            try s.enabling.offline(cpu)
        }
    }

    /// Suspend: virtualization off on every CPU; VMs and the usage count survive.
    public func suspend() {
        state.withLock { $0.enabling.suspend() }
    }

    /// Resume: virtualization back on every online CPU if the usage count is > 0. Returns the
    /// CPUs whose enable failed; they stay offline.
    @discardableResult
    public func resume() -> Set<Int> {
        state.withLock { $0.enabling.resume() }
    }

    // MARK: queries

    /// One consistent snapshot of the host, taken under the lock.
    public struct Status: Equatable, Sendable {
        /// KVM's `kvm_usage_count`: one per VM, plus one for the host itself with enableVirtAtLoad.
        public var usageCount: Int
        public var vms: [VMHandle]
        public var onlineCPUs: Set<Int>
        public var enabledCPUs: Set<Int>
        public var suspended: Bool
        public var loaded: Bool
        public var oneTimeSetupDone: Bool
        /// Successful one-time setups (0 or 1) and attempts, failed ones included.
        public var oneTimeSetupRuns: Int
        public var oneTimeSetupAttempts: Int
        /// Per-CPU enables and disables since load; enable attempts, failed ones included.
        public var perCPUEnables: Int
        public var perCPUEnableAttempts: Int
        public var perCPUDisables: Int
        /// Outside suspend, the online CPUs are enabled iff usageCount > 0, and no offline CPU is.
        public var enablingRuleHolds: Bool
    }

    public var status: Status {
        state.withLock { s in
            Status(usageCount: s.enabling.usageCount,
                   vms: s.vms.values.sorted { $0.id < $1.id },
                   onlineCPUs: Set(s.enabling.cpus.online),
                   enabledCPUs: s.enabling.cpus.enabled,
                   suspended: s.enabling.suspended,
                   loaded: s.loaded,
                   oneTimeSetupDone: s.setup.done,
                   oneTimeSetupRuns: s.setup.runs,
                   oneTimeSetupAttempts: s.setup.attempts,
                   perCPUEnables: s.enabling.cpus.enables,
                   perCPUEnableAttempts: s.enabling.cpus.enableAttempts,
                   perCPUDisables: s.enabling.cpus.disables,
                   enablingRuleHolds: s.enabling.invariantHolds)
        }
    }

    public var usageCount: Int { status.usageCount }
    public var enabledCPUs: Set<Int> { status.enabledCPUs }
    public var onlineCPUs: Set<Int> { status.onlineCPUs }
    public var vms: [VMHandle] { status.vms }

    /// KVM_CHECK_EXTENSION: the supported-types mask for KVM_CAP_VM_TYPES, 0 for anything else.
    public func checkExtension(_ capability: UInt32) -> UInt32 {
        capability == KVMCapability.vmTypes ? supportedVMTypes.rawValue : 0
    }

    // MARK: failure hooks

    /// Makes enabling on `cpu` fail (VMXON refused) until called again with `failing: false`.
    public func setEnableFailure(cpu: Int, failing: Bool) {
        state.withLock { s in
            if failing { s.enabling.cpus.failingEnable.insert(cpu) } else { s.enabling.cpus.failingEnable.remove(cpu) }
        }
    }

    /// Makes the one-time setup fail until called again with `false`.
    public func setOneTimeSetupFailure(_ failing: Bool) {
        state.withLock { $0.setup.failing = failing }
    }
}
