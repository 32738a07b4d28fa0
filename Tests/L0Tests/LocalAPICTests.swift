import ABI
// The local APIC model (GuestDevices/LocalAPIC.swift): issue 15's interrupts between vCPUs,
// tested alone with made-up writes before any stack uses it.
import GuestDevices
import Testing
import TestSupport

@Suite struct LocalAPICTests {
    typealias D = LocalAPICs.Delivery

    @Test func aFixedIPIReachesItsTargetInEveryState() throws {
        var a = LocalAPICs(count: 3)
        a.setState(1, .halted)
        a.setState(2, .notRunning)
        #expect(try a.send(from: 0, .fixed(0x40, to: 1)) == [D.wake(vcpu: 1)])
        #expect(a.state(1) == .running)
        #expect(try a.send(from: 0, .fixed(0x41, to: 2)) == [D.pending(vcpu: 2)])
        #expect(try a.send(from: 1, .fixed(0x42, to: 0)) == [D.notify(vcpu: 0)])
        #expect(a.acknowledge(1) == 0x40 && a.acknowledge(2) == 0x41 && a.acknowledge(0) == 0x42)
        #expect(a.acknowledge(0) == nil)
        #expect(try a.send(from: 0, .fixed(0x43, to: 9)).isEmpty)          // no such APIC: dropped
    }

    @Test func shorthandsSelfIPIAndBothICRForms() throws {
        var a = LocalAPICs(count: 3)
        #expect(try a.writeMSR(1, LocalAPICs.MSR.selfIPI, 0x55) == [D.notify(vcpu: 1)])
        #expect(a.acknowledge(1) == 0x55)
        // x2APIC ICR: all excluding self (shorthand 3, bits 19:18).
        #expect(try a.writeMSR(0, LocalAPICs.MSR.icr, 0x60 | 3 << 18) == [D.notify(vcpu: 1), D.notify(vcpu: 2)])
        // xAPIC: the high half (destination in 31:24) first, the low half sends.
        a.writeICR(2, high: 1 << 24)
        #expect(try a.writeICR(2, low: 0x70) == [D.notify(vcpu: 1)])
        #expect(a.acknowledge(1) == 0x70 && a.acknowledge(1) == nil)       // 0x60 is below 0x70's class now
        a.endOfInterrupt(1)
        #expect(a.acknowledge(1) == 0x60)
        #expect(try a.send(from: 0, .fixed(0x80, to: 0xFFFF_FFFF)).count == 3)   // broadcast
    }

    /// The xAPIC page: the same registers as 32-bit words on 16-byte boundaries; any other
    /// store is dropped and any other load reads 0, as KVM's apic_mmio_write/read treat them.
    @Test func theXAPICPageReachesTheSameRegisters() throws {
        var a = LocalAPICs(count: 3)
        #expect(try a.writeMMIO(2, offset: XAPIC.icrHigh, size: 4, 1 << 24).isEmpty)
        #expect(a.readMMIO(2, offset: XAPIC.icrHigh, size: 4) == 1 << 24)
        #expect(try a.writeMMIO(2, offset: XAPIC.icrLow, size: 4, 0x70) == [D.notify(vcpu: 1)])
        #expect(try a.writeMMIO(0, offset: XAPIC.icrLow, size: 4, 0x71 | 1 << 18) == [D.notify(vcpu: 0)])   // self shorthand
        #expect(a.readMMIO(1, offset: XAPIC.id, size: 4) == 1 << 24)
        // TPR class 7 holds 0x70 back; EOI through the page ends the one in service.
        #expect(try a.writeMMIO(1, offset: XAPIC.tpr, size: 4, 0x70).isEmpty)
        #expect(a.readMMIO(1, offset: XAPIC.tpr, size: 4) == 0x70 && a.deliverable(1) == nil)
        _ = try a.writeMMIO(1, offset: XAPIC.tpr, size: 4, 0)
        #expect(a.acknowledge(1) == 0x70)
        _ = try a.writeMMIO(1, offset: XAPIC.eoi, size: 4, 0)
        #expect(a.acknowledge(1) == nil && a.deliverable(1) == nil)
        // The ICR's low half reads back as written, its delivery status clear; a load of 1 or 2
        // bytes inside a register gets those bytes (KVM's kvm_lapic_reg_read).
        #expect(a.readMMIO(0, offset: XAPIC.icrLow, size: 4) == 0x71 | 1 << 18)
        #expect(a.readMMIO(1, offset: XAPIC.id + 3, size: 1) == 1 && a.readMMIO(1, offset: XAPIC.id + 2, size: 2) == 1 << 8)
        // Wrong sizes and alignments: nothing sent, nothing changed, loads read 0.
        for (offset, size): (UInt64, UInt64) in [(XAPIC.icrLow, 8), (XAPIC.icrLow + 4, 4), (XAPIC.tpr + 1, 4), (XAPIC.id + 3, 2), (0xFF0, 3)] {
            #expect(try a.writeMMIO(0, offset: offset, size: size, 0x72).isEmpty, "offset \(offset) size \(size)")
            #expect(a.readMMIO(1, offset: offset, size: size) == 0, "offset \(offset) size \(size)")
        }
        #expect(try a.writeMMIO(0, offset: XAPIC.icrLow, size: 1, 0x72).isEmpty, "a 1-byte store sends nothing")
        #expect(a.readMMIO(1, offset: XAPIC.tpr, size: 4) == 0 && a.deliverable(0) == 0x71)
        #expect(throws: LocalAPICs.APICError.illegalVector(0x5)) { try a.writeMMIO(0, offset: XAPIC.icrLow, size: 4, 0x5) }
        #expect(XAPIC.offset(of: L2GPA(0xFEE0_0FFF)) == 0xFFF && XAPIC.offset(of: L2GPA(0xFEE0_1000)) == nil
                && XAPIC.offset(of: L2GPA(0xFEDF_FFFF)) == nil)
    }

    /// The timer in TSC-deadline mode: IA32_TSC_DEADLINE means nothing in another mode; a
    /// deadline passed fires at once, a later one when time reaches it, once; masked, it fires
    /// nothing; leaving the mode disarms it; 0 disarms.
    @Test func theTSCDeadlineTimerFiresOnceWhenItsTimeComes() throws {
        var a = LocalAPICs(count: 2)
        #expect(a.armTSCDeadline(0, 100, now: 200).isEmpty && a.tscDeadline(0) == 0, "masked one-shot mode at reset: ignored")
        _ = try a.writeMSR(0, LocalAPICs.MSR.lvtTimer, 0xEF | UInt64(LVTTimer.tscDeadlineMode))
        #expect(a.readMSR(0, LocalAPICs.MSR.lvtTimer) == 0xEF | UInt64(LVTTimer.tscDeadlineMode))
        #expect(a.armTSCDeadline(0, 100, now: 200) == [D.notify(vcpu: 0)] && a.tscDeadline(0) == 0, "passed: fires at once")
        #expect(a.acknowledge(0) == 0xEF)
        a.endOfInterrupt(0)
        #expect(a.armTSCDeadline(0, 500, now: 200).isEmpty && a.tscDeadline(0) == 500)
        #expect(a.timerTick(0, now: 499).isEmpty)
        #expect(a.timerTick(0, now: 500) == [D.notify(vcpu: 0)] && a.timerTick(0, now: 900).isEmpty, "once")
        #expect(a.acknowledge(0) == 0xEF && a.tscDeadline(1) == 0, "vCPU 1's timer is its own")
        a.endOfInterrupt(0)
        _ = a.armTSCDeadline(0, 1000, now: 0)
        #expect(a.armTSCDeadline(0, 0, now: 0).isEmpty && a.tscDeadline(0) == 0, "0 disarms")
        _ = a.armTSCDeadline(0, 1000, now: 0)
        _ = try a.writeMSR(0, LocalAPICs.MSR.lvtTimer, 0xEF)          // one-shot mode: disarmed
        #expect(a.tscDeadline(0) == 0 && a.timerTick(0, now: .max).isEmpty)
        _ = try a.writeMMIO(0, offset: XAPIC.lvtTimer, size: 4, 0xEF | UInt64(LVTTimer.tscDeadlineMode | LVTTimer.masked))
        #expect(a.readMMIO(0, offset: XAPIC.lvtTimer, size: 4) == 0xEF | UInt64(LVTTimer.tscDeadlineMode | LVTTimer.masked))
        #expect(a.armTSCDeadline(0, 5, now: 10).isEmpty && a.tscDeadline(0) == 0 && a.deliverable(0) == nil, "masked: fires nothing")
        _ = try a.writeMSR(0, LocalAPICs.MSR.lvtTimer, 0x3 | UInt64(LVTTimer.tscDeadlineMode))   // an illegal vector
        #expect(a.armTSCDeadline(0, 5, now: 10).isEmpty && a.deliverable(0) == nil)
        // What L0's loop asks of a halted vCPU: will its timer wake it?
        _ = a.armTSCDeadline(0, 1000, now: 0)
        #expect(a.tscDeadline(0) == 1000 && !a.timerWillInterrupt(0), "an illegal vector wakes nobody")
        _ = try a.writeMSR(0, LocalAPICs.MSR.lvtTimer, 0xEF | UInt64(LVTTimer.tscDeadlineMode | LVTTimer.masked))
        _ = a.armTSCDeadline(0, 1000, now: 0)
        #expect(a.tscDeadline(0) == 1000 && !a.timerWillInterrupt(0), "masked: nor does a masked one")
        _ = try a.writeMSR(0, LocalAPICs.MSR.lvtTimer, 0xEF | UInt64(LVTTimer.tscDeadlineMode))
        _ = a.armTSCDeadline(0, 1000, now: 0)
        #expect(a.timerWillInterrupt(0) && !a.timerWillInterrupt(1))
    }

    @Test func theTPRAndWhatIsInServiceHoldBackLowerClasses() throws {
        var a = LocalAPICs(count: 1)
        _ = try a.writeMSR(0, LocalAPICs.MSR.tpr, 0x50)
        _ = try a.send(from: 0, .fixed(0x51, to: 0))
        #expect(a.deliverable(0) == nil)                                   // class 5 is not above TPR's 5
        _ = try a.send(from: 0, .fixed(0x61, to: 0))
        #expect(a.acknowledge(0) == 0x61)
        _ = try a.writeMSR(0, LocalAPICs.MSR.tpr, 0)
        #expect(a.deliverable(0) == nil)                                   // 0x61 in service holds class 5
        _ = try a.writeMSR(0, LocalAPICs.MSR.eoi, 0)
        #expect(a.acknowledge(0) == 0x51)
    }

    @Test func hltWaitsOnlyWhenNothingIsDeliverable() throws {
        var a = LocalAPICs(count: 2)
        #expect(a.halt(0) && a.state(0) == .halted)
        #expect(try a.send(from: 1, .fixed(0x30, to: 0)) == [D.wake(vcpu: 0)])
        let haltedWithOnePending = a.halt(0)
        #expect(haltedWithOnePending == false)                              // pending: HLT ends at once
        #expect(a.acknowledge(0) == 0x30 && a.halt(0))
    }

    @Test func badIPIsAreRefusedNotDelivered() {
        var a = LocalAPICs(count: 2)
        #expect(throws: LocalAPICs.APICError.illegalVector(3)) { try a.send(from: 0, .fixed(3, to: 1)) }
        #expect(throws: LocalAPICs.APICError.self) { try a.send(from: 0, LocalAPICs.ICR(x2apic: 0x40 | 1 << 11 | 1 << 32)) }
        #expect(throws: LocalAPICs.APICError.self) { try a.send(from: 0, LocalAPICs.ICR(x2apic: 0x40 | 4 << 8 | 1 << 32)) }
        #expect(a.deliverable(1) == nil)
    }

    /// A storm of IPIs between every vCPU in every state, with acknowledgements and EOIs
    /// interleaved: every IPI is taken exactly once by the vCPU it was sent to, unless the same
    /// vector was still pending there (it then coalesces, as on hardware); none is lost.
    @Test func noIPIIsLostOrDuplicatedInAStorm() async {
        _ = await seededCheck(count: 100) { g in
            let n = g.int(2...8)
            var a = LocalAPICs(count: n)
            var pending = [Set<UInt8>](repeating: [], count: n)            // what was sent and not yet taken
            var sent = 0, coalesced = 0, taken = 0
            for _ in 0..<g.int(50...400) {
                let v = g.int(0...(n - 1))
                switch g.below(6) {
                case 0, 1, 2:
                    let to = g.int(0...(n - 1)), vector = UInt8(16 + g.below(240))
                    a.setState(to, g.pick([.running, .halted, .notRunning]))
                    let d = try a.send(from: v, .fixed(vector, to: UInt32(to)))
                    #expect(d.count == 1)
                    sent += 1
                    if pending[to].contains(vector) { coalesced += 1 } else { pending[to].insert(vector) }
                case 3:
                    if let got = a.acknowledge(v) {
                        let sentToIt = pending[v].remove(got) != nil
                        #expect(sentToIt, "vCPU \(v) took \(got), which nobody sent it")
                        taken += 1
                    }
                case 4: a.endOfInterrupt(v)
                default: _ = try a.writeMSR(v, LocalAPICs.MSR.tpr, UInt64(g.below(16)) << 4)
                }
            }
            // Drain: no priority held back, everything taken.
            for v in 0..<n {
                _ = try a.writeMSR(v, LocalAPICs.MSR.tpr, 0)
                for _ in 0..<512 { a.endOfInterrupt(v) }
                while let got = a.acknowledge(v) {
                    let sentToIt = pending[v].remove(got) != nil
                    #expect(sentToIt)
                    taken += 1
                    a.endOfInterrupt(v)
                }
                #expect(pending[v].isEmpty, "vCPU \(v) never took \(pending[v].sorted())")
            }
            #expect(taken == sent - coalesced)
        }
    }

    /// KVM_HC_SEND_IPI's bitmap walk: IDs from `minID`, those past the VM's or past 2^64
    /// skipped, a bad vector stopping it with the APIC's error; and the ID/TPR reads.
    @Test func thePVIPIBitmapAndTheRegisterReads() {
        var a = LocalAPICs(count: 4)
        let all = a.sendPV(from: 0, bitmapLow: 0b1111, bitmapHigh: 1 << 63, minID: 1, icr: 0x40)
        #expect(all.error == nil && all.deliveries == [.notify(vcpu: 1), .notify(vcpu: 2), .notify(vcpu: 3)])
        let wrapped = a.sendPV(from: 0, bitmapLow: ~0, bitmapHigh: ~0, minID: UInt64.max - 1, icr: 0x41)
        #expect(wrapped.error == nil && wrapped.deliveries.isEmpty)
        let bad = a.sendPV(from: 0, bitmapLow: 0b11, bitmapHigh: 0, minID: 0, icr: 0x05)
        #expect(bad.error == .illegalVector(5) && bad.deliveries.isEmpty)
        _ = try? a.writeMSR(2, LocalAPICs.MSR.tpr, 0x30)
        #expect(a.readMSR(2, LocalAPICs.MSR.id) == 2 && a.readMSR(2, LocalAPICs.MSR.tpr) == 0x30 && a.readMSR(2, 0x8FF) == 0)
    }
}
