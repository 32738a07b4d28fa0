import ABI

/// Everything a child tier is told when L0 starts it, carried in one argv word
/// (`pvm __tier <spec>`). The memfds arrive as descriptors 3 (control) and 4 (host memory).
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

    public static let controlFD: Int32 = 3
    public static let hostMemoryFD: Int32 = 4

    public init(tier: Tier, parent: Int32, path: NestingPath, vcpu: Int, layout: ControlLayout,
                l1Slot: MemorySlot, cpu: Int?, program: String = "", programArguments: [UInt64] = []) {
        self.tier = tier; self.parent = parent; self.path = path; self.vcpu = vcpu
        self.layout = layout; self.l1Slot = l1Slot; self.cpu = cpu
        self.program = program; self.programArguments = programArguments
    }

    public struct BadSpec: Error, CustomStringConvertible {
        public let spec: String
        public var description: String { "malformed tier launch spec: \(spec)" }
    }

    public var encoded: String {
        var kv: [(String, String)] = [
            ("tier", "\(tier.rawValue)"), ("parent", "\(parent)"), ("path", path.rawValue), ("vcpu", "\(vcpu)"),
            ("vcpus", "\(layout.vcpuCount)"), ("l2limit", "\(layout.l2AddressLimit)"),
            ("slot", "\(l1Slot.slot)"), ("slotflags", "\(l1Slot.flags)"), ("gpa", "\(l1Slot.guestPhysAddr.raw)"),
            ("size", "\(l1Slot.memorySize)"), ("host", "\(l1Slot.hostOffset.raw)"),
            ("program", program), ("args", programArguments.map(String.init).joined(separator: ":")),
        ]
        kv.append(("pvfeatures", "\(pvFeatures.rawValue)"))
        kv.append(("l2map", l2MapMode.rawValue))
        if let cpu { kv.append(("cpu", "\(cpu)")) }
        return kv.map { "\($0.0)=\($0.1)" }.joined(separator: ",")
    }

    public init(decoding spec: String) throws {
        var d: [String: String] = [:]
        for part in spec.split(separator: ",") {
            let kv = part.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard kv.count == 2 else { throw BadSpec(spec: spec) }
            d[String(kv[0])] = String(kv[1])
        }
        func num(_ k: String) throws -> UInt64 {
            guard let s = d[k], let v = UInt64(s) else { throw BadSpec(spec: spec) }
            return v
        }
        guard let tier = Tier(rawValue: UInt32(try num("tier"))),
              let path = NestingPath(rawValue: d["path"] ?? "") else { throw BadSpec(spec: spec) }
        self.tier = tier
        self.parent = Int32(try num("parent"))
        self.path = path
        self.vcpu = Int(try num("vcpu"))
        self.layout = ControlLayout(vcpuCount: Int(try num("vcpus")), l2AddressLimit: try num("l2limit"))
        self.l1Slot = MemorySlot(slot: UInt32(try num("slot")), flags: UInt32(try num("slotflags")),
                                 guestPhysAddr: L1GPA(try num("gpa")), memorySize: try num("size"),
                                 hostOffset: HostOffset(try num("host")))
        self.cpu = d["cpu"].flatMap { Int($0) }
        self.program = d["program"] ?? ""
        self.pvFeatures = PVFeatures(rawValue: (try? num("pvfeatures")) ?? PVFeatures.all.rawValue)
        guard let mode = L2MapMode(rawValue: d["l2map"] ?? L2MapMode.eager.rawValue) else { throw BadSpec(spec: spec) }
        self.l2MapMode = mode
        let a = d["args"] ?? ""
        self.programArguments = try a.isEmpty ? [] : a.split(separator: ":").map {
            guard let v = UInt64($0) else { throw BadSpec(spec: spec) }
            return v
        }
    }
}
