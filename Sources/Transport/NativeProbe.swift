import CPVMShim

/// This machine's own one-level costs, timed in this process (`pvm calibrate`): what a guest of
/// the hypervisor below this machine pays, next to what a guest of this machine's /dev/kvm pays.
public enum NativeProbe {
    /// ns per CPUID executed natively: inside a VM it traps to the hypervisor below (an exit).
    public static func cpuidNanos(leaf: UInt32 = 0, count: UInt64) -> Double? {
        per(pvm_time_native_cpuid(leaf, count), count)
    }
    /// ns per getpid system call (SYSCALL/SYSRET and a null handler).
    public static func syscallNanos(count: UInt64) -> Double? { per(pvm_time_getpid(count), count) }
    /// ns per first write to a fresh anonymous page (a minor fault, the page allocated and zeroed).
    public static func pageFaultNanos(pages: UInt64) -> Double? { per(pvm_time_page_faults(pages), pages) }

    private static func per(_ total: UInt64, _ n: UInt64) -> Double? {
        total == 0 || n == 0 ? nil : Double(total) / Double(n)
    }
}
