import ABI
import Transport

/// An optional record of every run span on one vCPU, taken by L0 at each handoff: which tier
/// ran, from when to when, and the exit that ended it (for L0's own spans: the exit it handled).
/// `pvm stat` and `pvm trace` are built from it. Off unless asked for: two clock reads per
/// transition are not free on the exit paths.
public struct TransitionLog: Sendable {
    public struct Span: Equatable, Sendable {
        public var tier: Tier
        public var startNanos: UInt64
        public var endNanos: UInt64
        /// For a guest span: the exit that ended it. For an L0 span: the exit L0 handled.
        public var reason: ExitReason
        /// For an L0 span: the tier whose exit it handled.
        public var exitFrom: Tier
        public var nanos: UInt64 { endNanos - startNanos }
    }

    public private(set) var spans: [Span] = []
    public let capacity: Int
    public private(set) var dropped = 0
    var lastHandoff: UInt64 = 0

    public init(capacity: Int = 2_000_000) {
        self.capacity = capacity
        spans.reserveCapacity(min(capacity, 1 << 16))
    }

    mutating func append(_ s: Span) {
        if spans.count < capacity { spans.append(s) } else { dropped += 1 }
    }

    /// L0 got the turn back from `tier`, whose exit is `reason`: the guest span ends now.
    @inline(__always)
    mutating func guestExited(_ tier: Tier, reason: ExitReason, at t: UInt64) {
        append(Span(tier: tier, startNanos: lastHandoff, endNanos: t, reason: reason, exitFrom: tier))
    }

    /// L0 handed the turn on: its span, handling `reason` from `from`, ends now.
    @inline(__always)
    mutating func l0Handed(from: Tier, reason: ExitReason, received: UInt64, at t: UInt64) {
        append(Span(tier: .l0, startNanos: received, endNanos: t, reason: reason, exitFrom: from))
        lastHandoff = t
    }

    mutating func started(at t: UInt64) { lastHandoff = t }
}
