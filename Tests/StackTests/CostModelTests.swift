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
            "nestedVMEntries", "ept12Resyncs",
        ]
        let pricedThroughAnother: [String: String] = [
            "shadowVMCSFieldCopies": "the hardware VMREADs/VMWRITEs of the shadow copies",
            "vmcsSwitches": "the VMPTRLDs",
            "ept12Unsyncs": "the emulated store that made the table unsync",
            "memslotZaps": "the memslot suite's own timings; no bench operation deletes a memslot",
        ]
        for label in Mirror(reflecting: TransitionCounters()).children.compactMap(\.label) {
            #expect(pricedByALine.contains(label) || pricedThroughAnother[label] != nil, "\(label) is counted but its cost is nowhere")
        }
        // l1Entries/l2Entries are the entries of the world switches priced with the exits.
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

@Suite struct SVGChartTests {
    @Test func theChartIsWellFormedSVGWithABarAndALabelPerResult() throws {
        var w = TransitionCounters()
        w.countL2Exit(.cpuid); w.countDelivery(.cpuid); w.countL1Exit(.vmresume)
        let r = BenchResult(test: "cpuid", variant: BenchVariant(path: .nvmx), iterations: 1,
                            latency: LatencyReport(samples: 1, minNanos: 1, medianNanos: 3600, p99Nanos: 1, maxNanos: 1, totalNanos: 1),
                            window: w)
        let svg = SVGChart.render([r, r], profile: try CostModel.defaultProfile())
        let parser = XMLParser(data: Data(svg.utf8))
        #expect(parser.parse(), "not well-formed: \(String(describing: parser.parserError))")
        #expect(svg.components(separatedBy: "2200 cyc, 3600 ns").count == 3)
        #expect(svg.contains("L1 work") && svg.contains("world switches"))
    }
}
