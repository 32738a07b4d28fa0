import CPVMShim
#if canImport(Glibc)
import Glibc
#endif

/// A child tier's least privilege, entered once its memory is mapped (`TierSession`): its
/// descriptors closed, so nothing more can be mapped; fatal signals at their default, so a
/// fault ends it with its own signal; and a seccomp allow-list of the system calls a tier needs
/// (Firecracker's vCPU-thread filter, in C in the shim). Any other call kills the tier with
/// SIGSYS, and L0 reports it (`StopReason.tierDied`).
public enum TierSandbox {
    public struct Refused: Error, CustomStringConvertible {
        public let errno: Int32
        public var description: String { "cannot enter the tier sandbox (seccomp): \(String(cString: strerror(errno)))" }
    }

    /// Enters the sandbox; there is no way back. `regions` are the mappings whose descriptors
    /// this closes (they stay mapped).
    public static func enter(closing regions: [SharedRegion]) throws {
        let r = pvm_enter_tier_sandbox()
        for region in regions { region.forgetDescriptor() }
        guard r == 0 else { throw Refused(errno: -r) }
    }

    /// The system calls the sandbox allows, by name (kill and tgkill: towards the tier itself).
    public static var allowedSystemCalls: [String] {
        var names: [String] = []
        var i: Int32 = 0
        while let p = pvm_sandbox_syscall_name(i) {
            names.append(String(cString: p))
            i += 1
        }
        return names
    }
}

/// What a hostile tier tries against its sandbox: used only by the guest programs that test
/// L0's defences (`l2-escape`). Each returns what the kernel answered, if the tier survives.
public enum SandboxProbe {
    /// kill(pid, 0) (an existence check: harmless even if it got through). Under the sandbox a
    /// pid other than the tier's own kills the tier with SIGSYS.
    public static func signal(_ pid: Int32) -> Int32 { -pvm_probe_kill(pid, 0) }
    /// How many descriptors above 2 this process still had open (closing them).
    public static func closeDescriptors() -> Int32 { pvm_probe_close_descriptors() }
    /// The caller itself.
    public static var me: Int32 { getpid() }
    /// The caller's parent: L0.
    public static var parent: Int32 { getppid() }
    /// open(2) of a path read-only: 0 (and closed again) or the errno. Under the sandbox, SIGSYS.
    public static func open(_ path: String) -> Int32 {
        let fd = Glibc.open(path, O_RDONLY)
        if fd < 0 { return errno }
        close(fd)
        return 0
    }
}

extension EPT02TableView {
    /// A store into entry `frame` that ignores the mapping's protection: in a tier that maps
    /// the table read-only (L2) it faults. For the programs that test L0's defences only.
    public func probeOverwrite(frame: UInt64, with value: UInt64) {
        precondition(frame < entries.count, "entry \(frame) of a \(entries.count)-entry table")
        entries.region.probeStore(value, at: entries.base + frame * 8)
    }

    /// Tries to make this process's mapping of the table writable: 0 or the errno.
    public func probeMakeWritable() -> Int32 { entries.region.probeMakeWritable() }
}
