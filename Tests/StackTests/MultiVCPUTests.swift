// Several vCPUs per stack (issue 15): every path but pvm-rfc, through the real three tiers.
import ABI
import Bench
import L0
import L2Guest
import Testing

extension StackTests {
@Suite struct MultiVCPUTests {
    static let paths: [NestingPath] = NestingPath.allCases.filter { !$0.usesSwitcher }

    func run(_ path: NestingPath, program: String, vcpus: Int, args: [UInt64] = []) throws -> StackResult {
        var config = StackConfig(path: path, program: program, programArguments: args, tierExecutable: PVMBinary.path)
        config.vcpuCount = vcpus
        return try L0Stack(config: config).run()
    }

    /// Each vCPU runs the program with its own index, on its own lane and ucall block: its
    /// harness log holds its index and nobody else's; the rendezvous lets each see every
    /// vCPU's mark in the memory they share.
    @Test(arguments: paths)
    func everyVCPURunsTheProgramWithItsOwnIndexAndSeesTheOthersMarks(_ path: NestingPath) throws {
        let n = 4
        let r = try run(path, program: "vcpu-probe", vcpus: n)
        #expect(r.succeeded, "\(r.stop)")
        #expect(r.perVCPU.count == n)
        let marks = (0..<UInt64(n)).reduce(0) { $0 + 0x100 + $1 }
        for (i, v) in r.perVCPU.enumerated() {
            #expect(Array(v.harness.syncs) == [[0x5C, UInt64(i), UInt64(n), 0, 0, 0], [0x5D, marks, 0, 0, 0, 0]], "vCPU \(i) on \(path)")
        }
    }

    /// A measured test on every vCPU at once: each vCPU's window holds exactly its own
    /// operations, as a one-vCPU stack's does (the exits of one never land in another's counts).
    @Test(arguments: paths)
    func eachVCPUsWindowCountsExactlyItsOwnExits(_ path: NestingPath) throws {
        let one = try BenchRunner(tierExecutable: PVMBinary.path, iterations: 300, warmup: 10).run("cpuid", on: BenchVariant(path: path))
        let many = try BenchRunner(tierExecutable: PVMBinary.path, iterations: 300, warmup: 10).run("cpuid", on: BenchVariant(path: path), vcpus: 3)
        #expect(many.count == 3)
        for (i, r) in many.enumerated() {
            #expect(r.iterations == 300)
            #expect(r.window.l2Exits == one.window.l2Exits, "vCPU \(i) on \(path)")
            #expect(r.window.l1Exits == one.window.l1Exits, "vCPU \(i) on \(path)")
            #expect(r.window.deliveries == one.window.deliveries, "vCPU \(i) on \(path)")
        }
    }

    /// More vCPUs than cores, each exiting as fast as it can: the stack finishes (L0 waits on
    /// every lane at once and no child spins on a core it shares).
    @Test func eightVCPUsOnTwoCoresFinish() throws {
        let rs = try BenchRunner(tierExecutable: PVMBinary.path, iterations: 2_000, warmup: 10).run("cpuid", on: BenchVariant(path: .nvmx), vcpus: 8)
        #expect(rs.count == 8 && rs.allSatisfy { $0.iterations == 2_000 })
    }

    /// pvm-rfc's switcher area is one vCPU's: a stack of two is refused before anything runs,
    /// as is a count past the limit.
    @Test func pvmRFCAndTooManyVCPUsAreRefused() throws {
        var config = StackConfig(path: .pvmRFC, program: "cpuid", tierExecutable: PVMBinary.path)
        config.vcpuCount = 2
        #expect(throws: StackError.self) { _ = try L0Stack(config: config) }
        config.path = .pv
        config.vcpuCount = StackConfig.vcpuLimit + 1
        #expect(throws: StackError.self) { _ = try L0Stack(config: config) }
    }
}
}
