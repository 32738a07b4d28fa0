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
        let mem = l1Memory.host
        guard let cmdRaw: UInt64 = try? mem.load(at: host + Ucall.commandOffset) else {
            return .stop(.fatal(.ucallUnmapped(blockGPA)))
        }
        let args: [UInt64] = (0..<Ucall.argCount).map { i in
            (try? mem.load(UInt64.self, at: host + Ucall.argsOffset + UInt64(i) * 8)) ?? 0
        }
        func message() -> String {
            let bytes = (try? mem.readBytes(at: host + Ucall.messageOffset, count: Ucall.messageCapacity)) ?? []
            return String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
        }
        switch UcallCommand(rawValue: cmdRaw) {
        case .sync:
            harness.syncs.append(args)
            if args[0] == UcallStage.measureStart {
                var start = counters
                start.l2Entries += 1            // the entry that resumes L2 now is outside the window
                harness.windowStart = start
            } else if args[0] == UcallStage.measureEnd, let start = harness.windowStart {
                var end = counters
                end.l2Exits[TransitionCounters.index(.ioInstruction)] -= 1   // this ucall's own exit
                harness.windows.append(end.since(start))
                harness.windowStart = nil
            }
            return .resume(.l2)
        case .report:
            harness.reports.append(LatencyReport(samples: args[0], minNanos: args[1], medianNanos: args[2],
                                                 p99Nanos: args[3], maxNanos: args[4], totalNanos: args[5]))
            return .resume(.l2)
        case .printf:
            harness.prints.append(message())
            return .resume(.l2)
        case .abort:
            return .stop(.guestAssert(message()))
        case .done:
            return .stop(.guestDone)
        case .some(.none), nil:
            return .stop(.fatal(.unknownUcall(cmdRaw)))
        }
    }
}
