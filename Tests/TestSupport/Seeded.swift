import Foundation
import Testing

// Seeded property checks.
//
// Every random input of the property tests comes from a SplitMix64 seeded from one master seed:
// a fixed default, or env PVM_PROPERTY_SEED (decimal or 0x-hex) to explore other inputs. Each case
// of each test gets its own generator derived from (master seed, test name, case index), so a
// failure is reproduced by rerunning with the seed it prints (and PVM_PROPERTY_CASE=N runs only
// that case). Every issue recorded inside a case carries the seed and case in its comments.
//
// (swift-property-based's `.fixedSeed` trait runs a single case and always records an issue: it
// is meant for reproducing, not for a committed fixed default, hence this helper.)
//
// One copy for every test target: the TestSupport target, which ABITests and L0Tests import.

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough for test inputs.
public struct SplitMix64: RandomNumberGenerator {
    private(set) var state: UInt64
    init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in 0..<n (n > 0).
    public mutating func below(_ n: UInt64) -> UInt64 { UInt64.random(in: 0..<n, using: &self) }
    public mutating func int(_ r: ClosedRange<Int>) -> Int { Int.random(in: r, using: &self) }
    public mutating func chance(_ p: Double) -> Bool { Double(next() >> 11) / Double(1 << 53) < p }
    public mutating func pick<T>(_ a: [T]) -> T { a[Int(below(UInt64(a.count)))] }

    /// Values where arithmetic breaks: 0, 1, page edges, 2^32 edges, 2^63 edges, all ones.
    public static let specialValues: [UInt64] = [
        0, 1, 2, 0x7, 0x8, 0xFFF, 0x1000, 0x1001, 0xFFFF, 0x1_0000,
        0xFFFF_FFFF, 0x1_0000_0000, 0x7FFF_FFFF_FFFF_FFFF, 1 << 63, (1 << 63) + 0x1000,
        UInt64.max - 0x1000, UInt64.max - 0xFFF, UInt64.max & ~0xFFF, UInt64.max - 1, UInt64.max,
    ]

    /// A special value half the time, any 64-bit value otherwise.
    public mutating func edgeU64() -> UInt64 { chance(0.5) ? pick(Self.specialValues) : next() }
}

public enum PropertySeed {
    public static let defaultSeed: UInt64 = 0x5056_4D5F_5345_4544     // "PVM_SEED"

    public static func parse(_ s: String?) -> UInt64? {
        guard let s = s?.trimmingCharacters(in: .whitespaces), !s.isEmpty else { return nil }
        if s.lowercased().hasPrefix("0x") { return UInt64(s.dropFirst(2), radix: 16) }
        return UInt64(s)
    }

    /// The master seed: env PVM_PROPERTY_SEED, else the fixed default.
    public static let master: UInt64 = parse(ProcessInfo.processInfo.environment["PVM_PROPERTY_SEED"]) ?? defaultSeed
    /// env PVM_PROPERTY_CASE: run only this case (to reproduce one failure).
    public static let onlyCase: Int? = ProcessInfo.processInfo.environment["PVM_PROPERTY_CASE"].flatMap { Int($0) }

    /// FNV-1a of the test's name: different tests get different streams from one master seed.
    public static func hash(_ s: String) -> UInt64 {
        s.utf8.reduce(0xCBF2_9CE4_8422_2325) { ($0 ^ UInt64($1)) &* 0x100_0000_01B3 }
    }

    public static func caseSeed(test: String, index: Int) -> UInt64 {
        var g = SplitMix64(seed: master ^ hash(test) ^ UInt64(index) &* 0xD6E8_FEB8_6659_FD93)
        return g.next()
    }

    public static var description: String { "PVM_PROPERTY_SEED=0x\(String(master, radix: 16))" }
}

/// Which case is running and whether it recorded anything; read by the issue handler.
public final class SeededCaseTracker: @unchecked Sendable {
    private let lock = NSLock()
    private var index = -1
    private var issues = 0
    public func start(_ i: Int) { lock.withLock { index = i; issues = 0 } }
    public func noteIssue() -> Int { lock.withLock { issues += 1; return index } }
    public var failed: Bool { lock.withLock { issues > 0 } }
}

/// Runs `body` for `count` cases, each with its own seeded generator. Stops at the first case
/// that records an issue; every issue says which seed and case produced it. Returns whether
/// every case passed (coverage minimums are only worth checking then).
@discardableResult
public func seededCheck(_ test: String = #function, count: Int, _ body: (inout SplitMix64) throws -> Void) async -> Bool {
    let tracker = SeededCaseTracker()
    let handler = IssueHandlingTrait.compactMapIssues { issue in
        var issue = issue
        let i = tracker.noteIssue()
        issue.comments.append("property \(test): \(PropertySeed.description), case \(i) (rerun just it with PVM_PROPERTY_CASE=\(i))")
        return issue
    }
    nonisolated(unsafe) let body = body
    do {
        try await handler.provideScope(for: Test.current!, testCase: Test.Case.current) {
            for i in 0..<count {
                if let only = PropertySeed.onlyCase, only != i { continue }
                var rng = SplitMix64(seed: PropertySeed.caseSeed(test: test, index: i))
                tracker.start(i)
                do { try body(&rng) } catch { Issue.record(error) }
                if tracker.failed { break }
            }
        }
    } catch {
        Issue.record(error, "property \(test): \(PropertySeed.description)")
        return false
    }
    return !tracker.failed
}

/// Counts named events across all cases of a property, for minimum-coverage assertions: a
/// generator that stops reaching an edge makes the test fail instead of silently passing.
public final class Coverage: @unchecked Sendable {
    private let lock = NSLock()
    private var counts: [String: Int] = [:]
    public init() {}
    public func hit(_ key: String, _ n: Int = 1) { lock.withLock { counts[key, default: 0] += n } }
    public subscript(_ key: String) -> Int { lock.withLock { counts[key] ?? 0 } }
    public var summary: String { lock.withLock { counts.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ") } }

    /// #expect(count >= minimum) for each, naming the seed and the whole tally on failure.
    /// Skipped when PVM_PROPERTY_CASE runs a single case.
    public func expectAtLeast(_ minimums: [String: Int], sourceLocation: SourceLocation = #_sourceLocation) {
        print("coverage (\(PropertySeed.description)): \(summary)")
        guard PropertySeed.onlyCase == nil else { return }
        for (k, m) in minimums.sorted(by: { $0.key < $1.key }) {
            let n = self[k]
            #expect(n >= m, "coverage '\(k)' reached \(n) times, expected at least \(m) (\(PropertySeed.description)); all: \(summary)",
                    sourceLocation: sourceLocation)
        }
    }
}
