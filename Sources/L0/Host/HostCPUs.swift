#if canImport(Glibc)
import Glibc
#endif

/// The host's CPUs as the enabling code sees them: which are online, which have virtualization
/// enabled, and the per-CPU enable itself (KVM's `kvm_enable_virtualization_cpu`: VMXON plus the
/// per-CPU setup around it). Knows nothing about usage counts; `VirtualizationEnabling` decides
/// when a CPU is enabled.
struct HostCPUs {
    struct CPU {
        var online = true
        var virtualizationEnabled = false
    }

    private(set) var cpus: [CPU]
    /// CPUs whose enable fails (VMXON refused) until the failure is cleared: the test hook.
    var failingEnable: Set<Int>
    /// Per-CPU enables and disables done so far, for tests and the host benchmark.
    private(set) var enables = 0
    /// Per-CPU enables attempted, failed ones included (what the model prices).
    private(set) var enableAttempts = 0
    private(set) var disables = 0

    init(count: Int, failingEnable: Set<Int>) {
        precondition(count > 0, "a host needs at least one CPU")
        self.cpus = Array(repeating: CPU(), count: count)
        self.failingEnable = failingEnable
    }

    var count: Int { cpus.count }
    func contains(_ cpu: Int) -> Bool { cpus.indices.contains(cpu) }
    func isOnline(_ cpu: Int) -> Bool { cpus[cpu].online }
    func isEnabled(_ cpu: Int) -> Bool { cpus[cpu].virtualizationEnabled }
    var online: [Int] { cpus.indices.filter { cpus[$0].online } }
    var enabled: Set<Int> { Set(cpus.indices.filter { cpus[$0].virtualizationEnabled }) }

    /// Enables virtualization on one CPU. An attempt counts whether or not it succeeds, as a
    /// VMXON that faults has still run the per-CPU preparation before it: its cost is what the
    /// cost profile prices (`cpu_virtualization_enable`), never spent here.
    mutating func enable(_ cpu: Int) throws(HostError) {
        precondition(cpus[cpu].online && !cpus[cpu].virtualizationEnabled, "enable of CPU \(cpu) out of order")
        enableAttempts += 1
        if failingEnable.contains(cpu) { throw .enableFailed(cpu: cpu) }
        cpus[cpu].virtualizationEnabled = true
        enables += 1
    }

    /// VMXOFF: cannot fail, and is cheap enough not to model a cost for.
    mutating func disable(_ cpu: Int) {
        precondition(cpus[cpu].virtualizationEnabled, "disable of CPU \(cpu), which is not enabled")
        cpus[cpu].virtualizationEnabled = false
        disables += 1
    }

    mutating func setOnline(_ cpu: Int, _ online: Bool) {
        precondition(!cpus[cpu].virtualizationEnabled, "CPU \(cpu) changes online state with virtualization enabled")
        cpus[cpu].online = online
    }

    /// The CPUs this machine has online: the default for the modelled host.
    static var machineCount: Int {
        max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
    }
}
