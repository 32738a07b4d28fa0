import ABI
import ArgumentParser
import Bench
import Foundation
import L0
import L2Guest
#if canImport(Glibc)
import Glibc
#endif

// The command line's value types and checks, shared by every command: enum options parse
// through swift-argument-parser (so `--help` and a bad value both list the valid ones), lists are
// comma-separated and never empty, numbers have ranges, and output files are checked before any
// stack starts.

extension NestingPath: ExpressibleByArgument {}
extension L2MapMode: ExpressibleByArgument {}
extension OneTimeSetupPolicy: ExpressibleByArgument {}

/// `--vm-type`: a VM type by the short name tables print (`VMType.name`).
struct VMTypeArgument: ExpressibleByArgument {
    let type: VMType
    init(_ type: VMType) { self.type = type }
    init?(argument: String) {
        guard let t = VMType.allCases.first(where: { $0.name == argument }) else { return nil }
        type = t
    }
    var defaultValueDescription: String { type.name }
    static var allValueStrings: [String] { VMType.allCases.map(\.name) }
}

/// `pvm bench --format`.
enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    /// The table with ratios (default).
    case table
    /// NAME VALUE lines, as vmexit.flat prints.
    case vmexit
}

/// `pvm bench --suite`.
enum BenchSuite: String, ExpressibleByArgument, CaseIterable {
    case exits, memslot, host, transport
}

/// A runtime failure: one line (what, which file or tier, why), no usage text, exit 1.
/// (swift-argument-parser prints any error that is not a usage error as `Error: <description>`
/// and exits with EXIT_FAILURE.)
struct Failure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

enum Checks {
    /// `--vcpus`: within what a stack runs, and more than one only where the path has them.
    static func vcpus(_ n: Int, path: NestingPath) throws {
        try vcpus(n, paths: [path])
    }
    /// `pvm bench --vcpus`: one count or a comma-separated list, each in range, no repeats.
    static func vcpuCounts(_ list: String) throws -> [Int] {
        let parts = list.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        var counts: [Int] = []
        for p in parts {
            guard let n = Int(p) else { throw ValidationError("--vcpus takes a count or a comma-separated list of counts (got '\(list)')") }
            try range(n, 1...StackConfig.vcpuLimit, "--vcpus")
            guard !counts.contains(n) else { throw ValidationError("--vcpus names \(n) twice") }
            counts.append(n)
        }
        return counts
    }

    static func vcpus(_ n: Int, paths: [NestingPath]) throws {
        try range(n, 1...StackConfig.vcpuLimit, "--vcpus")
    }

    /// A comma-separated list of paths, none unknown, at least one, no repeats.
    static func paths(_ list: String, option: String = "--path") throws -> [NestingPath] {
        let parts = list.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard !list.isEmpty, !parts.contains(where: \.isEmpty) else {
            throw ValidationError("\(option) needs a comma-separated list of paths (known: \(known(NestingPath.self)))")
        }
        var result: [NestingPath] = []
        for p in parts {
            guard let path = NestingPath(rawValue: p) else { throw ValidationError("unknown path '\(p)' (known: \(known(NestingPath.self)))") }
            guard !result.contains(path) else { throw ValidationError("\(option) names '\(p)' twice") }
            result.append(path)
        }
        return result
    }

    /// A comma-separated list of benchmark tests, none unknown, at least one.
    static func tests(_ list: String) throws -> [String] {
        let parts = list.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard !list.isEmpty, !parts.contains(where: \.isEmpty) else {
            throw ValidationError("--test needs a comma-separated list of tests (known: \(BenchOperations.all.map(\.name).joined(separator: ", ")))")
        }
        for t in parts where BenchOperations.named(t) == nil { throw ValidationError("\(BenchError.unknownTest(t))") }
        return parts
    }

    static func known<T: CaseIterable & RawRepresentable>(_: T.Type) -> String where T.RawValue == String {
        T.allCases.map(\.rawValue).joined(separator: ", ")
    }

    /// `value` in `range`, or a usage error naming the option and the range.
    static func range<T: Comparable>(_ value: T, _ range: ClosedRange<T>, _ option: String) throws {
        guard range.contains(value) else { throw ValidationError("\(option) must be in \(range.lowerBound)...\(range.upperBound) (got \(value))") }
    }

    /// An output file the user asked for: its folder exists and this process may write there
    /// (and the file itself, if it exists). Checked before any stack starts.
    static func writable(_ path: String, option: String) throws {
        guard !path.isEmpty else { throw ValidationError("\(option) needs a file name") }
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) {
            guard !isDirectory.boolValue else { throw ValidationError("\(option) \(path): is a folder") }
            guard access(path, W_OK) == 0 else { throw ValidationError("\(option) \(path): not writable (\(String(cString: strerror(errno))))") }
            return
        }
        let folder = URL(fileURLWithPath: path).deletingLastPathComponent().path
        guard FileManager.default.fileExists(atPath: folder, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw ValidationError("\(option) \(path): the folder \(folder) does not exist")
        }
        guard access(folder, W_OK) == 0 else { throw ValidationError("\(option) \(path): cannot write in \(folder) (\(String(cString: strerror(errno))))") }
    }

    /// A cost profile, loaded now (a usage error naming the file, the key and what was expected).
    static func profile(_ path: String?) throws -> CostProfile {
        guard let path else { return try CostModel.defaultProfile() }
        do { return try CostProfile.load(path: path) } catch { throw ValidationError("--profile \(error)") }
    }
}

/// Guest-program arguments on the command line: one word, one value or a comma-separated list;
/// each decimal, or hex with `0x` (what `launch` prints), a full 64-bit value either way.
struct ProgramArgument: ExpressibleByArgument {
    let values: [UInt64]
    init?(argument: String) {
        var values: [UInt64] = []
        for piece in argument.split(separator: ",", omittingEmptySubsequences: false) {
            let lower = piece.lowercased()
            let v = lower.hasPrefix("0x") ? UInt64(lower.dropFirst(2), radix: 16) : UInt64(lower)
            guard let v else { return nil }
            values.append(v)
        }
        self.values = values
    }
    var defaultValueDescription: String { values.map { "0x\(String($0, radix: 16))" }.joined(separator: ",") }
}
