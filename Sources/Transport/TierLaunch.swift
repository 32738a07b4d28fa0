import ABI

/// Everything a child tier is told when L0 starts it, carried in one argv word
/// (`pvm __tier <spec>`). The memfds arrive as descriptors 3 (the tier's exchange region), 4
/// (its tables region) and 5 (L1's memslot of host memory, a memfd of its own).
public struct TierLaunch: Equatable, Sendable {
    public var tier: Tier
    public var parent: Int32
    public var path: NestingPath
    public var vcpu: Int
    public var layout: ControlLayout
    public var l1Slot: MemorySlot
    public var cpu: Int?
    /// L2 only: the guest program and its arguments.
    public var program: String
    public var programArguments: [UInt64]
    /// L1 (pv): the PV features to enable, and how to map L2's memory.
    public var pvFeatures: PVFeatures = .all
    public var l2MapMode: L2MapMode = .eager

    public static let exchangeFD: Int32 = 3
    public static let tablesFD: Int32 = 4
    public static let hostMemoryFD: Int32 = 5

    public init(tier: Tier, parent: Int32, path: NestingPath, vcpu: Int, layout: ControlLayout,
                l1Slot: MemorySlot, cpu: Int?, program: String = "", programArguments: [UInt64] = []) {
        self.tier = tier; self.parent = parent; self.path = path; self.vcpu = vcpu
        self.layout = layout; self.l1Slot = l1Slot; self.cpu = cpu
        self.program = program; self.programArguments = programArguments
    }

    /// L0's launch ABI, and the build ID the tier executable had when L0 resolved it: the build
    /// L0 expects this child to be (the child compares both with its own).
    public var abi: UInt64 = LaunchABI.version
    public var build: String = BuildID.current ?? noBuildID
    /// What `build` says for an executable linked without a build ID.
    public static let noBuildID = "none"

    public struct BadSpec: Error, CustomStringConvertible {
        public let spec: String
        public var description: String { "malformed tier launch spec: \(spec)" }
    }

    /// A child of another build than its L0: it refuses to start, and says which versions differ.
    public struct OtherBuild: Error, CustomStringConvertible, Equatable {
        public let l0ABI: UInt64, l0Build: String
        public let tierABI: UInt64, tierBuild: String
        public var description: String {
            "L0 and this tier are different builds (L0: launch ABI \(l0ABI), expects build \(l0Build); "
                + "this tier: launch ABI \(tierABI), build \(tierBuild)); refusing to start"
        }
    }

    /// Throws unless the spec comes from an L0 of this very build.
    public func checkSameBuild() throws(OtherBuild) {
        let mine = BuildID.current ?? Self.noBuildID
        guard abi == LaunchABI.version, build == mine else {
            throw OtherBuild(l0ABI: abi, l0Build: build, tierABI: LaunchABI.version, tierBuild: mine)
        }
    }

    /// Every key, always: a spec with a key missing or one it does not know is refused, never
    /// completed with defaults.
    static let keys: Set<String> = ["abi", "build", "tier", "parent", "path", "vcpu", "vcpus", "l2limit", "slot", "slotflags",
                                    "gpa", "size", "host", "program", "args", "pvfeatures", "l2map", "cpu"]

    public var encoded: String {
        let kv: [(String, String)] = [
            ("abi", "\(abi)"), ("build", build),
            ("tier", "\(tier.rawValue)"), ("parent", "\(parent)"), ("path", path.rawValue), ("vcpu", "\(vcpu)"),
            ("vcpus", "\(layout.vcpuCount)"), ("l2limit", "\(layout.l2AddressLimit)"),
            ("slot", "\(l1Slot.slot)"), ("slotflags", "\(l1Slot.flags)"), ("gpa", "\(l1Slot.guestPhysAddr.raw)"),
            ("size", "\(l1Slot.memorySize)"), ("host", "\(l1Slot.hostOffset.raw)"),
            ("program", program), ("args", programArguments.map(String.init).joined(separator: ":")),
            ("pvfeatures", "\(pvFeatures.rawValue)"), ("l2map", l2MapMode.rawValue),
            ("cpu", cpu.map(String.init) ?? "none"),
        ]
        return kv.map { "\($0.0)=\($0.1)" }.joined(separator: ",")
    }

    public init(decoding spec: String) throws {
        var d: [String: String] = [:]
        for part in spec.split(separator: ",", omittingEmptySubsequences: false) {
            let kv = part.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard kv.count == 2, Self.keys.contains(String(kv[0])), d[String(kv[0])] == nil else { throw BadSpec(spec: spec) }
            d[String(kv[0])] = String(kv[1])
        }
        guard d.count == Self.keys.count else { throw BadSpec(spec: spec) }
        func num(_ k: String) throws -> UInt64 {
            guard let s = d[k], let v = UInt64(s) else { throw BadSpec(spec: spec) }
            return v
        }
        func small(_ k: String, _ limit: UInt64) throws -> Int {
            let v = try num(k)
            guard v <= limit else { throw BadSpec(spec: spec) }
            return Int(v)
        }
        guard let tier = Tier(rawValue: UInt32(truncatingIfNeeded: try small("tier", 2))),
              let path = NestingPath(rawValue: d["path"]!),
              let mode = L2MapMode(rawValue: d["l2map"]!) else { throw BadSpec(spec: spec) }
        self.abi = try num("abi")
        self.build = d["build"]!
        self.tier = tier
        self.parent = Int32(try small("parent", UInt64(Int32.max)))
        self.path = path
        self.vcpu = try small("vcpu", 4095)
        let vcpus = try small("vcpus", 4096)
        let l2Limit = try num("l2limit")
        // The layout places every vCPU's pages and the EPT02 from these: they must describe one.
        guard vcpus > 0, vcpu < vcpus, l2Limit > 0, l2Limit % pageSize == 0, l2Limit <= 1 << 48 else { throw BadSpec(spec: spec) }
        self.layout = ControlLayout(vcpuCount: vcpus, l2AddressLimit: l2Limit)
        self.l1Slot = MemorySlot(slot: UInt32(try small("slot", UInt64(UInt32.max))), flags: UInt32(try small("slotflags", UInt64(UInt32.max))),
                                 guestPhysAddr: L1GPA(try num("gpa")), memorySize: try num("size"),
                                 hostOffset: HostOffset(try num("host")))
        if d["cpu"] == "none" { self.cpu = nil } else { self.cpu = try small("cpu", 4095) }
        self.program = d["program"]!
        self.pvFeatures = PVFeatures(rawValue: try num("pvfeatures"))
        self.l2MapMode = mode
        let a = d["args"]!
        self.programArguments = try a.isEmpty ? [] : a.split(separator: ":", omittingEmptySubsequences: false).map {
            guard let v = UInt64($0) else { throw BadSpec(spec: spec) }
            return v
        }
    }
}
