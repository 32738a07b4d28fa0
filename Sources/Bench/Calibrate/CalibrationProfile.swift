/// Turning measured one-level exits into the cost model's unit prices. Only what /dev/kvm can show
/// one level deep is measured; the rest comes from a base profile, and every source string says
/// which is which, with the real numbers.
extension CalibrationResult {
    /// The world switch alone, as published (PVM paper: ~0.10 us): no exit isolates it, so it is
    /// taken as a time and converted to cycles at this host's TSC rate.
    static let publishedExitRoundTripNanos = 100.0
    /// Published VMCALL round trip (kvm-unit-tests vmcall, Skylake-SP) and the world switch priced
    /// at that paper's 2.5 GHz: used when the hypercall could not be measured here.
    static let publishedHypercallRoundTripCycles = 1_550.0
    static let publishedExitRoundTripCycles = 250.0

    /// A profile for this host: measured where a one-level measurement prices the event, the
    /// base profile's price (and source) for the events only nesting has.
    ///
    /// - `exit_round_trip`: published 0.10 us at the measured TSC rate.
    /// - `l0_simple_exit`: measured in-kernel CPUID round trip minus `exit_round_trip`.
    /// - `l0_hypercall`: measured in-kernel hypercall round trip minus `exit_round_trip`, or
    ///   the published 1,550 - 250 cycles if it was not measured.
    /// - `l1_exit_handling`: as `l0_simple_exit` (L1 is a KVM too).
    /// - everything else: copied from `base`.
    public func profile(base: CostProfile) -> CostProfile {
        typealias E = CostProfile.Event
        let round = { (x: Double) in (x * 10).rounded() / 10 }
        let served = modules.isEmpty ? "" : ", served by \(modules.map(\.rawValue).joined(separator: "+"))"
        let host = "measured by pvm calibrate on this host (\(devicePath)\(served), \(vendor), TSC \(calibrationFormat(tscGHz, 3)) GHz)"
        func figure(_ e: ExitCost) -> String {
            "\(e.kind.label) \(calibrationFormat(e.nanosPerExit, 0)) ns wall, \(calibrationFormat(e.cyclesPerExit, 0)) guest TSC cycles, median of \(e.runs.count) x \(e.iterations)"
        }

        let switchCycles = round(Self.publishedExitRoundTripNanos * tscGHz)
        var prices: [String: CostProfile.Price] = [:]
        prices[E.exitRoundTrip.rawValue] = .init(cycles: switchCycles, source:
            "published, not measured (no exit isolates it): world switch ~0.10 us (PVM paper, SOSP'23), converted at this host's measured TSC rate \(calibrationFormat(tscGHz, 3)) GHz")

        if let c = self[.cpuid] {
            let handler = round(max(0, c.cyclesPerExit - switchCycles))
            prices[E.l0SimpleExit.rawValue] = .init(cycles: handler, source:
                "\(host): \(figure(c)), minus exit_round_trip \(calibrationFormat(switchCycles, 0))")
            prices[E.l1ExitHandling.rawValue] = .init(cycles: handler, source:
                "L1 is a KVM too: handling a delivered exit is the work of L0's simple exit; \(host): \(figure(c)), minus exit_round_trip \(calibrationFormat(switchCycles, 0))")
            // The default profile prices VMREAD/VMWRITE emulation as a simple in-kernel handler;
            // keep that definition with the measured handler.
            prices[E.l0VMXInstruction.rawValue] = .init(cycles: handler, source:
                "emulating VMREAD/VMWRITE is a simple in-kernel handler, priced as this host's CPUID handler: \(host): \(figure(c)), minus exit_round_trip \(calibrationFormat(switchCycles, 0))")
        } else {
            // `Calibration.run` always measures CPUID or throws; a hand-made result may lack it.
            for e in [E.l0SimpleExit, .l1ExitHandling, .l0VMXInstruction] { prices[e.rawValue] = base.prices[e.rawValue] }
        }

        if let h = self[.hypercall] {
            prices[E.l0Hypercall.rawValue] = .init(cycles: round(max(0, h.cyclesPerExit - switchCycles)), source:
                "\(host): \(figure(h)) (unknown KVM_HC number, -KVM_ENOSYS), minus exit_round_trip \(calibrationFormat(switchCycles, 0))")
        } else {
            let why = notMeasured[CalibrationExitKind.hypercall.rawValue].map { " (\($0))" } ?? ""
            prices[E.l0Hypercall.rawValue] = .init(cycles: Self.publishedHypercallRoundTripCycles - Self.publishedExitRoundTripCycles, source:
                "published, not measured here\(why): VMCALL round trip ~1,550 cycles (kvm-unit-tests vmcall, Skylake-SP, 2020) minus the published world switch 250 cycles at 2.5 GHz")
        }

        for e in E.allCases where prices[e.rawValue] == nil {
            // Not observable one level deep through /dev/kvm: keep the base profile's price.
            if var p = base.prices[e.rawValue] {
                p.source = "from profile \"\(base.name)\" (not measurable through /dev/kvm one level deep): \(p.source)"
                prices[e.rawValue] = p
            } else {
                prices[e.rawValue] = .init(cycles: 0, source: "not measurable through /dev/kvm one level deep, and profile \"\(base.name)\" has no price for it: counted, not priced")
            }
        }

        let measured = exits.map { "\($0.kind.label) \(calibrationFormat($0.nanosPerExit, 0)) ns" }.joined(separator: ", ")
        return CostProfile(
            name: "calibrated",
            description: "Exit costs \(host): \(measured). \(whatWasMeasured). Events only nesting has are from \"\(base.name)\".",
            ghz: (tscGHz * 1000).rounded() / 1000,
            prices: prices)
    }

    /// `profile(base:)` over the default profile (Profiles/published.json in Bench's resources).
    public func profile() throws -> CostProfile {
        profile(base: try CostModel.defaultProfile())
    }
}
