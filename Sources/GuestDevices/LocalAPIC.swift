import ABI

/// The local APICs of one VM's vCPUs, as much of them as interrupts between vCPUs need (SDM vol.
/// 3, ch. 11; issue 15): the ICR in its x2APIC form (MSR 0x830, one 64-bit write) and its xAPIC
/// form (two 32-bit registers in the APIC page, the high half first), x2APIC SELF_IPI (MSR
/// 0x83F), the TPR and EOI as MSRs or in the APIC page, IRR and ISR with the processor priority
/// they give, and HLT until an interrupt. Fixed IPIs by physical destination or shorthand;
/// the timer in TSC-deadline mode (LVT timer, IA32_TSC_DEADLINE); logical destinations, lowest
/// priority, NMI/INIT/SIPI and the one-shot and periodic timers are not modelled, and both
/// register interfaces are live at once (no xAPIC/x2APIC mode switch).
///
/// Pure: a hypervisor (L0, or L1 for its L2) asks it what a write means and acts on the answer:
/// a target that runs must be notified (a posted interrupt, or an IPI to its CPU), a halted one
/// woken, one that is not running finds the interrupt pending when it next runs.
public struct LocalAPICs: Sendable {
    /// What a vCPU is doing, as the hypervisor that runs it knows.
    public enum VCPUState: Sendable, Equatable { case running, halted, notRunning }

    /// What an accepted interrupt asks of the hypervisor for its target.
    public enum Delivery: Sendable, Equatable {
        case notify(vcpu: Int)      // running: make it see the interrupt now
        case wake(vcpu: Int)        // halted: runnable again (HLT ends)
        case pending(vcpu: Int)     // not running: nothing to do until it runs
    }

    public enum APICError: Error, Sendable, Equatable {
        /// A fixed interrupt with a vector below 16 (the APIC's "send illegal vector" error).
        case illegalVector(UInt8)
        /// A delivery mode or destination mode this model does not have.
        case unsupported(String)
    }

    /// The ICR, decoded (SDM vol. 3, 11.6.1 and, for x2APIC, 11.12.9).
    public struct ICR: Sendable, Equatable {
        public enum Shorthand: UInt64, Sendable { case none = 0, selfOnly = 1, allIncludingSelf = 2, allExcludingSelf = 3 }
        public var vector: UInt8
        public var deliveryMode: UInt8           // 0 fixed
        public var logical: Bool
        public var shorthand: Shorthand
        public var destination: UInt32

        /// x2APIC: destination in bits 63:32.
        public init(x2apic v: UInt64) {
            vector = UInt8(truncatingIfNeeded: v)
            deliveryMode = UInt8((v >> 8) & 7)
            logical = (v >> 11) & 1 == 1
            shorthand = Shorthand(rawValue: (v >> 18) & 3)!
            destination = UInt32(truncatingIfNeeded: v >> 32)
        }
        /// xAPIC: ICR low (0x300) and high (0x310, destination in bits 31:24).
        public init(xapicLow low: UInt32, high: UInt32) {
            self.init(x2apic: UInt64(low))
            destination = high >> 24
        }
        public static func fixed(_ vector: UInt8, to destination: UInt32) -> ICR {
            ICR(x2apic: UInt64(vector) | UInt64(destination) << 32)
        }
    }

    public typealias MSR = LocalAPICMSR

    /// 256 bits, in place (no heap: the hypervisor asks at every entry whether one is pending).
    typealias Vectors = InlineArray<4, UInt64>

    struct APIC: Sendable {
        var irr = Vectors(repeating: 0)
        var isr = Vectors(repeating: 0)
        var tpr: UInt8 = 0
        var state = VCPUState.running
        /// xAPIC: the ICR high half, written before the low half sends, and the low half last
        /// written (its delivery-status bit always clear: a send completes at once here).
        var icrHigh: UInt32 = 0
        var icrLow: UInt32 = 0
        /// The LVT timer (masked at reset) and, in TSC-deadline mode, the armed deadline (0: none).
        var lvtTimer: UInt32 = LVTTimer.masked
        var deadline: UInt64 = 0

        static func bit(_ v: UInt8) -> (Int, UInt64) { (Int(v >> 6), 1 << UInt64(v & 63)) }
        func has(_ words: Vectors, _ v: UInt8) -> Bool { let (w, b) = Self.bit(v); return words[w] & b != 0 }
        static func highest(_ words: Vectors) -> UInt8? {
            for w in stride(from: 3, through: 0, by: -1) where words[w] != 0 {
                return UInt8(w * 64 + 63 - words[w].leadingZeroBitCount)
            }
            return nil
        }
        /// PPR: the TPR or the highest in-service vector's class, whichever is higher.
        var processorPriority: UInt8 {
            let isrv = Self.highest(isr) ?? 0
            return (tpr >> 4) >= (isrv >> 4) ? tpr : isrv & 0xF0
        }
    }

    var apics: [APIC]

    public init(count: Int) {
        precondition(count > 0 && count <= 255, "1-255 vCPUs")
        apics = [APIC](repeating: APIC(), count: count)
    }

    public var count: Int { apics.count }
    public func state(_ v: Int) -> VCPUState { apics[v].state }
    public mutating func setState(_ v: Int, _ s: VCPUState) { apics[v].state = s }

    /// Sends an IPI from vCPU `from`: the deliveries it makes (an IRR bit already set takes the
    /// new one in: interrupts of one vector coalesce until acknowledged, as on hardware).
    public mutating func send(from: Int, _ icr: ICR) throws(APICError) -> [Delivery] {
        guard icr.deliveryMode == 0 else { throw .unsupported("delivery mode \(icr.deliveryMode)") }
        guard icr.vector >= 16 else { throw .illegalVector(icr.vector) }
        let targets: [Int]
        switch icr.shorthand {
        case .selfOnly: targets = [from]
        case .allIncludingSelf: targets = Array(apics.indices)
        case .allExcludingSelf: targets = apics.indices.filter { $0 != from }
        case .none:
            guard !icr.logical else { throw .unsupported("logical destination mode") }
            if icr.destination == 0xFFFF_FFFF || icr.destination == 0xFF { targets = Array(apics.indices) }   // broadcast
            else if Int(icr.destination) < apics.count { targets = [Int(icr.destination)] }
            else { targets = [] }                                                          // no such APIC: dropped
        }
        return targets.map { accept(icr.vector, at: $0) }
    }

    /// An interrupt arrives at `v`'s APIC.
    mutating func accept(_ vector: UInt8, at v: Int) -> Delivery {
        let (w, b) = APIC.bit(vector)
        apics[v].irr[w] |= b
        switch apics[v].state {
        case .running: return .notify(vcpu: v)
        case .halted:
            apics[v].state = .running
            return .wake(vcpu: v)
        case .notRunning: return .pending(vcpu: v)
        }
    }

    /// The highest pending vector `v` can take now (above its processor priority's class).
    public func deliverable(_ v: Int) -> UInt8? {
        let irr = apics[v].irr
        guard irr[0] | irr[1] | irr[2] | irr[3] != 0, let irrv = APIC.highest(irr) else { return nil }
        return (irrv >> 4) > (apics[v].processorPriority >> 4) ? irrv : nil
    }

    /// `v` takes its highest deliverable interrupt: IRR to ISR. nil if none is deliverable.
    public mutating func acknowledge(_ v: Int) -> UInt8? {
        guard let vector = deliverable(v) else { return nil }
        let (w, b) = APIC.bit(vector)
        apics[v].irr[w] &= ~b
        apics[v].isr[w] |= b
        return vector
    }

    /// EOI: the highest in-service interrupt is done.
    public mutating func endOfInterrupt(_ v: Int) {
        guard let vector = APIC.highest(apics[v].isr) else { return }
        let (w, b) = APIC.bit(vector)
        apics[v].isr[w] &= ~b
    }

    /// HLT on `v`: false if an interrupt is already deliverable (HLT ends at once), else it halts.
    public mutating func halt(_ v: Int) -> Bool {
        if deliverable(v) != nil { return false }
        apics[v].state = .halted
        return true
    }

    /// An x2APIC MSR write by `v` (TPR, EOI, ICR, SELF_IPI): the deliveries it makes; nil if
    /// `msr` is not one of these.
    public mutating func writeMSR(_ v: Int, _ msr: UInt32, _ value: UInt64) throws(APICError) -> [Delivery]? {
        switch msr {
        case MSR.tpr: apics[v].tpr = UInt8(truncatingIfNeeded: value); return []
        case MSR.eoi: endOfInterrupt(v); return []
        case MSR.icr: return try send(from: v, ICR(x2apic: value))
        case MSR.lvtTimer: setLVTTimer(v, UInt32(truncatingIfNeeded: value)); return []
        case MSR.selfIPI: return try send(from: v, ICR(x2apic: value & 0xFF | ICR.Shorthand.selfOnly.rawValue << 18))
        default: return nil
        }
    }

    /// An x2APIC MSR read by `v`: its ID (the vCPU index) and TPR; the rest read 0.
    public func readMSR(_ v: Int, _ msr: UInt32) -> UInt64 {
        switch msr {
        case MSR.id: UInt64(v)
        case MSR.tpr: UInt64(apics[v].tpr)
        case MSR.lvtTimer: UInt64(apics[v].lvtTimer)
        default: 0
        }
    }

    /// KVM_HC_SEND_IPI by `v` (kvm_pv_send_ipi): the fixed IPI in `icr`'s low bits to every APIC
    /// ID set in the 128-bit bitmap from `minID`. IDs past the VM's (or past 2^64) are skipped;
    /// a bad vector or mode stops the walk with the APIC's error (what was delivered stays).
    public mutating func sendPV(from v: Int, bitmapLow: UInt64, bitmapHigh: UInt64, minID: UInt64, icr: UInt64)
        -> (deliveries: [Delivery], error: APICError?) {
        var out: [Delivery] = []
        for bit in 0..<128 where (bit < 64 ? bitmapLow >> UInt64(bit) : bitmapHigh >> UInt64(bit - 64)) & 1 != 0 {
            let (target, overflow) = minID.addingReportingOverflow(UInt64(bit))
            guard !overflow, target < UInt64(apics.count) else { continue }
            do { out += try send(from: v, ICR(x2apic: icr & 0x7FF | target << 32)) } catch { return (out, error) }
        }
        return (out, nil)
    }

    /// An xAPIC register write by `v` through its APIC page (`XAPIC`): the deliveries it makes.
    /// Only a 32-bit store at a register's 16-byte boundary reaches a register (SDM 11.4.1);
    /// any other store, and one to a register this model does not have, is dropped, as KVM's
    /// apic_mmio_write drops them.
    public mutating func writeMMIO(_ v: Int, offset: UInt64, size: UInt64, _ value: UInt64) throws(APICError) -> [Delivery] {
        guard size == 4, offset & 0xF == 0 else { return [] }
        let word = UInt32(truncatingIfNeeded: value)
        switch offset {
        case XAPIC.tpr: apics[v].tpr = UInt8(truncatingIfNeeded: word)
        case XAPIC.eoi: endOfInterrupt(v)
        case XAPIC.icrHigh: writeICR(v, high: word)
        case XAPIC.icrLow: return try writeICR(v, low: word)
        case XAPIC.lvtTimer: setLVTTimer(v, word)
        default: break
        }
        return []
    }

    /// An xAPIC register read by `v`: its ID (in bits 31:24), the TPR and both ICR halves; the
    /// rest read 0. As KVM's kvm_lapic_reg_read, a 1-, 2- or 4-byte read inside one register's
    /// first 32 bits gets those bytes; any other read gets 0 (KVM fails those).
    public func readMMIO(_ v: Int, offset: UInt64, size: UInt64) -> UInt64 {
        let within = offset & 0xF
        guard size == 1 || size == 2 || size == 4, within + size <= 4 else { return 0 }
        let word: UInt32 = switch offset & ~0xF {
        case XAPIC.id: UInt32(truncatingIfNeeded: v) << 24
        case XAPIC.tpr: UInt32(apics[v].tpr)
        case XAPIC.icrLow: apics[v].icrLow & ~Self.icrDeliveryStatus
        case XAPIC.icrHigh: apics[v].icrHigh
        case XAPIC.lvtTimer: apics[v].lvtTimer
        default: 0
        }
        return UInt64(word >> UInt32(within * 8)) & (size == 4 ? 0xFFFF_FFFF : (1 << (size * 8)) - 1)
    }

    /// ICR bit 12, delivery status: 1 while a send is pending (never, here).
    public static let icrDeliveryStatus: UInt32 = 1 << 12

    // MARK: the timer, in TSC-deadline mode (SDM 11.5.4.1)

    /// The LVT timer register: vector, mask and mode (the other bits read 0). Leaving
    /// TSC-deadline mode disarms the deadline.
    mutating func setLVTTimer(_ v: Int, _ value: UInt32) {
        apics[v].lvtTimer = value & (LVTTimer.vectorMask | LVTTimer.masked | LVTTimer.modeMask)
        if apics[v].lvtTimer & LVTTimer.modeMask != LVTTimer.tscDeadlineMode { apics[v].deadline = 0 }
    }

    /// WRMSR IA32_TSC_DEADLINE by `v` at guest time `now`: ignored unless the timer is in
    /// TSC-deadline mode; 0 disarms; a deadline already reached fires at once (the interrupt,
    /// unless the LVT entry is masked, and the deadline reads 0 again); a later one is armed.
    public mutating func armTSCDeadline(_ v: Int, _ deadline: UInt64, now: UInt64) -> [Delivery] {
        guard apics[v].lvtTimer & LVTTimer.modeMask == LVTTimer.tscDeadlineMode else { return [] }
        apics[v].deadline = deadline
        return timerTick(v, now: now)
    }

    /// `v`'s armed deadline, 0 if none: what the hypervisor tells `v`'s CPU to exit at.
    public func tscDeadline(_ v: Int) -> UInt64 { apics[v].deadline }

    /// `v`'s timer will deliver an interrupt when its deadline comes: armed, its LVT entry
    /// unmasked and its vector legal (a halted vCPU with only such a timer can still wake).
    public func timerWillInterrupt(_ v: Int) -> Bool {
        let lvt = apics[v].lvtTimer
        return apics[v].deadline != 0 && lvt & LVTTimer.masked == 0 && lvt & LVTTimer.vectorMask >= 16
    }

    /// Time passes on `v` (its CPU's timer exit, or any look at the clock): a deadline reached
    /// fires, once.
    public mutating func timerTick(_ v: Int, now: UInt64) -> [Delivery] {
        let d = apics[v].deadline
        guard d != 0, now >= d else { return [] }
        apics[v].deadline = 0
        let lvt = apics[v].lvtTimer
        let vector = UInt8(truncatingIfNeeded: lvt & LVTTimer.vectorMask)
        guard lvt & LVTTimer.masked == 0, vector >= 16 else { return [] }   // masked, or an illegal vector: nothing
        return [accept(vector, at: v)]
    }

    /// An xAPIC ICR write by `v`: the high half is kept; the low half sends.
    public mutating func writeICR(_ v: Int, low: UInt32) throws(APICError) -> [Delivery] {
        apics[v].icrLow = low
        return try send(from: v, ICR(xapicLow: low, high: apics[v].icrHigh))
    }
    public mutating func writeICR(_ v: Int, high: UInt32) { apics[v].icrHigh = high }
}
