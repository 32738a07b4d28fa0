import ABI
import Bench
import L2Guest
import Testing

extension StackTests {
/// The whole benchmark suite in a short mode: every test on every path (and every map mode for
/// first touch) runs to completion and counts what its design says, so none of them rots.
@Suite(.serialized) struct SuiteSmokeTests {
    @Test func everyTestRunsOnEveryPathInShortMode() throws {
        let runner = BenchRunner(tierExecutable: PVMBinary.path, iterations: 64, warmup: 0)
        for op in BenchOperations.all {
            for v in BenchRunner.defaultVariants(for: op.name, paths: NestingPath.allCases) {
                let r = try runner.run(op.name, on: v)
                #expect(r.iterations == 64, "\(op.name) on \(v.label)")
                // An operation either never exits, or every one of them reaches L0 at least once.
                let passThrough = op.name.hasSuffix("kernel_gs_base")
                let eagerTouch = op.name == "ept_first_touch" && (v.path == .single || (v.path == .pv && v.l2MapMode != .perPage))
                if passThrough || eagerTouch {
                    #expect(r.l2ExitsPerOp < 0.1, "\(op.name) on \(v.label): \(r.l2ExitsPerOp) exits per op")
                } else {
                    #expect(r.l2ExitsPerOp >= 1.0 || v.l2MapMode == .batch, "\(op.name) on \(v.label)")
                }
            }
        }
    }
}
}
