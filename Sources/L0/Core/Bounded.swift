/// Storage for what a guest tier makes L0 keep. A guest chooses how many hypercall numbers it
/// tries and how many lines it prints; L0's memory must not grow with that choice, so everything
/// keyed or appended by a guest goes into one of these two shapes, and what does not fit is counted.

/// Counts keyed by a guest-chosen number: the first `capacity` distinct keys get their own
/// count, every later key is added to `others`.
public struct BoundedCounts<Key: Hashable & Sendable>: Equatable, Sendable, Sequence {
    public let capacity: Int
    public private(set) var counts: [Key: UInt64] = [:]
    /// Events whose key arrived once the table was full.
    public private(set) var others: UInt64 = 0

    public init(capacity: Int) {
        precondition(capacity > 0, "a bounded table needs room for one key")
        self.capacity = capacity
    }

    public mutating func record(_ key: Key, count n: UInt64 = 1) {
        if counts[key] != nil || counts.count < capacity {
            counts[key, default: 0] &+= n
        } else {
            others &+= n
        }
    }

    /// The count of `key`, nil if it has none of its own (never seen, or seen once full).
    public subscript(key: Key) -> UInt64? { counts[key] }

    /// Every event, those in `others` included.
    public var total: UInt64 { counts.values.reduce(others, &+) }

    /// What happened since `earlier` (a snapshot of this table).
    public func since(_ earlier: Self) -> Self {
        var d = Self(capacity: capacity)
        for (k, v) in counts { d.counts[k] = v &- (earlier.counts[k] ?? 0) }
        d.others = others &- earlier.others
        return d
    }

    public func makeIterator() -> Dictionary<Key, UInt64>.Iterator { counts.makeIterator() }
}

/// The last `capacity` items a guest appended (a ring), and how many older ones were dropped.
public struct BoundedLog<Element: Sendable>: Sendable, RandomAccessCollection {
    public let capacity: Int
    private var ring: [Element] = []
    /// Index in `ring` of the oldest item once the ring is full.
    private var head = 0
    public private(set) var dropped: UInt64 = 0

    public init(capacity: Int) {
        precondition(capacity > 0, "a bounded log needs room for one item")
        self.capacity = capacity
    }

    public mutating func append(_ item: Element) {
        if ring.count < capacity {
            ring.append(item)
        } else {
            ring[head] = item
            head = (head + 1) % capacity
            dropped &+= 1
        }
    }

    public var startIndex: Int { 0 }
    public var endIndex: Int { ring.count }
    public subscript(i: Int) -> Element {
        precondition(i >= 0 && i < ring.count, "index out of range")
        return ring[(head + i) % ring.count]
    }
}

extension BoundedLog: Equatable where Element: Equatable {
    public static func == (a: Self, b: Self) -> Bool { a.dropped == b.dropped && a.elementsEqual(b) }
}
