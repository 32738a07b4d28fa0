import ArgumentParser
import Foundation
@testable import pvm
import L2Guest
import Testing

/// The README shows only what the tool really does: every `pvm` command in it parses and passes
/// its command's checks as written (what `pvm` does before any work starts), every option it
/// names exists, and the figures it states about the suite match the code.
@Suite struct ReadmeTests {
    static let readme: String = {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let text = (try? String(contentsOf: root.appendingPathComponent("README.md"), encoding: .utf8)) ?? ""
        // Without the fenced blocks (the architecture picture): no commands there.
        return text.components(separatedBy: "```").enumerated().filter { $0.offset % 2 == 0 }.map(\.element).joined()
    }()

    /// The text of every `...` span (joined across line breaks) and every indented code line.
    static var snippets: [String] {
        var spans: [String] = []
        let flat = readme.replacingOccurrences(of: "\n", with: " ")
        var inside = false, current = ""
        for ch in flat {
            if ch == "`" {
                if inside { spans.append(current.split(separator: " ").joined(separator: " ")) }
                inside.toggle()
                current = ""
            } else if inside { current.append(ch) }
        }
        let code = readme.split(separator: "\n").filter { $0.hasPrefix("    ") }.map { $0.trimmingCharacters(in: .whitespaces) }
        return spans + code
    }

    /// Every `pvm ...` command in the README, as argv after `pvm`.
    static var commands: [[String]] {
        snippets.compactMap { s -> [String]? in
            let text = s.hasPrefix("swift run -c release pvm") ? String(s.dropFirst("swift run -c release ".count)) : s
            guard text == "pvm" || text.hasPrefix("pvm ") else { return nil }
            return text.split(separator: " ").dropFirst().map(String.init)
        }
    }

    @Test func theReadmeShowsCommands() {
        #expect(Self.commands.count >= 20, "\(Self.commands)")
        #expect(Self.commands.contains([]) || Self.commands.contains(["bench"]), "the main command is not shown")
    }

    @Test(arguments: ReadmeTests.commands)
    func everyCommandInTheReadmeIsAccepted(_ argv: [String]) throws {
        // parseAsRoot runs the command's validate(): ranges, lists, output folders, profiles.
        do { _ = try PVM.parseAsRoot(argv) } catch {
            Issue.record("README: `pvm \(argv.joined(separator: " "))` is refused: \(PVM.message(for: error))")
        }
    }

    /// Options named on their own (`--tier-timeout`) exist on some command.
    @Test func everyOptionTheReadmeNamesExists() {
        let helps = PVM.configuration.subcommands.map { PVM.helpMessage(for: $0) }.joined(separator: "\n")
            + PVM.helpMessage(for: PVM.Model.Explain.self)
        // Every option token, in a span of options (`--vm-type tdx --one-time-setup ...`) or a command.
        let named = Self.snippets.filter { $0.hasPrefix("--") }.flatMap { $0.split(separator: " ").filter { $0.hasPrefix("--") }.map(String.init) }
            + Self.commands.flatMap { $0.filter { $0.hasPrefix("--") } }
        for option in named {
            let name = String(option.split(separator: "=")[0])
            let known = helps.contains(name + " ") || helps.contains(name + "\n") || helps.contains("[\(name)]")
            #expect(known, "README names \(name), which no command has")
        }
    }

    @Test func theReadmeCountsTheTestsTheSuiteHas() throws {
        let match = try #require(Self.readme.firstMatch(of: /all (\d+) tests/), "README no longer says how many tests")
        #expect(Int(match.1) == BenchOperations.all.count)
    }
}

/// The progress line's estimate (pure arithmetic, no clock).
@Suite struct ProgressTests {
    @Test func theEstimateIsTheAverageStepTimesTheStepsLeft() {
        #expect(Progress.left(elapsed: 10, done: 0, total: 5) == nil)
        #expect(Progress.left(elapsed: 10, done: 2, total: 6) == 20)
        #expect(Progress.left(elapsed: 10, done: 6, total: 6) == 0)
        #expect(Progress.format(0.2) == "under a second" && Progress.format(42) == "42 s" && Progress.format(125) == "2 min 5 s")
        #expect(Progress.format(7200) == "2 h 0 min")
    }
}

/// Spans of launch options in the README (`--vm-type tdx --one-time-setup on-first-protected-vm`)
/// are valid together, values included.
@Suite struct ReadmeLaunchOptionTests {
    @Test func launchOptionSpansParse() throws {
        for span in ReadmeTests.snippets where span.hasPrefix("--vm-type") {
            do { _ = try PVM.parseAsRoot(["launch"] + span.split(separator: " ").map(String.init)) } catch {
                Issue.record("README: `\(span)` is refused by launch: \(PVM.message(for: error))")
            }
        }
    }
}
