import ABI
import Bench
import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import L0
import Testing

/// The cost model's arithmetic on fixed counters, and profile files good and bad.
@Suite struct CostModelTests {
    static let profile = CostProfile(name: "t", description: "test", ghz: 2.0, prices: Dictionary(uniqueKeysWithValues:
        CostProfile.Event.allCases.enumerated().map { ($0.element.rawValue, CostProfile.Price(cycles: Double(10 * ($0.offset + 1)), source: "test")) }))

    func result(_ w: TransitionCounters, iterations: UInt64) -> BenchResult {
        BenchResult(test: "t", variant: BenchVariant(path: .nvmx), iterations: iterations,
                    latency: LatencyReport(samples: iterations, minNanos: 0, medianNanos: 0, p99Nanos: 0, maxNanos: 0, totalNanos: 0),
                    window: w)
    }

    @Test func modelledCyclesAreCountsPerOperationTimesUnitPrices() {
        var w = TransitionCounters()
        for _ in 0..<4 { w.countL2Exit(.cpuid) }                 // 2 per op
        for _ in 0..<2 { w.countDelivery(.cpuid) }               // 1 per op
        for _ in 0..<2 { w.countL1Exit(.vmresume) }              // 1 per op
        for _ in 0..<6 { w.countL1Exit(.vmread) }                // 3 per op
        w.nestedVMEntries = 2; w.nestedVMExits = 2               // the VMRESUMEs entered; the CPUIDs were reflected
        w.hwVMREADs = 40; w.hwVMWRITEs = 20; w.hwVMPTRLDs = 6; w.hwVMCLEARs = 2
        w.vmcs12FieldReads = 10; w.shadowVMCSFieldCopies = 10    // 5 per op in memory; the copies are the hw ops
        w.msrBitmapMerges = 2; w.tlbFlushes = 4
        let p = Self.profile
        let r = result(w, iterations: 2)
        let expected = 2 * p.cycles(.exitRoundTrip)              // L2 world switches
            + 1 * p.cycles(.l0SimpleExit)                        // one of the two L2 exits stayed in L0
            + 1 * p.cycles(.l1ExitHandling)
            + 4 * p.cycles(.exitRoundTrip)                       // L1 world switches (VMRESUME + 3 VMREADs)
            + 3 * p.cycles(.l0VMXInstruction)
            + 1 * p.cycles(.nestedVMExitSoftware) + 1 * p.cycles(.nestedVMEntrySoftware)
            + 20 * p.cycles(.hwVMREAD) + 10 * p.cycles(.hwVMWRITE) + 3 * p.cycles(.hwVMPTRLD) + 1 * p.cycles(.hwVMCLEAR)
            + 5 * p.cycles(.vmcsFieldAccess)
            + 1 * p.cycles(.msrBitmapMerge) + 2 * p.cycles(.tlbFlush)
        #expect(CostModel.cyclesPerOp(r, p) == expected)
        let text = CostModel.explain(r, p)
        #expect(text.contains("VMREAD/VMWRITE emulated by L0") && text.contains("total"))
        #expect(!text.contains("EPT02 entries filled"))         // events not counted are not listed
    }

    @Test func estimatesGiveTheTotalARangeAndExplainShowsEachLinesSourceAndRange() throws {
        let p = try CostModel.defaultProfile()
        // Every price has a source; every estimate says so and has low <= cycles <= high.
        for e in CostProfile.Event.allCases {
            let price = try #require(p.prices[e.rawValue])
            #expect(!price.source.isEmpty)
            if price.isEstimate {
                #expect(price.range.contains(price.cycles), "\(e)")
                // An estimate says so, or names the single published figure it brackets.
                #expect(price.source.hasPrefix("estimate") || e == .fullEntryChecks, "\(e)")
            }
        }
        // Nothing counted is priced 0.
        #expect(p.prices.values.allSatisfy { $0.cycles > 0 })
        var w = TransitionCounters()
        w.countL2Exit(.cpuid); w.countDelivery(.cpuid); w.countL1Exit(.vmresume)
        w.nestedVMExits = 1; w.nestedVMEntries = 1; w.hwVMWRITEs = 10
        let r = result(w, iterations: 1)
        let range = CostModel.cyclesRangePerOp(r, p)
        let central = CostModel.cyclesPerOp(r, p)
        #expect(range.lowerBound < central && central < range.upperBound)
        let text = CostModel.explain(r, p)
        #expect(text.contains("hw_vmwrite: estimate") && text.contains("8-60") && text.contains("with every estimate at its low / high end"))
    }

    /// Nothing counted goes unpriced in silence: every counter is priced by a line of the model,
    /// or this list says where its cost is. A new counter fails here until someone decides.
    @Test func everyCounterIsPricedOrSaysWhereItsCostIs() {
        let pricedByALine: Set<String> = [
            "l2Exits", "l1Exits", "deliveries", "l1Entries", "l2Entries", "hypercalls", "vmcs12FieldReads",
            "vmcs12FieldWrites", "evmcsFieldCopies", "ept12EntriesWalked", "ept02Fills", "ept12WriteTraps",
            "unbackedAccesses", "consistencyChecks", "ept12ADUpdates", "msrBitmapMerges", "hwVMREADs", "hwVMWRITEs",
            "hwVMPTRLDs", "hwVMCLEARs", "mmuRootSwitches", "tlbFlushes", "rareFieldSyncs", "fullEntryChecks",
            "vmmUserspaceExits", "kernelDeviceAccesses", "pvEntries", "pvDeliveries", "nestedVMExits",
            "nestedVMEntries", "ept12Resyncs", "switcher", "l2Events",
            "apicIPIs", "apicMMIOEmulations", "apicTimerFires", "nestedTimerStarts", "pvIPIHypercalls", "apicKicks", "haltsBlocked", "apicWakeups", "interruptsInjected",
            "tlbFlushRequests", "tlbFlushesAtEntry",
        ]
        let pricedThroughAnother: [String: String] = [
            "shadowVMCSFieldCopies": "the hardware VMREADs/VMWRITEs of the shadow copies",
            "vmcsSwitches": "the VMPTRLDs",
            "ept12Unsyncs": "the emulated store that made the table unsync",
            "memslotZaps": "the memslot suite's own timings; no bench operation deletes a memslot",
            "apicAccesses": "the exits L0 handles itself (each APIC register access is one)",
            "tlbFlushHypercalls": "the hypercall exit L0 handles, and its tlbFlushRequests",
        ]
        for label in Mirror(reflecting: TransitionCounters()).children.compactMap(\.label) {
            #expect(pricedByALine.contains(label) || pricedThroughAnother[label] != nil, "\(label) is counted but its cost is nowhere")
        }
        // l1Entries/l2Entries are the entries of the world switches priced with the exits.
    }

    /// The same for what L1 counts on pvm-rfc and what L2 counts of itself: one of each, and a
    /// line of the model prices it (the switcher's entries go with its exits).
    @Test(arguments: NestingPath.allCases)
    func everySwitcherAndL2EventIsPriced(_ path: NestingPath) throws {
        let p = try CostModel.defaultProfile()
        let base = CostModel.lines(window: TransitionCounters(), iterations: 1, path: path, p)
        #expect(base.isEmpty)
        for c in SwitcherCounter.allCases where c != .entries {
            var w = TransitionCounters()
            w.switcher[SwitcherLayout.reasonSlots + c.rawValue] = 1
            #expect(CostModel.lines(window: w, iterations: 1, path: path, p).count == 1, "\(c.key) is counted but not priced")
        }
        for e in L2EventCounter.allCases {
            var w = TransitionCounters()
            w.l2Events[e.rawValue] = 1
            let ls = CostModel.lines(window: w, iterations: 1, path: path, p)
            #expect(ls.count == 1 && ls[0].part == .l2, "\(e.key) is counted but not priced as L2's own work")
        }
        var w = TransitionCounters()
        w.l2Events[L2EventCounter.tlbMisses.rawValue] = 1
        #expect(CostModel.lines(window: w, iterations: 1, path: path, p).first?.event == (path.usesSwitcher ? .l2TLBMissShadow : .l2TLBMiss2D))
    }

    @Test func theShippedProfileIsPublishedFiguresAndGivesSingleLevelCPUIDItsFigure() throws {
        let p = try CostModel.defaultProfile()
        #expect(p.cycles(.exitRoundTrip) + p.cycles(.l0SimpleExit) == 1100)   // kvm-unit-tests cpuid
        #expect(p.prices.values.allSatisfy { !$0.source.isEmpty })
        var w = TransitionCounters()
        w.countL2Exit(.cpuid)
        #expect(CostModel.cyclesPerOp(result(w, iterations: 1), p) == 1100)
    }

    func decode(_ json: String) throws -> CostProfile { try CostProfile.decode(Data(json.utf8), file: "x.json") }

    @Test func badProfilesNameTheFileAndTheKey() throws {
        let good = String(decoding: try Self.profile.encoded(), as: UTF8.self)
        #expect(try decode(good) == Self.profile)
        #expect(throws: CostProfile.LoadError.missingPrice(file: "x.json", key: "ept02_fill")) {
            try decode(good.replacingOccurrences(of: "\"ept02_fill\"", with: "\"ept02_fills\""))
                .prices["ept02_fill"]
        }
        do {
            _ = try decode(#"{"name":"n","description":"d","ghz":2,"prices":{}}"#)
            Issue.record("empty prices accepted")
        } catch let e as CostProfile.LoadError {
            #expect("\(e)".hasPrefix("x.json: no price for"))
        }
        var unknown = Self.profile
        unknown.prices["warp_drive"] = .init(cycles: 1, source: "s")
        #expect(throws: CostProfile.LoadError.unknownPrice(file: "x.json", key: "warp_drive")) {
            try decode(String(decoding: try unknown.encoded(), as: UTF8.self))
        }
        var negative = Self.profile
        negative.prices["hw_vmptrld"] = .init(cycles: -1, source: "s")
        #expect(throws: CostProfile.LoadError.self) { try decode(String(decoding: try negative.encoded(), as: UTF8.self)) }
        var unsourced = Self.profile
        unsourced.prices["hw_vmptrld"] = .init(cycles: 1, source: " ")
        #expect(throws: CostProfile.LoadError.badPrice(file: "x.json", key: "hw_vmptrld", reason: "every price needs a source")) {
            try decode(String(decoding: try unsourced.encoded(), as: UTF8.self))
        }
        var halfEstimate = Self.profile
        halfEstimate.prices["hw_vmptrld"] = .init(estimate: 150, low: 200, high: 400, source: "s")
        #expect(throws: CostProfile.LoadError.badPrice(file: "x.json", key: "hw_vmptrld", reason: "an estimate needs low <= cycles <= high")) {
            try decode(String(decoding: try halfEstimate.encoded(), as: UTF8.self))
        }
        #expect(throws: CostProfile.LoadError.self) { try decode("not json") }
        #expect(throws: CostProfile.LoadError.unreadable(file: "/nonexistent.json", reason: "no such file, or not readable")) {
            try CostProfile.load(path: "/nonexistent.json")
        }
    }
}

/// Reads an SVG back as its elements and attributes (what the chart test checks).
final class SVGElements: NSObject, XMLParserDelegate {
    var elements: [(name: String, attributes: [String: String])] = []
    var texts: [String] = []
    private var inText = false, current = ""
    func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?,
                attributes: [String: String] = [:]) {
        elements.append((name, attributes))
        if name == "text" { inText = true; current = "" }
    }
    func parser(_ parser: XMLParser, foundCharacters string: String) { if inText { current += string } }
    func parser(_ parser: XMLParser, didEndElement name: String, namespaceURI: String?, qualifiedName: String?) {
        if name == "text" { texts.append(current); inText = false }
    }
    func with(class c: String) -> [[String: String]] { elements.filter { $0.attributes["class"] == c }.map(\.attributes) }
}

@Suite struct SVGChartTests {
    static func result(_ test: String, _ path: NestingPath, l1Exits: Int, median: UInt64) -> BenchResult {
        var w = TransitionCounters()
        w.countL2Exit(.cpuid)
        if l1Exits > 0 { w.countDelivery(.cpuid) }
        for _ in 0..<l1Exits { w.countL1Exit(.vmread) }
        if l1Exits > 0 { w.countL1Exit(.vmresume) }
        return BenchResult(test: test, variant: BenchVariant(path: path), iterations: 1,
                           latency: LatencyReport(samples: 1, minNanos: 1, medianNanos: median, p99Nanos: 1, maxNanos: 1, totalNanos: 1),
                           window: w)
    }

    @Test func aBarPerPathOnALogScaleThenTheSplitOnALinearOne() throws {
        let profile = try CostModel.defaultProfile()
        let results = [Self.result("cpuid", .single, l1Exits: 0, median: 550), Self.result("cpuid", .nvmx, l1Exits: 0, median: 3100),
                       Self.result("cpuid", .nvmxNoShadow, l1Exits: 7, median: 21000), Self.result("hlt", .pv, l1Exits: 0, median: 600),
                       Self.result("hlt", .nvmx, l1Exits: 0, median: 3200)]
        let svg = SVGChart.render(results, profile: profile)
        let parser = XMLParser(data: Data(svg.utf8))
        let read = SVGElements()
        parser.delegate = read
        #expect(parser.parse(), "not well-formed: \(String(describing: parser.parserError))")

        // Panel 1: one bar per result, coloured by its path (one colour per path), with the
        // modelled and the measured figure beside it; the axis is labelled in decades.
        let bars = read.with(class: "bar")
        #expect(bars.count == results.count)
        for (bar, r) in zip(bars, results) {
            #expect(bar["data-test"] == r.test && bar["data-variant"] == r.variant.label && bar["fill"] == SVGChart.color(of: r.path))
            let total = CostModel.cyclesPerOp(r, profile)
            #expect(read.texts.contains("\(Int(total.rounded())) cyc, \(r.latency.medianNanos) ns measured"), "\(read.texts)")
        }
        #expect(Set(NestingPath.allCases.map(SVGChart.color(of:))).count == NestingPath.allCases.count)
        // Log scale: a bar ten times longer in cycles is one decade (a fixed length) longer.
        let width = { (b: [String: String]) in Double(b["width"]!)! }
        let cycles = { (b: [String: String]) in Double(b["data-cycles"]!)! }
        let (a, b) = (bars[0], bars[2])
        let decade = (width(b) - width(a)) / log10(cycles(b) / cycles(a))
        let ticks = read.with(class: "tick")
        #expect(ticks.count >= 4 && read.texts.contains("1k"), "\(read.texts)")
        #expect(abs(decade - (Double(ticks[1]["x"]!)! - Double(ticks[0]["x"]!)!)) < 0.5, "\(decade)")
        #expect(read.texts.contains("modelled cycles per operation (log scale)"))
        #expect(read.with(class: "test-label").count == 4)   // two tests, in each panel

        // Panel 2: the segments of a bar add up to its total on a linear scale that is the
        // test's own (its largest bar is full width), in the fixed part colours.
        let segments = read.with(class: "segment")
        for r in results {
            let mine = segments.filter { $0["data-test"] == r.test && $0["data-variant"] == r.variant.label }
            #expect(!mine.isEmpty)
            let sum = mine.map(cycles).reduce(0, +)
            #expect(abs(sum - CostModel.cyclesPerOp(r, profile)) < 0.2, "\(r.variant.label)")
            let largest = results.filter { $0.test == r.test }.map { CostModel.cyclesPerOp($0, profile) }.max()!
            let drawn = mine.map(width).reduce(0, +)
            #expect(abs(drawn - 520 * sum / largest) < 0.5, "\(r.variant.label): \(drawn)")
        }
        #expect(Set(segments.compactMap { $0["data-part"] }) == ["world-switches", "l0-work", "l1-work"])
        // Legends: every path present, every part.
        #expect(read.with(class: "legend-path").compactMap { $0["data-path"] } == ["single", "nvmx", "nvmx-noshadow", "pv"])
        #expect(read.with(class: "legend-part").count == CostModel.Part.allCases.count)
    }

    /// No priced event at all, and a label longer than the default column: still a chart, with
    /// no NaN, no negative width, and the label column as wide as the label.
    @Test func anEmptyResultAndALongLabelStillDrawCleanly() throws {
        let long = BenchVariant(path: .pv, pvFeatures: [], l2MapMode: .perPage)
        let empty = BenchResult(test: "ept_first_touch", variant: long, iterations: 1,
                                latency: LatencyReport(samples: 1, minNanos: 1, medianNanos: 5, p99Nanos: 1, maxNanos: 1, totalNanos: 1),
                                window: TransitionCounters())
        let svg = SVGChart.render([empty], profile: try CostModel.defaultProfile())
        let parser = XMLParser(data: Data(svg.utf8))
        let read = SVGElements()
        parser.delegate = read
        #expect(parser.parse())
        #expect(!svg.contains("nan") && !svg.contains("inf") && !svg.contains("width=\"-"), "\(svg)")
        #expect(read.texts.contains("no priced events"))
        let bar = try #require(read.with(class: "bar").first)
        let labelRoom = Double(bar["x"]!)! - 12
        #expect(labelRoom >= Double(long.label.count) * 7.2, "\(labelRoom) px for \(long.label)")
    }
}

/// The emulated host suite spends nothing it models: each operation's modelled figure is the
/// enables and setups it made at the profile's prices, exactly.
@Suite struct HostSuiteModelTests {
    @Test func theModelledFiguresAreTheCountedWorkAtTheProfilesPrices() throws {
        let profile = try CostModel.defaultProfile()
        let rows = try HostSuite.measure(iterations: 1, cpuCount: 2)
        let enable = profile.nanos(.cpuVirtualizationEnable), setup = profile.nanos(.oneTimeSetup)
        #expect(enable == profile.cycles(.cpuVirtualizationEnable) / profile.ghz && enable > 0 && setup > 0)
        func row(_ atLoad: Bool, _ s: OneTimeSetupPolicy) throws -> HostSuite.Row {
            try #require(rows.first { $0.enableVirtAtLoad == atLoad && $0.oneTimeSetup == s })
        }
        // enable_virt_at_load: the load enables both CPUs, the first VM none; without it, the reverse.
        #expect(try row(true, .off).load.modelledNanos(profile) == 2 * enable)
        #expect(try row(true, .off).firstVM.modelledNanos(profile) == 0)
        #expect(try row(false, .off).firstVM.modelledNanos(profile) == 2 * enable)
        #expect(try row(false, .off).load.modelledNanos(profile) == 0)
        // The setup: at load (enabling around it when not held), or on the first protected VM.
        #expect(try row(true, .atLoad).load.modelledNanos(profile) == 2 * enable + setup)
        // Without enable_virt_at_load, the setup at load enables both CPUs around it and disables them after.
        #expect(try row(false, .atLoad).load.modelledNanos(profile) == 2 * enable + setup + 2 * profile.nanos(.cpuVirtualizationDisable))
        #expect(try row(true, .onFirstProtectedVM).firstProtectedVM?.modelledNanos(profile) == setup)
        #expect(try row(false, .onFirstProtectedVM).firstProtectedVM?.modelledNanos(profile) == 2 * enable + setup)
        // Every figure comes in both kinds, and the modelled one says what it counted.
        let figures = HostSuite.figures(rows, profile: profile, iterations: 1)
        #expect(figures.filter { $0.source == .model }.count == figures.filter { $0.source == .emulated }.count)
        #expect(figures.contains { $0.source == .model && $0.what == "load: 2 per-CPU enables, 0 disables, 1 one-time setups" })
        // Destroying the last VM without enable_virt_at_load disables both CPUs, and that is priced too.
        let disable = profile.nanos(.cpuVirtualizationDisable)
        #expect(try row(false, .off).destroyLastVM.modelledNanos(profile) == 2 * disable && disable > 0)
        #expect(try row(true, .off).destroyLastVM.modelledNanos(profile) == 0)
    }
}
