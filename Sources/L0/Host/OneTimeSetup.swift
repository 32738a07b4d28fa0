/// When the host does its expensive one-time setup for protected-state VMs, modelled on TDX
/// module initialisation (seeds/002). Opt-in, off by default, as the thread settled on.
public enum OneTimeSetupPolicy: String, Sendable, CaseIterable {
    /// Never done; the VM types that need it are not advertised and are refused.
    case off
    /// Done while the host loads: predictable, the feature set is frozen before any VM exists,
    /// and no customer's first protected VM pays for it (the KVM maintainers' preference).
    case atLoad = "at-load"
    /// Done by the first VM of a type that needs it: hosts that never run one never pay.
    case onFirstProtectedVM = "on-first-protected-vm"
}

/// The setup itself: done at most once successfully; its cost is what the cost profile prices
/// (`one_time_setup`) per attempt, never spent here. It
/// needs virtualization enabled on every CPU while it runs (TDX module initialisation needs VMXON
/// on all of them); the caller holds a usage reference around it.
struct OneTimeSetup {
    let policy: OneTimeSetupPolicy
    /// The test hook: while set, every attempt fails.
    var failing: Bool
    private(set) var done = false
    /// Successful runs; never more than 1.
    private(set) var runs = 0
    private(set) var attempts = 0

    init(policy: OneTimeSetupPolicy, failing: Bool) {
        self.policy = policy
        self.failing = failing
    }

    /// Runs the setup unless it is already done.
    mutating func ensureDone() throws(HostError) {
        guard !done else { return }
        precondition(policy != .off, "one-time setup requested while it is off")
        attempts += 1
        if failing { throw .oneTimeSetupFailed }
        done = true
        runs += 1
    }
}
