import ABI
import Histogram

/// A guest program, the way KVM selftests write `guest_code`: straight-line code against the
/// guest CPU, talking to the harness with sync / guestAssert / done.
public struct GuestProgram: Sendable {
    public let name: String
    public let summary: String
    public let body: @Sendable (GuestCPU, [UInt64]) -> Void
}

/// The L2 GPA every program finds unmapped: above L2's RAM, below the EPT02 limit.
public let unmappedProbeGPA = L2GPA(0x8000_0000)

public enum GuestPrograms {
    public static let all: [GuestProgram] = [cpuidBench, cpuidValues, memoryProbe, cpuidForever]

    public static func named(_ name: String) -> GuestProgram? { all.first { $0.name == name } }

    /// Times one operation per iteration between two syncs that bracket the measurement window.
    /// args: [iterations, warmup].
    static func measureLoop(_ cpu: GuestCPU, _ args: [UInt64], _ op: () -> Void) {
        let iterations = args.count > 0 ? args[0] : 10_000
        let warmup = args.count > 1 ? args[1] : iterations / 10
        for _ in 0..<warmup { op() }
        var h = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        var total: UInt64 = 0
        cpu.sync(UcallStage.measureStart, iterations)
        for _ in 0..<iterations {
            let t0 = cpu.now()
            op()
            let dt = cpu.now() &- t0
            h.record(dt)
            total &+= dt
        }
        cpu.sync(UcallStage.measureEnd, iterations)
        cpu.report(samples: iterations, min: h.min, median: h.valueAtPercentile(50), p99: h.valueAtPercentile(99),
                   max: h.max, total: total)
    }

    /// vmexit.c's `cpuid` test: CPUID leaf 0 in a loop.
    public static let cpuidBench = GuestProgram(name: "cpuid", summary: "CPUID.0 per iteration (vmexit.c cpuid)") { cpu, args in
        measureLoop(cpu, args) { _ = cpu.cpuid(0, 0) }
        cpu.done()
    }

    /// Reports what CPUID returns for a set of leaves (one sync per leaf: function, index, a, b, c, d).
    public static let cpuidValuesLeaves: [(UInt32, UInt32)] = [
        (0, 0), (1, 0), (7, 0), (0xD, 0), (0xD, 1), (0x4000_0000, 0), (0x8000_0000, 0), (0x8000_0001, 0), (0x42, 0),
    ]
    public static let cpuidValues = GuestProgram(name: "cpuid-values", summary: "reports CPUID for a fixed set of leaves") { cpu, _ in
        for (f, i) in cpuidValuesLeaves {
            let r = cpu.cpuid(f, i)
            cpu.sync(UInt64(f), UInt64(i), UInt64(r.eax), UInt64(r.ebx), UInt64(r.ecx), UInt64(r.edx))
        }
        cpu.done()
    }

    /// args: [gpa, pattern]. Stores `pattern` at L2 GPA `gpa` and reads it back; then reads an
    /// L2 GPA nothing maps (L1 must see that exit; unassigned memory reads as all ones).
    public static let memoryProbe = GuestProgram(name: "memory-probe", summary: "store to a mapped page, read an unmapped one") { cpu, args in
        let gpa = L2GPA(args.count > 0 ? args[0] : 0x20_0000)
        let pattern = args.count > 1 ? args[1] : 0x5056_4D21_C0FF_EE00
        cpu.write64(gpa, pattern)
        let back = cpu.read64(gpa)
        cpu.guestAssert(back == pattern, "read back \(back) after storing \(pattern)")
        cpu.sync(gpa.raw, back)
        let floating = cpu.read64(unmappedProbeGPA)
        cpu.sync(unmappedProbeGPA.raw, floating)
        cpu.done()
    }

    /// CPUID until the stack is stopped or a tier is killed (for lifecycle tests).
    public static let cpuidForever = GuestProgram(name: "cpuid-forever", summary: "CPUID in an endless loop") { cpu, _ in
        cpu.sync(1)
        while true { _ = cpu.cpuid(0, 0) }
    }
}
