import ABI
import Bench
import Foundation
import L2Guest
import Testing
import Transport

/// End to end: each `pvm` command as a user runs it, the built binary as a subprocess (see
/// `PVMProcess`: output in temp files, read after exit; every output file a temp file removed
/// afterwards), on short runs, under a time limit. These pin what the tool does today.
extension StackTests {
@Suite(.serialized, .timeLimit(.minutes(1))) struct CommandTests {
    /// Runs `pvm args` to completion (30 s at most) and returns (exit status, stdout, stderr).
    func pvm(_ args: [String], seconds: Double = 30, sourceLocation: SourceLocation = #_sourceLocation) throws -> (status: Int32?, out: String, err: String) {
        let p = try PVMProcess(args)
        defer { p.cleanup() }
        let status = p.finish(seconds: seconds, sourceLocation: sourceLocation)
        let left = survivingTiers(token: p.token, seconds: 5)
        #expect(left.isEmpty, "pvm \(args) left tiers behind: \(left)", sourceLocation: sourceLocation)
        return (status, p.stdout, p.stderr)
    }

    static func number(_ v: Any?) -> Double? {
        switch v {
        case let n as NSNumber: n.doubleValue
        case let d as Double: d
        case let i as Int: Double(i)
        default: nil
        }
    }

    // MARK: bench

    /// Issue 14's check, through the binary: the four designs run every paging test; on pvm-rfc
    /// CPUID makes no L0 transition (one switcher exit), and a page fault and a fork show the
    /// shadow MMU's events; the ratio lines carry the model's ratio too.
    @Test func benchRunsThePVMRFCPathBesideTheOthersAndShowsItsShadowMMU() throws {
        try withTempFile(".json") { json in
            let r = try pvm(["bench", "--test", "cpuid,page_fault,fork", "--path", "single,pv,nvmx,pvm-rfc", "--min-time-ms", "0",
                             "--iterations", "16", "--warmup", "2", "--quiet", "--json", json.path])
            #expect(r.status == 0, "\(r.err)")
            let doc = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: json)) as? [String: Any])
            let rows = try #require(doc["results"] as? [[String: Any]])
            #expect(rows.count == 12)
            func row(_ test: String, _ path: String) throws -> [String: Any] {
                try #require(rows.first { $0["test"] as? String == test && $0["path"] as? String == path }, "\(test) on \(path)")
            }
            let cpuid = try row("cpuid", "pvm-rfc")
            let perOp = try #require(cpuid["per_op"] as? [String: Any])
            #expect(Self.number(perOp["l2_exits"]) == 0 && Self.number(perOp["l1_exits"]) == 0 && Self.number(perOp["l1_entries"]) == 0
                    && Self.number(perOp["switcher_exits"]) == 1, "\(perOp)")
            for test in ["page_fault", "fork"] {
                let events = try #require(try row(test, "pvm-rfc")["switcher_events"] as? [String: Any])
                #expect(Self.number(events["shadow_fills"]).map { $0 >= 1 } == true
                        && Self.number(events["injected_events"]).map { $0 >= 1 } == true, "\(test): \(events)")
                for path in ["single", "pv", "nvmx"] {
                    let p = try #require(try row(test, path)["per_op"] as? [String: Any])
                    #expect(Self.number(p["l2_exits"]) == 0 && Self.number(p["switcher_exits"]) == 0, "\(test) on \(path): \(p)")
                }
            }
            #expect(r.out.contains("fork: pvm-rfc / single = ") && r.out.contains(" x (model)"), "\(r.out)")
        }
    }

    /// `--vcpus` with more than one count: the scaling table, the raw ring beside it, each
    /// vCPU's figures in the JSON and CSV.
    @Test func benchScalesOverVCPUCountsBesideTheRawRing() throws {
        try withTempFile(".json") { json in
            try withTempFile(".csv") { csv in
                let r = try pvm(["bench", "--vcpus", "1,3", "--test", "cpuid", "--path", "pv,nvmx", "--min-time-ms", "0",
                                 "--iterations", "500", "--warmup", "10", "--quiet", "--json", json.path, "--csv", csv.path])
                #expect(r.status == 0, "\(r.err)")
                #expect(r.out.contains("raw two-process ring: ") && r.out.contains("x raw hop"), "\(r.out)")
                let doc = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: json)) as? [String: Any])
                #expect(Self.number(doc["raw_nanos_per_hop"]).map { $0 > 0 } == true)
                let rows = try #require(doc["rows"] as? [[String: Any]])
                #expect(rows.count == 4)
                for row in rows {
                    let n = try #require(Self.number(row["vcpus"]))
                    #expect((row["per_vcpu_median_nanos"] as? [Any])?.count == Int(n), "\(row)")
                    #expect(Self.number(row["hops_per_op"]) == (row["path"] as? String == "pv" ? 2 : 4), "\(row)")
                    #expect(Self.number(row["nanos_per_hop"]).map { $0 > 0 } == true)
                }
                let lines = try String(contentsOf: csv, encoding: .utf8).split(separator: "\n")
                #expect(lines.count == 1 + 2 * (1 + 3), "\(lines)")
            }
        }
    }

    /// What `--vcpus` refuses, before any stack starts: a count out of range, a program that
    /// needs pages of its own (or more vCPUs), a table option the scaling table does not take.
    @Test(arguments: [
        ["launch", "--vcpus", "0"], ["launch", "--vcpus", "2", "--program", "paging-probe"], ["launch", "--vcpus", "1", "--program", "ipi"],
        ["bench", "--vcpus", "2,2", "--test", "cpuid", "--path", "pv"], ["bench", "--vcpus", "1,2", "--test", "page_fault", "--path", "pv"],
        ["bench", "--vcpus", "2", "--test", "cpuid"],
        ["bench", "--vcpus", "2", "--test", "cpuid", "--path", "pv", "--svg", "/tmp/x.svg"], ["bench", "--vcpus", "17", "--test", "cpuid", "--path", "pv"],
    ])
    func vcpusIsAUsageErrorWhereItCannotApply(_ args: [String]) throws {
        let r = try pvm(args)
        #expect(r.status == 64 && r.err.contains("--vcpus"), "\(args): \(r.err)")
    }

    @Test func benchPrintsTheTableAndRatiosAndWritesJSONAndCSV() throws {
        try withTempFile(".json") { json in
            try withTempFile(".csv") { csv in
                let r = try pvm(["bench", "--test", "cpuid", "--path", "single,pv,nvmx-noshadow", "--min-time-ms", "0",
                                 "--iterations", "200", "--json", json.path, "--csv", csv.path])
                #expect(r.status == 0, "\(r.err)")
                // Progress on stderr, one line per run.
                for (i, v) in ["single", "pv", "nvmx-noshadow"].enumerated() {
                    #expect(r.err.contains("[\(i + 1)/3] cpuid on \(v)"), "\(r.err)")
                }

                // The table: the header's columns, then a row per path.
                let lines = r.out.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
                let header = try #require(lines.first)
                var at = header.startIndex
                for column in ["test", "path", "iters", "median ns", "p99 ns", "model cyc", "L2 exits", "L2 entries",
                               "L1 entries", "L1 exits", "hcalls", "L2->L1", "L1 exits by reason"] {
                    let found = header.range(of: column, range: at..<header.endIndex)
                    #expect(found != nil, "column '\(column)' missing or out of order in: \(header)")
                    if let found { at = found.upperBound }
                }
                func row(_ label: String) -> [String]? {
                    lines.first { $0.split(separator: " ").count > 1 && $0.split(separator: " ")[1] == label }?
                        .split(separator: " ").map(String.init)
                }
                let single = try #require(row("single"), "\(r.out)")
                let pv = try #require(row("pv"), "\(r.out)")
                let noShadow = try #require(row("nvmx-noshadow"), "\(r.out)")
                // test path iters median p99 model (range) | L2 exits, L2 entries, L1 entries, L1 exits, hcalls, L2->L1 | reasons
                #expect(single[0] == "cpuid" && single[2] == "200" && Array(single[5...13]) == ["1100", "-", "1.00", "1.00", "0.00", "0.00", "0.00", "0.00", "-"])
                #expect(pv[2] == "200" && Array(pv[5...13]) == ["1100", "-", "1.00", "1.00", "0.00", "0.00", "0.00", "0.00", "-"])
                #expect(Array(noShadow[7...12]) == ["1.00", "1.00", "8.00", "8.00", "0.00", "0.00"], "\(noShadow)")
                #expect(Array(noShadow[13...]) == ["VMREAD=6.00", "VMRESUME=1.00", "VMWRITE=1.00"], "\(noShadow)")
                // The nested row's model: estimates give it a low-high range around it.
                let bounds = noShadow[6].split(separator: "-").compactMap { Double($0) }
                #expect(bounds.count == 2 && bounds[0] < Double(noShadow[5])! && Double(noShadow[5])! < bounds[1], "\(noShadow)")
                for cells in [single, pv, noShadow] {
                    #expect(Int(cells[3]).map { $0 > 0 } == true && Int(cells[4]).map { $0 >= Int(cells[3])! } == true, "\(cells)")
                }
                // Ratio lines: against single, and against pv (not single against pv).
                let ratios = lines.filter { $0.contains(" x (median)") }
                #expect(ratios.count == 3, "\(r.out)")
                for (a, b) in [("pv", "single"), ("nvmx-noshadow", "single"), ("nvmx-noshadow", "pv")] {
                    let line = ratios.first { $0.hasPrefix("cpuid: \(a) / \(b) = ") }
                    let value = line.flatMap { Double($0.split(separator: " ")[5]) }
                    #expect(value.map { $0 > 0 } == true, "no ratio \(a) / \(b) in \(ratios)")
                }

                // JSON: the documented schema.
                let doc = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: json)) as? [String: Any])
                let results = try #require(doc["results"] as? [[String: Any]])
                #expect(results.count == 3)
                for (res, path) in zip(results, ["single", "pv", "nvmx-noshadow"]) {
                    #expect(res["test"] as? String == "cpuid" && res["path"] as? String == path && res["variant"] as? String == path)
                    #expect(Self.number(res["iterations"]) == 200)
                    #expect(res["l2_map"] as? String == "eager")
                    #expect((res["pv_features"] as? String == PVFeatures.all.description) == (path == "pv"), "\(res)")
                    #expect(Self.number(res["model_cycles_per_op"]).map { $0 > 0 } == true)
                    let ns = try #require(res["ns_per_op"] as? [String: Any])
                    let (mn, med, p99, mx) = (Self.number(ns["min"]) ?? -1, Self.number(ns["median"]) ?? -1,
                                              Self.number(ns["p99"]) ?? -1, Self.number(ns["max"]) ?? -1)
                    #expect(Self.number(ns["mean"]) != nil && mn > 0 && mn <= med && med <= p99 && p99 <= mx, "\(ns)")
                    let perOp = try #require(res["per_op"] as? [String: Any])
                    #expect(Set(perOp.keys) == ["l2_exits", "l1_entries", "l1_exits", "l2_entries", "deliveries_to_l1", "hypercalls", "switcher_exits"])
                    #expect(Self.number(perOp["switcher_exits"]) == 0 && (res["switcher_events"] as? [String: Any])?.isEmpty == true)
                    #expect(Self.number(perOp["l2_exits"]) == 1 && Self.number(perOp["l2_entries"]) == 1)
                    let byReason = try #require(res["l1_exits_by_reason"] as? [String: Any])
                    let l2ByReason = try #require(res["l2_exits_by_reason"] as? [String: Any])
                    #expect(l2ByReason.mapValues { Self.number($0) ?? -1 } == ["CPUID": 1])
                    if path == "nvmx-noshadow" {
                        #expect(Self.number(perOp["l1_exits"]) == 8 && Self.number(perOp["deliveries_to_l1"]) == 1)
                        #expect(byReason.mapValues { Self.number($0) ?? -1 } == ["VMREAD": 6, "VMWRITE": 1, "VMRESUME": 1])
                        let range = try #require(res["model_cycles_range"] as? [String: Any])
                        let model = try #require(Self.number(res["model_cycles_per_op"]))
                        #expect(Self.number(range["low"])! < model && model < Self.number(range["high"])!)
                    } else {
                        #expect(Self.number(perOp["l1_exits"]) == 0 && Self.number(perOp["l1_entries"]) == 0 && byReason.isEmpty)
                    }
                }

                // CSV: header and one row per result, same columns.
                let csvLines = try String(contentsOf: csv, encoding: .utf8).split(separator: "\n").map(String.init)
                #expect(csvLines.first == "test,path,variant,iterations,median_ns,p99_ns,model_cycles,model_cycles_low,model_cycles_high,l2_exits,l2_entries,l1_entries,l1_exits,hypercalls,switcher_exits")
                #expect(csvLines.count == 4)
                for (line, path) in zip(csvLines.dropFirst(), ["single", "pv", "nvmx-noshadow"]) {
                    let cells = line.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
                    #expect(cells.count == 15 && Array(cells[0...3]) == ["cpuid", path, path, "200"], "\(line)")
                    #expect(cells[9] == "1.0000" && cells[12] == (path == "nvmx-noshadow" ? "8.0000" : "0.0000"), "\(line)")
                }
            }
        }
    }

    @Test func benchInVMExitFormatPrintsNameValueLinesPerPath() throws {
        let r = try pvm(["bench", "--test", "cpuid", "--path", "single,nvmx", "--min-time-ms", "0", "--iterations", "100", "--format", "vmexit"])
        #expect(r.status == 0, "\(r.err)")
        let lines = r.out.split(separator: "\n").map(String.init)
        #expect(lines.count == 4, "\(r.out)")
        #expect(lines.first == "# single (median ns per iteration)" && lines.dropFirst(2).first == "# nvmx (median ns per iteration)", "\(r.out)")
        for line in [lines[1], lines[3]] {
            let parts = line.split(separator: " ")
            #expect(parts.count == 2 && parts[0] == "cpuid" && (UInt64(parts[1]) ?? 0) > 0, "\(line)")
        }
    }

    // MARK: stat, trace, model

    @Test func statReportsExitsPerTierAndReason() throws {
        let r = try pvm(["stat", "--path", "nvmx", "--iterations", "20"])
        #expect(r.status == 0, "\(r.err)")
        #expect(r.out.contains("VM-EXIT") && r.out.contains("Samples") && r.out.contains("Total Samples:"), "\(r.out)")
        let rows = r.out.split(separator: "\n").map { $0.split(separator: " ").map(String.init) }
        #expect(rows.contains { $0.count > 2 && $0[0] == "L2" && $0[1] == "CPUID" && $0[2] == "20" }, "\(r.out)")
        #expect(rows.contains { $0.count > 2 && $0[0] == "L1" && $0[1] == "VMRESUME" && $0[2] == "20" }, "\(r.out)")
    }

    @Test func traceWritesAChromeTraceWithATrackPerTier() throws {
        try withTempFile(".json") { out in
            let r = try pvm(["trace", "--path", "nvmx", "--iterations", "5", "--out", out.path])
            #expect(r.status == 0, "\(r.err)")
            let words = r.out.split(separator: " ")
            #expect(words.first == "wrote" && r.out.hasSuffix("spans to \(out.path)\n"), "\(r.out)")
            let spansReported = words.count > 1 ? Int(words[1]) : nil
            let doc = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: out)) as? [String: Any])
            let events = try #require(doc["traceEvents"] as? [[String: Any]])
            #expect(doc["displayTimeUnit"] is String)
            let threads = events.filter { $0["ph"] as? String == "M" && $0["name"] as? String == "thread_name" }
                .compactMap { ($0["args"] as? [String: Any])?["name"] as? String }
            #expect(Set(threads) == ["L0 (pvm-l0)", "L1 (pvm-l1)", "L2 (pvm-l2)"])
            let spans = events.filter { $0["ph"] as? String == "X" }
            #expect(spans.count == spansReported, "stdout says \(String(describing: spansReported)) spans, the file has \(spans.count)")
            #expect(spans.allSatisfy { Self.number($0["ts"]) != nil && (Self.number($0["dur"]) ?? -1) >= 0 && $0["name"] is String
                                       && Self.number($0["pid"]) != nil && Self.number($0["tid"]) != nil })
            #expect(spans.contains { $0["name"] as? String == "handle CPUID from L2" })
        }
    }

    @Test func modelExplainPrintsTheCostBreakdown() throws {
        let r = try pvm(["model", "explain", "cpuid", "--path", "nvmx", "--iterations", "100"])
        #expect(r.status == 0, "\(r.err)")
        let lines = r.out.split(separator: "\n").map(String.init)
        #expect(lines.first?.hasPrefix("cpuid on nvmx, profile ") == true, "\(r.out)")
        #expect(lines.dropFirst().first?.hasPrefix("event") == true, "\(r.out)")
        #expect(lines.contains { $0.hasPrefix("L2 -> L0 exits and entries (world switch)") && $0.contains("1.00") }, "\(r.out)")
        let total = lines.first { $0.hasPrefix("total") }?.split(separator: " ")
        #expect(total.flatMap { $0.count > 1 ? Double($0[1]) : nil }.map { $0 > 0 } == true, "\(r.out)")
    }

    // MARK: programs, launch, calibrate

    @Test func programsListsEveryGuestProgramWithItsSummaryAndArguments() throws {
        let r = try pvm(["programs"])
        #expect(r.status == 0)
        let lines = r.out.split(separator: "\n")
        let programLines = lines.filter { !$0.hasPrefix(" ") }
        let listed = Dictionary(programLines.compactMap { line -> (String, String)? in
            let parts = line.split(separator: "\t", maxSplits: 1)
            return parts.count == 2 ? (String(parts[0]), String(parts[1])) : nil
        }, uniquingKeysWith: { a, _ in a })
        #expect(listed.count == GuestPrograms.all.count && listed.count == programLines.count)
        // Each argument on its own line under its program: name, meaning, what it takes, default.
        #expect(lines.count == programLines.count + GuestPrograms.all.map(\.arguments.count).reduce(0, +))
        #expect(r.out.contains("memory-probe\tstore to a mapped page, read an unmapped one\n    --args 1. gpa: where to store and read back"), "\(r.out)")
        #expect(r.out.contains("(an L2 GPA, 8-byte aligned, below 0x100000000; default 0x200000)\n    --args 2. pattern:"), "\(r.out)")
        for p in GuestPrograms.all { #expect(listed[p.name] == p.summary, "\(p.name)") }
        for op in BenchOperations.all { #expect(listed[op.name] != nil, "bench op \(op.name) is not a program") }
        #expect(listed["cpuid-values"] != nil && listed["cpuid-forever"] != nil)
    }

    @Test func launchRunsAProgramOnNVMXAndPrintsWhatHappened() throws {
        let r = try pvm(["launch", "--path", "nvmx", "--program", "cpuid-values"])
        #expect(r.status == 0, "\(r.err)")
        let lines = r.out.split(separator: "\n").map(String.init)
        #expect(lines.filter { $0.hasPrefix("sync ") }.count == 9, "\(r.out)")
        #expect(lines.contains("stopped: guest done"))
        #expect(lines.contains("L1 exit status 0, L2 exit status 0"), "\(r.out)")
        #expect(lines.contains { $0.hasPrefix("L2->L0 exits: ") && $0.contains("CPUID=9") }, "\(r.out)")
        #expect(lines.contains { $0.hasPrefix("L1->L0 exits: ") && $0.contains("VMLAUNCH=1") && $0.contains("VMRESUME=9") }, "\(r.out)")
        #expect(lines.contains { $0.hasPrefix("delivered to L1: ") && $0.contains("CPUID=9") }, "\(r.out)")
        #expect(lines.contains { $0.hasPrefix("entries: L1=") }, "\(r.out)")
    }

    @Test func launchOfAProgramThatFailsExitsOneAndSaysWhy() throws {
        // memory-probe reads back all ones from an L2 GPA the PV L1 did not map: the guest asserts.
        let r = try pvm(["launch", "--path", "pv", "--program", "memory-probe", "--args", "1073741824", "7"])
        #expect(r.status == 1, "\(r.out)\(r.err)")
        #expect(r.out.contains("stopped: ") && r.out.contains("read back 18446744073709551615 after storing 7"), "\(r.out)")
    }

    /// Through /dev/kvm where it works (exit 0, a summary and a valid profile file), else a clean
    /// one-line `Error: pvm calibrate: ...` and exit 1 (a runtime failure, no usage text), no file.
    @Test func calibrateWritesAProfileOrFailsCleanly() throws {
        try withTempFile(".json") { out in
            let r = try pvm(["calibrate", "--out", out.path, "--iterations", "2000", "--runs", "2"], seconds: 50)
            if r.status == 0 {
                #expect(r.out.contains("in-kernel CPUID exit") && r.out.contains("wrote \(out.path)"), "\(r.out)")
                let profile = try CostProfile.decode(try Data(contentsOf: out), file: out.path)
                #expect(profile.ghz > 0)
            } else {
                #expect(r.status == 1, "\(r.out)\(r.err)")
                let errLines = r.err.split(separator: "\n")
                #expect(errLines.count == 1 && errLines.first?.hasPrefix("Error: pvm calibrate: ") == true, "\(r.err)")
                #expect(!FileManager.default.fileExists(atPath: out.path))
            }
        }
    }

    // MARK: usage errors

    /// An unknown --path is a usage error (exit 64, EX_USAGE) on every command that takes one.
    @Test(arguments: [["bench", "--test", "cpuid"], ["launch"], ["stat"], ["trace", "--out", "/nonexistent/never-written.json"], ["model", "explain", "cpuid"]])
    func anUnknownPathIsAUsageError(command: [String]) throws {
        let r = try pvm(command + ["--path", "bogus"])
        #expect(r.status == 64, "\(r.err)")
        // Named, with every path it could have been, and the command's own usage.
        #expect(r.err.contains("'bogus'") && NestingPath.allCases.allSatisfy { r.err.contains($0.rawValue) }, "\(r.err)")
        #expect(r.err.contains("Usage: pvm \(command[0])"), "\(r.err)")
        #expect(r.out.isEmpty, "\(r.out)")
    }

    @Test func benchListsThePathsItKnowsWhenOneIsUnknown() throws {
        let r = try pvm(["bench", "--test", "cpuid", "--path", "single,bogus"])
        #expect(r.status == 64)
        #expect(r.err.contains("unknown path 'bogus' (known: \(NestingPath.allCases.map(\.rawValue).joined(separator: ", ")))"), "\(r.err)")
    }

    @Test func unknownTestsOptionsAndProgramsAreUsageErrors() throws {
        let test = try pvm(["bench", "--test", "nosuch", "--path", "pv"])
        #expect(test.status == 64 && test.err.contains("unknown test 'nosuch' (known: \(BenchOperations.all.map(\.name).joined(separator: ", ")))"), "\(test.err)")
        let option = try pvm(["bench", "--no-such-option"])
        #expect(option.status == 64 && option.err.contains("--no-such-option"), "\(option.err)")
        let program = try pvm(["launch", "--program", "nosuch"])
        #expect(program.status == 64 && program.err.contains("unknown guest program 'nosuch'"), "\(program.err)")
    }

    /// The watchdog's --tier-timeout is a range (0, 3600] seconds, checked before anything starts.
    @Test(arguments: [["bench", "--test", "cpuid", "--path", "pv"], ["launch"]], ["0", "-1", "3601", "nan"])
    func aTierTimeoutOutsideItsRangeIsAUsageError(command: [String], value: String) throws {
        let r = try pvm(command + ["--tier-timeout=\(value)"])
        #expect(r.status == 64, "\(r.err)")
        #expect(r.err.contains("--tier-timeout"), "\(r.err)")
        #expect(r.out.isEmpty, "\(r.out)")
    }

    /// chaos and soak check their ranges before anything starts.
    @Test(arguments: [["chaos", "--trials", "0"], ["chaos", "--tier-timeout", "0"], ["chaos", "--path", "single"],
                      ["soak", "--seconds", "0"], ["soak", "--interval-ms", "5"], ["soak", "--path", "bogus"], ["soak", "--program", "cpuid"]])
    func chaosAndSoakRefuseBadInputBeforeStarting(arguments: [String]) throws {
        let r = try pvm(arguments)
        #expect(r.status == 64, "\(arguments): \(r.status) \(r.err)")
        #expect(r.out.isEmpty, "\(r.out)")
    }
    // MARK: shell habits and failing before the work (issue 12)

    /// Both forms of every list option, and values that start with '-'.
    @Test(arguments: [["--path", "single,pv", "--test", "cpuid,vmcall"], ["--path=single,pv", "--test=cpuid,vmcall"]])
    func listOptionsTakeBothFormsAndAList(_ form: [String]) throws {
        let r = try pvm(["bench", "--min-time-ms", "0", "--iterations", "50"] + form)
        #expect(r.status == 0, "\(r.err)")
        for (t, p) in [("cpuid", "single"), ("cpuid", "pv"), ("vmcall", "single"), ("vmcall", "pv")] {
            #expect(r.out.split(separator: "\n").contains { $0.hasPrefix(t) && $0.split(separator: " ")[1] == p }, "\(r.out)")
        }
    }

    @Test(arguments: [["--pv-features", "-direct-msr"], ["--pv-features=-direct-msr"]])
    func aFeatureRemovalIsTakenAsAValueInEitherForm(_ form: [String]) throws {
        let r = try pvm(["bench", "--test", "cpuid", "--path", "pv", "--min-time-ms", "0", "--iterations", "50"] + form)
        #expect(r.status == 0, "\(r.err)")
        #expect(r.out.contains("pv[-direct-msr]"), "\(r.out)")
    }

    /// Every enum option names its valid values, in --help and in the error.
    @Test(arguments: [(["bench", "--format", "bogus"], ["table", "vmexit"]), (["bench", "--suite", "bogus"], ["exits", "memslot", "host"]),
                      (["bench", "--l2-map", "bogus"], ["eager", "per-page", "batch"]), 
                      (["launch", "--one-time-setup", "bogus"], ["off", "at-load", "on-first-protected-vm"]),
                      (["launch", "--vm-type", "bogus2"], ["sw-protected", "tdx"]),
                      (["model", "explain", "cpuid", "--path", "bogus"], ["single", "nvmx-evmcs"])])
    func anEnumOptionListsItsValuesInItsErrorAndHelp(_ args: [String], _ values: [String]) throws {
        let r = try pvm(args)
        #expect(r.status == 64 && r.out.isEmpty, "\(r.err)")
        for v in values { #expect(r.err.contains(v), "\(args): \(r.err)") }
        let help = try pvm(Array(args.prefix(args[0] == "model" ? 2 : 1)) + ["--help"])
        let flat = help.out.split(whereSeparator: \.isWhitespace).joined(separator: " ")
        let option = args[args[0] == "model" ? 3 : 1]
        // In the OPTIONS section (the usage line names every option too).
        let options = flat.range(of: "OPTIONS:").map { flat[$0.upperBound...] } ?? ""
        let listed = options.range(of: option + " <").flatMap { options[$0.upperBound...].range(of: "(values: ") }
        #expect(listed != nil, "\(flat)")
        if let listed { for v in values { #expect(options[listed.upperBound...].prefix(120).contains(v), "\(option): \(v)") } }
    }

    /// Numbers have ranges and lists are never empty: refused before anything starts (64).
    @Test(arguments: [["bench", "--iterations", "0"], ["bench", "--iterations", "2000000000"], ["bench", "--warmup", "2000000000"],
                      ["bench", "--min-time-ms", "700000"], ["bench", "--path", ""], ["bench", "--path", "pv,,nvmx"], ["bench", "--path", "pv,pv"],
                      ["bench", "--test", ""], ["stat", "--iterations", "0"], ["trace", "--iterations", "0", "--out", "/tmp/never.json"],
                      ["model", "explain", "cpuid", "--iterations", "0"], ["calibrate", "--runs", "0"], ["calibrate", "--iterations", "0"],
                      ["launch", "--host-memory-mib", "10"], ["fuzz", "--path", ""], ["chaos", "--path", "pv,"],
                      ["bench", "--pv-features", ""], ["bench", "--pv-features", ","], ["bench", "--pv-features", "direct-cpuid,direct-cpuid"],
                      ["bench", "--pv-features", "-direct-msr,,-direct-cpuid"], ["launch", "--program", "ept_first_touch", "--args", "100000"],
                      ["stat", "ept_first_touch", "--iterations", "1000000"]])
    func anOutOfRangeNumberOrAnEmptyListIsAUsageError(_ args: [String]) throws {
        let r = try pvm(args)
        #expect(r.status == 64, "\(args): \(r.status.map(String.init) ?? "-") \(r.err)")
        #expect(r.out.isEmpty && r.err.contains("Usage: pvm"), "\(r.out)\(r.err)")
    }

    /// Output files and profiles are checked before the work: at once, not after the runs.
    @Test func badOutputPathsAndProfilesAreRefusedBeforeAnyStackStarts() throws {
        for (option, command) in [("--json", ["bench", "--test", "cpuid"]), ("--csv", ["bench", "--test", "cpuid"]),
                                  ("--svg", ["bench", "--test", "cpuid"]), ("--out", ["trace"]), ("--out", ["calibrate"])] {
            let started = Date()
            let r = try pvm(command + [option, "/nonexistent-folder/file"])
            #expect(r.status == 64 && r.err.contains("\(option) /nonexistent-folder/file: the folder /nonexistent-folder does not exist"), "\(r.err)")
            #expect(Date().timeIntervalSince(started) < 10 && r.out.isEmpty, "\(command) \(option) started work")
            #expect(!r.err.contains("[1/"), "\(r.err)")
        }
        try withTempFile(".json") { profile in
            // The shipped profile with one value of the wrong kind.
            var shipped = try JSONSerialization.jsonObject(with: try CostModel.defaultProfile().encoded()) as! [String: Any]
            shipped["ghz"] = "fast"
            try JSONSerialization.data(withJSONObject: shipped).write(to: profile)
            let r = try pvm(["bench", "--test", "cpuid", "--profile", profile.path])
            #expect(r.status == 64 && r.err.contains("--profile \(profile.path): not a cost profile: key \"ghz\": expected a number"), "\(r.err)")
            #expect(!r.err.contains("DecodingError"), "\(r.err)")
        }
    }

    /// A runtime failure is one line, no usage text, exit 1.
    @Test func aRuntimeFailureIsOneLineWithoutUsageAndExitsOne() throws {
        let r = try pvm(["calibrate", "--device", "/nonexistent/kvm", "--out", "/tmp/pvm-never-written.json"])
        #expect(r.status == 1, "\(r.err)")
        #expect(r.err.split(separator: "\n").count == 1 && r.err.hasPrefix("Error: pvm calibrate: ") && !r.err.contains("Usage"), "\(r.err)")
        #expect(!FileManager.default.fileExists(atPath: "/tmp/pvm-never-written.json"))
    }

    /// --args takes hex and decimal; a program refuses what it cannot take before L2 starts.
    @Test func programArgumentsAreHexOrDecimalAndCheckedBeforeTheStackStarts() throws {
        let hex = try pvm(["launch", "--path", "single", "--program", "memory-probe", "--args", "0x300000", "0xfF"])
        #expect(hex.status == 0 && hex.out.contains("sync 0x300000 0xff "), "\(hex.out)\(hex.err)")
        // One level: nothing reaches an L1, and launch says so rather than printing an empty list.
        #expect(hex.out.contains("L1->L0 exits: none\ndelivered to L1: none\n"), "\(hex.out)")
        // A comma list is the same as separate words.
        let list = try pvm(["launch", "--path", "single", "--program", "memory-probe", "--args", "0x300000,255"])
        #expect(list.status == 0 && list.out.contains("sync 0x300000 0xff "), "\(list.out)\(list.err)")
        let decimal = try pvm(["launch", "--path", "single", "--program", "memory-probe", "--args", "3145728", "255"])
        #expect(decimal.status == 0 && decimal.out.contains("sync 0x300000 0xff "), "\(decimal.out)\(decimal.err)")
        for (args, problem) in [(["memory-probe", "--args", "1"], "memory-probe: gpa = 1 (0x1) is not an L2 GPA, 8-byte aligned"),
                                (["cpuid-values", "--args", "1"], "cpuid-values takes no arguments"),
                                (["l2-escape", "--args", "9"], "l2-escape: what = 9 (0x9) is not in 1-7"),
                                (["memory-probe", "--args", "0xZZ"], "--args")] {
            let r = try pvm(["launch", "--program"] + args)
            #expect(r.status == 64 && r.err.contains(problem) && r.out.isEmpty, "\(args): \(r.err)")
        }
    }

    /// The memslot and host suites print their own tables: options that only shape the exit
    /// tests are refused with a message, not ignored.
    @Test(arguments: [["--svg", "/tmp/x.svg"], ["--test", "cpuid"], ["--format", "vmexit"], ["--ablation"], ["--iterations", "5"],
                      ["--path", "pv"], ["--min-time-ms", "0"], ["--pv-features", "none"], ["--tier-timeout", "2"]])
    func theOtherSuitesRefuseTheExitTestsOptions(_ extra: [String]) throws {
        for suite in ["memslot", "host", "transport"] where !(suite == "transport" && extra[0] == "--path") {
            let r = try pvm(["bench", "--suite", suite] + extra)
            #expect(r.status == 64 && r.err.contains("--suite \(suite) prints its own table") && r.err.contains("takes none of \(extra[0])"), "\(r.err)")
        }
    }

    /// The transport suite: the raw ring and each path's hops, per hop, in one run, as a table
    /// and as JSON and CSV.
    @Test func theTransportSuiteSetsEachPathsHopBesideTheRawRing() throws {
        try withTempFile(".json") { json in
            try withTempFile(".csv") { csv in
                let r = try pvm(["bench", "--suite", "transport", "--path", "pv,pvm-rfc", "--json", json.path, "--csv", csv.path, "--quiet"],
                                seconds: 50)
                #expect(r.status == 0, "\(r.err)")
                #expect(r.out.hasPrefix("raw two-process ring: ") && r.out.contains("x raw hop"), "\(r.out)")
                let doc = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: json)) as? [String: Any])
                let raw = try #require(Self.number(doc["raw_nanos_per_hop"]))
                #expect(raw > 0 && (doc["raw_runs"] as? [Any])?.count == 6)
                // The guest core's switch floor, measured in the same run wherever the tiers are
                // pinned (two CPUs or more); nothing claimed where they are not.
                let pinned = CPUPlacement.automatic().isPinned
                #expect(r.out.contains("\nsame-core switch: ") == pinned, "\(r.out)")
                if pinned {
                    let floor = try #require(Self.number(doc["same_core_switch_nanos"]))
                    #expect(floor > 0 && (doc["same_core_runs"] as? [Any])?.count == 6, "\(doc)")
                } else {
                    #expect(doc["same_core_switch_nanos"] == nil && (doc["same_core_runs"] as? [Any])?.count == 0, "\(doc)")
                }
                let rows = try #require(doc["rows"] as? [[String: Any]])
                #expect(rows.map { $0["path"] as? String } == ["pv", "pvm-rfc"])
                for row in rows {
                    // CPUID: one exit and one entry, to L0 on pv and to L1 through the switcher on pvm-rfc.
                    #expect(Self.number(row["hops_per_op"]) == 2, "\(row)")
                    let perHop = try #require(Self.number(row["nanos_per_hop"]))
                    #expect(perHop > 0 && abs(Self.number(row["over_raw_hop"])! - perHop / raw) < 0.01, "\(row)")
                }
                let lines = try String(contentsOf: csv, encoding: .utf8).split(separator: "\n")
                #expect(lines.count == 3 && lines[0] == "path,test,median_ns,hops_per_op,ns_per_hop,over_raw_hop,raw_ns_per_hop,same_core_switch_ns",
                        "\(lines)")
                #expect(lines.dropFirst().allSatisfy { ($0.split(separator: ",", omittingEmptySubsequences: false).last?.isEmpty ?? true) == !pinned },
                        "\(lines)")
            }
        }
    }

    /// ...and write their figures with --json and --csv, as the exit tests do: the host suite's
    /// rows say where each figure comes from (`kvm` through /dev/kvm, `emulated`).
    @Test func theHostSuiteWritesJSONAndCSVWithTheSourceOfEachFigure() throws {
        let realKVM = (try? KVMHostFacts.read()) != nil
        try withTempFile(".json") { json in
            try withTempFile(".csv") { csv in
                let r = try pvm(["bench", "--suite", "host", "--json", json.path, "--csv", csv.path, "--quiet"], seconds: 50)
                #expect(r.status == 0, "\(r.err)")
                let doc = try JSONSerialization.jsonObject(with: Data(contentsOf: json)) as? [String: Any]
                #expect(doc?["suite"] as? String == "host")
                let rows = doc?["rows"] as? [[String: Any]] ?? []
                let kvm = rows.filter { $0["source"] as? String == "kvm" }, emulated = rows.filter { $0["source"] as? String == "emulated" }
                let model = rows.filter { $0["source"] as? String == "model" }
                // 6 configurations x 4 operations, + the protected VM where the setup is on; each
                // operation once as the emulator's own work and once as modelled.
                #expect(emulated.count == 6 * 4 + 4 && model.count == emulated.count, "\(rows)")
                #expect(kvm.count == (realKVM ? 4 : 0), "\(rows)")
                for row in kvm {
                    let (lo, mid, hi) = (row["min_ns"] as? Int ?? 0, row["median_ns"] as? Int ?? 0, row["max_ns"] as? Int ?? 0)
                    #expect(0 < lo && lo <= mid && mid <= hi && row["samples"] as? Int == 7, "\(row)")
                }
                if realKVM { #expect(r.out.contains("KVM_CREATE_VM, a fresh process's first") && r.out.contains("enable_virt_at_load: "), "\(r.out)") }
                let lines = try String(contentsOf: csv, encoding: .utf8).split(separator: "\n")
                #expect(lines.count == 1 + rows.count && lines[0] == "source,what,setting,samples,min_ns,median_ns,max_ns", "\(lines)")
            }
        }
    }

    /// Without a usable /dev/kvm the real host is one line, and the emulated host still runs.
    @Test func withoutKVMTheHostSuiteSaysSoInOneLineAndRunsTheEmulatedHost() throws {
        try withTempFile(".json") { json in
            let r = try pvm(["bench", "--suite", "host", "--device", "/nonexistent/kvm", "--json", json.path, "--quiet"], seconds: 50)
            #expect(r.status == 0, "\(r.err)")
            #expect(r.out.hasPrefix("real KVM not measured: /nonexistent/kvm: No such file or directory\n"), "\(r.out)")
            #expect(r.out.contains("Emulated L0 host:"), "\(r.out)")
            let rows = (try JSONSerialization.jsonObject(with: Data(contentsOf: json)) as? [String: Any])?["rows"] as? [[String: Any]] ?? []
            #expect(!rows.isEmpty && rows.allSatisfy { ["emulated", "model"].contains($0["source"] as? String) })
        }
    }
    /// The host's refusals name the command-line flags, and nested VMX is refused in a TDX L1
    /// with the reason, as PV nesting is.
    @Test func tdxRefusalsNameTheFlagsAndGiveTheReason() throws {
        let setup = try pvm(["launch", "--path", "pv", "--vm-type", "tdx"])
        #expect(setup.status == 1 && setup.err.contains("--one-time-setup at-load") && !setup.err.contains(".atLoad"), "\(setup.err)")
        let vmx = try pvm(["launch", "--path", "nvmx", "--vm-type", "tdx", "--one-time-setup", "at-load"])
        #expect(vmx.status == 1, "\(vmx.out)\(vmx.err)")
        #expect(vmx.out.contains("L0 refused L1's request: VM 1 (tdx) is a TDX guest, and a TDX guest has no VMX"), "\(vmx.out)")
        let pv = try pvm(["launch", "--path", "pv", "--vm-type", "tdx", "--one-time-setup", "at-load"])
        #expect(pv.status == 1 && pv.out.contains("L0 refused L1's request: VM 1 (tdx) has protected state"), "\(pv.out)")
    }
    /// Long work says where it is on stderr, with an estimate of the time left; --quiet silences it.
    @Test func progressHasAnEstimateAndQuietSilencesIt() throws {
        let loud = try pvm(["bench", "--test", "cpuid,vmcall", "--path", "single", "--min-time-ms", "0", "--iterations", "50"])
        #expect(loud.status == 0 && loud.err.contains("[1/2] cpuid on single") && loud.err.contains("[2/2] vmcall on single ("), "\(loud.err)")
        #expect(loud.err.contains(" left)"), "\(loud.err)")
        let quiet = try pvm(["bench", "--test", "cpuid,vmcall", "--path", "single", "--min-time-ms", "0", "--iterations", "50", "--quiet"])
        #expect(quiet.status == 0 && !quiet.err.contains("[1/2]") && quiet.out.contains("vmcall"), "\(quiet.err)")
    }
    /// The memslot suite writes the emulated L0's rows (both policies) and the real kernel's.
    @Test func theMemslotSuiteWritesEmulatedAndRealKernelRows() throws {
        let realKVM = (try? KVMDevice()) != nil
        try withTempFile(".json") { json in
            let r = try pvm(["bench", "--suite", "memslot", "--memslot-divisor", "64", "--json", json.path, "--quiet"], seconds: 50)
            #expect(r.status == 0, "\(r.err)")
            let rows = (try JSONSerialization.jsonObject(with: Data(contentsOf: json)) as? [String: Any])?["rows"] as? [[String: Any]] ?? []
            let emulated = rows.filter { $0["source"] as? String == "emulated" }, kvm = rows.filter { $0["source"] as? String == "kvm" }
            #expect(Set(emulated.compactMap { $0["policy"] as? String }) == ["fast", "targeted"], "\(rows)")
            #expect(kvm.count == (realKVM ? 2 : 0), "\(rows)")
            for row in kvm { #expect((row["delete_us_median"] as? Double ?? 0) > 0 && row["stats_across_delete"] != nil, "\(row)") }
            #expect(r.out.contains(realKVM ? "sizes divided by 64, as asked" : "real KVM not measured"), "\(r.out)")
        }
        // Without /dev/kvm: one line, and the emulated rows still come.
        let none = try pvm(["bench", "--suite", "memslot", "--memslot-divisor", "64", "--device", "/nonexistent/kvm", "--quiet"], seconds: 50)
        #expect(none.status == 0 && none.out.contains("real KVM not measured: /nonexistent/kvm: No such file or directory\n"), "\(none.out)")
        #expect(none.out.contains("recreate 2 GiB  targeted"), "\(none.out)")
    }
}
}
