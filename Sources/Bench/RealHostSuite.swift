import ABI
import Foundation
import L0
import Transport

/// One figure of the host suite, whichever host it comes from: what was timed, under which
/// setting, over how many samples, and where it comes from (`source`): `kvm` (measured through
/// /dev/kvm), `emulated` (measured on the emulated L0 host) or `model` (priced, not measured).
public struct HostFigure: Sendable, Equatable, Encodable {
    public enum Source: String, Sendable, Encodable { case kvm, emulated, model }
    public var source: Source
    public var what: String
    public var setting: String
    public var samples: Int
    public var minNanos: UInt64?
    public var medianNanos: UInt64
    public var maxNanos: UInt64?

    enum CodingKeys: String, CodingKey {
        case source, what, setting, samples, minNanos = "min_ns", medianNanos = "median_ns", maxNanos = "max_ns"
    }

    /// Every key in every row: min_ns and max_ns are null where a figure has only a median.
    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(source, forKey: .source)
        try c.encode(what, forKey: .what)
        try c.encode(setting, forKey: .setting)
        try c.encode(samples, forKey: .samples)
        if let minNanos { try c.encode(minNanos, forKey: .minNanos) } else { try c.encodeNil(forKey: .minNanos) }
        try c.encode(medianNanos, forKey: .medianNanos)
        if let maxNanos { try c.encode(maxNanos, forKey: .maxNanos) } else { try c.encodeNil(forKey: .maxNanos) }
    }
}

/// The real host's side of `pvm bench --suite host`: what serves /dev/kvm, its
/// enable_virt_at_load and VM types, and a VM's lifecycle timed in fresh processes (each runs
/// `pvm __kvm-lifecycle` once, so its first KVM_CREATE_VM is a process's first).
public enum RealHostSuite {
    public struct Report: Sendable {
        public var facts: KVMHostFacts
        public var figures: [HostFigure]
    }

    /// Why the real host was not measured: the device cannot be opened (no KVM, no permission).
    public struct Unavailable: Error, CustomStringConvertible {
        public let reason: String
        public var description: String { "real KVM not measured: \(reason)" }
    }

    /// A measurement on a KVM that could be opened went wrong.
    public struct Failed: Error, CustomStringConvertible {
        public let reason: String
        public var description: String { "real KVM measurement failed: \(reason)" }
    }

    public static func run(tierExecutable: String, device: String = "/dev/kvm", processes: Int = 7,
                           progress: (Int) -> Void = { _ in }) throws -> Report {
        let facts: KVMHostFacts
        do { facts = try KVMHostFacts.read(device: device) } catch { throw Unavailable(reason: "\(error)") }
        var samples: [KVMLifecycleTimes] = []
        for i in 0..<max(1, processes) {
            progress(i)
            samples.append(try lifecycleInFreshProcess(tierExecutable: tierExecutable, device: device))   // Failed: the caller says so
        }
        let setting = "enable_virt_at_load=\(facts.enableVirtAtLoad ?? "absent") (read-only at run time)"
        func figure(_ what: String, _ pick: (KVMLifecycleTimes) -> UInt64) -> HostFigure {
            let v = samples.map(pick)
            return HostFigure(source: .kvm, what: what, setting: setting, samples: v.count, minNanos: v.min(),
                              medianNanos: Median.of(v), maxNanos: v.max())
        }
        return Report(facts: facts, figures: [
            figure("KVM_CREATE_VM, a fresh process's first", \.firstCreateVMNanos),
            figure("KVM_CREATE_VM, the next one", \.nextCreateVMNanos),
            figure("KVM_CREATE_VCPU", \.createVCPUNanos),
            figure("destroying the last VM (close)", \.destroyLastVMNanos),
        ])
    }

    /// Runs `tierExecutable __kvm-lifecycle --device D` and reads its one JSON line.
    static func lifecycleInFreshProcess(tierExecutable: String, device: String) throws -> KVMLifecycleTimes {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tierExecutable)
        p.arguments = ["__kvm-lifecycle", "--device", device]
        // One pipe for both streams, read to the end: the JSON line is the last one on success,
        // the error the last one on failure (two pipes read one after the other could block).
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        do { try p.run() } catch { throw Failed(reason: "cannot start \(tierExecutable): \(error)") }
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        let last = text.split(separator: "\n").last.map(String.init) ?? ""
        guard p.terminationStatus == 0, let times = try? JSONDecoder().decode(KVMLifecycleTimes.self, from: Data(last.utf8)) else {
            throw Failed(reason: last.isEmpty ? "the lifecycle probe failed" : last)
        }
        return times
    }

    /// The real host as a person reads it.
    public static func table(_ r: Report) -> String {
        var s = "Real host (measured through \(r.facts.device), each figure over \(r.figures.first?.samples ?? 0) fresh processes):\n"
        let modules = r.facts.modules.map { "\($0.rawValue) (\($0.meaning))" }.joined(separator: "; ")
        s += "  served by: \(modules.isEmpty ? "no vendor module found in /sys/module" : modules)\n"
        s += "  enable_virt_at_load: \(r.facts.enableVirtAtLoad ?? "absent (this kernel predates it)")"
            + " (a module parameter, read-only at run time: the figures below belong to this setting)\n"
        s += "  VM types (KVM_CAP_VM_TYPES): \(r.facts.vmTypeMask.map { "\($0)" } ?? "not answered (before Linux 6.8: default VMs only)")\n"
        s += "  " + "what".padding(toLength: 42, withPad: " ", startingAt: 0) + "min".leftPad(12) + "median".leftPad(12) + "max".leftPad(12) + "\n"
        for f in r.figures {
            s += "  " + f.what.padding(toLength: 42, withPad: " ", startingAt: 0)
                + HostSuite.duration(f.minNanos ?? 0).leftPad(12) + HostSuite.duration(f.medianNanos).leftPad(12)
                + HostSuite.duration(f.maxNanos ?? 0).leftPad(12) + "\n"
        }
        return s
    }
}

extension String {
    /// Right-aligned in `n` columns (as is when longer): `Report.pad`, for the command line too.
    public func leftPad(_ n: Int) -> String { Report.pad(self, n, right: true) }
}
