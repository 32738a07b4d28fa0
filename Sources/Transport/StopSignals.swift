import CPVMShim

/// SIGINT and SIGTERM as a request to stop: L0 installs the handlers, its vCPU loop asks
/// `received` whenever it checks liveness, and the stack stops in its written shutdown order,
/// reporting what it measured. Child tiers ignore both: L0 stops them.
public enum StopSignals {
    /// Installs the handlers (idempotent). A second signal ends the process the default way.
    public static func install() {
        // sigaction fails only for an invalid signal or handler, neither possible here.
        let r = pvm_install_stop_handlers()
        precondition(r == 0, "sigaction(SIGINT/SIGTERM) failed: \(-r)")
    }

    /// For child tiers: SIGINT and SIGTERM ignored.
    public static func ignore() {
        _ = pvm_ignore_stop_signals()
    }

    /// The first SIGINT or SIGTERM since `install`, nil if none.
    public static var received: Int32? {
        let s = pvm_stop_signal()
        return s == 0 ? nil : s
    }
}
