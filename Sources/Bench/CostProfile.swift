import Foundation

/// A hardware profile: unit prices, in cycles, for the events the cost model counts, each with
/// where it comes from. Profiles are data files (Sources/Bench/Profiles/*.json); the default is
/// built only from published single-level figures (../shared/reference/costs-and-floors.md),
/// never fitted to a nested total. `pvm calibrate` writes one measured on this host.
///
/// File format:
///     {"name": "...", "description": "...", "ghz": 2.5,
///      "prices": {"exit_round_trip": {"cycles": 250, "source": "..."}, ...}}
public struct CostProfile: Codable, Equatable, Sendable {
    public struct Price: Codable, Equatable, Sendable {
        public var cycles: Double
        public var source: String
        public init(cycles: Double, source: String) { self.cycles = cycles; self.source = source }
    }
    public var name: String
    public var description: String
    /// Clock rate used to print cycles as time.
    public var ghz: Double
    public var prices: [String: Price]

    public init(name: String, description: String, ghz: Double, prices: [String: Price]) {
        self.name = name; self.description = description; self.ghz = ghz; self.prices = prices
    }

    /// Every price the model needs. A profile must give all of them, and nothing else.
    public enum Event: String, CaseIterable, Sendable {
        /// The hardware part of one VM exit and the VM entry back (world switch), any tier to L0.
        case exitRoundTrip = "exit_round_trip"
        /// L0 handling a simple exit in its kernel (CPUID, an MSR it emulates, an in-kernel port).
        case l0SimpleExit = "l0_simple_exit"
        /// L0 handling a hypercall in its kernel.
        case l0Hypercall = "l0_hypercall"
        /// L1 (a KVM) handling an exit L0 delivered to it: the same work L0 does for a simple exit.
        case l1ExitHandling = "l1_exit_handling"
        /// L0 emulating one exiting VMREAD/VMWRITE (decode, vmcs12 access, VMsucceed).
        case l0VMXInstruction = "l0_vmx_instruction"
        /// Loading another VMCS (vmcs01 <-> vmcs02 on nested entry and exit).
        case vmcsSwitch = "vmcs_switch"
        /// One vmcs12, shadow-VMCS or eVMCS field read, written or copied by L0.
        case vmcsFieldAccess = "vmcs_field_access"
        /// One group of VM-entry consistency checks.
        case consistencyCheckGroup = "consistency_check_group"
        /// Reading one EPT12 entry during L0's walk.
        case ept12WalkStep = "ept12_walk_step"
        /// Installing one EPT02 entry.
        case ept02Fill = "ept02_fill"
    }

    public enum LoadError: Error, CustomStringConvertible, Equatable {
        case unreadable(file: String, reason: String)
        case malformed(file: String, reason: String)
        case missingPrice(file: String, key: String)
        case unknownPrice(file: String, key: String)
        case badPrice(file: String, key: String, reason: String)

        public var description: String {
            switch self {
            case let .unreadable(f, r): "\(f): cannot read the profile: \(r)"
            case let .malformed(f, r): "\(f): not a cost profile: \(r)"
            case let .missingPrice(f, k): "\(f): no price for \"\(k)\""
            case let .unknownPrice(f, k): "\(f): \"\(k)\" is not an event the model prices (known: \(Event.allCases.map(\.rawValue).joined(separator: ", ")))"
            case let .badPrice(f, k, r): "\(f): price \"\(k)\": \(r)"
            }
        }
    }

    /// Parses and validates a profile; errors name the file and the key.
    public static func decode(_ data: Data, file: String) throws -> CostProfile {
        let p: CostProfile
        do { p = try JSONDecoder().decode(CostProfile.self, from: data) } catch {
            throw LoadError.malformed(file: file, reason: "\(error)")
        }
        for e in Event.allCases where p.prices[e.rawValue] == nil { throw LoadError.missingPrice(file: file, key: e.rawValue) }
        for (k, v) in p.prices {
            guard Event(rawValue: k) != nil else { throw LoadError.unknownPrice(file: file, key: k) }
            guard v.cycles.isFinite, v.cycles >= 0 else { throw LoadError.badPrice(file: file, key: k, reason: "cycles must be a finite number >= 0") }
            guard !v.source.trimmingCharacters(in: .whitespaces).isEmpty else { throw LoadError.badPrice(file: file, key: k, reason: "every price needs a source") }
        }
        guard p.ghz.isFinite, p.ghz > 0 else { throw LoadError.malformed(file: file, reason: "ghz must be > 0") }
        return p
    }

    public static func load(path: String) throws -> CostProfile {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw LoadError.unreadable(file: path, reason: "no such file, or not readable")
        }
        return try decode(data, file: path)
    }

    public func encoded() throws -> Data {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        return try e.encode(self)
    }

    public func cycles(_ e: Event) -> Double { prices[e.rawValue]?.cycles ?? 0 }
}
