import ABI
import Transport

/// A latency measurement the guest took around each operation (ns).
public struct LatencyReport: Equatable, Sendable, Codable {
    public var samples: UInt64
    public var minNanos: UInt64
    public var medianNanos: UInt64
    public var p99Nanos: UInt64
    public var maxNanos: UInt64
    public var totalNanos: UInt64

    public init(samples: UInt64, minNanos: UInt64, medianNanos: UInt64, p99Nanos: UInt64, maxNanos: UInt64, totalNanos: UInt64) {
        self.samples = samples
        self.minNanos = minNanos
        self.medianNanos = medianNanos
        self.p99Nanos = p99Nanos
        self.maxNanos = maxNanos
        self.totalNanos = totalNanos
    }
}

/// What the guest program told the harness through ucalls, and the transition counts of each
/// measurement window (from the entry after `sync(measureStart)` to the exit of `sync(measureEnd)`).
/// All of it is guest-driven, so each is a bounded log: the last items and a count of dropped ones.
public struct Harness: Sendable {
    public static let syncCapacity = 4_096
    public static let printCapacity = 256
    public static let reportCapacity = 256
    public static let windowCapacity = 256
    public var syncs = BoundedLog<[UInt64]>(capacity: syncCapacity)
    public var prints = BoundedLog<String>(capacity: printCapacity)
    public var reports = BoundedLog<LatencyReport>(capacity: reportCapacity)
    public var windows = BoundedLog<TransitionCounters>(capacity: windowCapacity)
    var windowStart: TransitionCounters?
    public init() {}
}

extension L0VCPU {
    /// The ucall port: read the block the guest wrote at `blockGPA` (through EPT02, as the
    /// guest's own stores went) and act on it.
    func handleUcall(blockGPA: L2GPA) -> NextStep {
        guard blockGPA.offsetInPage + Ucall.size <= pageSize,
              let host = ept02.translate(blockGPA, access: EPT.read) else {
            return .stop(.fatal(.ucallUnmapped(blockGPA)))
        }
        return handleUcall(at: host, from: .l2, unmapped: .ucallUnmapped(blockGPA))
    }

    /// The ucall L1 passed on for its L2 (pvm-rfc): the block at `blockGPA` in L1's memory.
    /// The switcher's counters are read at each window edge (L1's claims, clamped on use).
    func handleForwardedUcall(blockGPA: L1GPA, switcher: SwitcherView) -> NextStep {
        guard blockGPA.offsetInPage + Ucall.size <= pageSize,
              let host = try? l1Memory.memslots.translate(blockGPA, length: Ucall.size) else {
            return .stop(.fatal(.forwardedUcallUnmapped(blockGPA)))
        }
        counters.switcher = switcher.counterWords()
        return handleUcall(at: host, from: .l1, unmapped: .forwardedUcallUnmapped(blockGPA))
    }

    /// Acts on the ucall block at `host`, which `tier`'s exit handed L0. The window's edges
    /// leave out the ucalls' own transitions: the entry that resumes after measureStart, and
    /// the exits that brought measureEnd here (L2's; on pvm-rfc L2's into L1 and L1's own).
    private func handleUcall(at host: HostOffset, from tier: Tier, unmapped: FatalError) -> NextStep {
        let events = control.l2EventCounters(vcpu: id)
        counters.l2Events = L2EventCounter.allCases.map { events[UInt64($0.rawValue)] }
        let mem = l1Memory.host
        guard let cmdRaw: UInt64 = try? mem.load(at: host + Ucall.commandOffset) else {
            return .stop(.fatal(unmapped))
        }
        let args: [UInt64] = (0..<Ucall.argCount).map { i in
            (try? mem.load(UInt64.self, at: host + Ucall.argsOffset + UInt64(i) * 8)) ?? 0
        }
        func message() -> String {
            let bytes = (try? mem.readBytes(at: host + Ucall.messageOffset, count: Ucall.messageCapacity)) ?? []
            return String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
        }
        let resume: NextStep = .resume(tier)
        let io = TransitionCounters.index(.ioInstruction)
        let switcherEntries = SwitcherLayout.reasonSlots + SwitcherCounter.entries.rawValue
        switch UcallCommand(rawValue: cmdRaw) {
        case .sync:
            harness.syncs.append(args)
            if args[0] == UcallStage.measureStart {
                var start = counters
                if tier == .l1 {
                    start.l1Entries += 1            // L0 -> L1, then L1 -> L2: outside the window
                    start.switcher[switcherEntries] &+= 1
                } else {
                    start.l2Entries += 1            // the entry that resumes L2 now is outside the window
                }
                harness.windowStart = start
            } else if args[0] == UcallStage.measureEnd, let start = harness.windowStart {
                var end = counters
                if tier == .l1 {
                    end.l1Exits[io] = end.l1Exits[io].subtractingClamped(1)
                    end.switcher[io] = end.switcher[io].subtractingClamped(1)
                } else {
                    end.l2Exits[io] = end.l2Exits[io].subtractingClamped(1)   // this ucall's own exit
                }
                harness.windows.append(end.since(start))
                harness.windowStart = nil
            }
            return resume
        case .report:
            harness.reports.append(LatencyReport(samples: args[0], minNanos: args[1], medianNanos: args[2],
                                                 p99Nanos: args[3], maxNanos: args[4], totalNanos: args[5]))
            return resume
        case .printf:
            harness.prints.append(message())
            return resume
        case .abort:
            return .stop(.guestAssert(message()))
        case .done:
            return .stop(.guestDone)
        case .some(.none), nil:
            return .stop(.fatal(.unknownUcall(cmdRaw)))
        }
    }
}
