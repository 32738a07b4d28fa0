import ABI
import PropertyBased
import Testing
import Transport
@testable import L0

/// PV ABI v1 (docs/abi.md): discovery, batches, MSR policy, L0 ports, and how L2 exits are routed.
@Suite struct PVNegotiationTests {
    @Test func versionAndFeaturesAreReadableBeforeNegotiation() throws {
        let f = try Fixture(.pv, negotiating: nil)
        #expect(f.hypercall(.getVersion).rax == PVABIVersion.current.packed)
        #expect(f.hypercall(.getFeatures).rax == PVFeatures.all.rawValue)
        #expect(f.hypercall(.mapGPARange, 0, 0, pageSize, PVMapFlags.rwx).rax == HypercallError.permission.returnValue)
    }

    @Test func aMajorVersionMismatchIsRefusedNamingBothVersions() throws {
        let f = try Fixture(.pv, negotiating: nil)
        #expect(f.negotiate(.all, version: PVABIVersion(major: 2, minor: 0)) == HypercallError.notSupported.returnValue)
        #expect(f.pv.refusal == .majorVersion(l1: PVABIVersion(major: 2, minor: 0), l0: .current))
        #expect("\(f.pv.refusal!)".contains("2.0") && "\(f.pv.refusal!)".contains("1.0"))
        #expect(!f.pv.negotiated)
        // A higher minor of the same major is fine.
        #expect(f.negotiate(.all, version: PVABIVersion(major: 1, minor: 7)) == 0)
    }

    @Test func unknownFeatureBitsAreRefusedNotIgnored() throws {
        let f = try Fixture(.pv, negotiating: nil)
        let r = f.hypercall(.negotiate, PVABIVersion.current.packed, PVFeatures.all.rawValue | 1 << 40, Plan.argumentPage.raw).rax
        #expect(r == HypercallError.invalid.returnValue)
        #expect(!f.pv.negotiated && f.pv.enabled.isEmpty)
    }

    @Test func aFeatureL0DoesNotOfferIsRefused() throws {
        let f = try Fixture(.pv, negotiating: nil)
        f.pv.offered = PVFeatures.all.subtracting(.batchMap)
        #expect(f.negotiate(.all) == HypercallError.notSupported.returnValue)
        #expect(f.negotiate(PVFeatures.all.subtracting(.batchMap)) == 0)
    }

    @Test func theArgumentPageMustBeAnAlignedPageOfL1Memory() throws {
        let f = try Fixture(.pv, negotiating: nil)
        #expect(f.negotiate(.all, argumentPage: L1GPA(Plan.argumentPage.raw + 8)) == HypercallError.invalid.returnValue)
        #expect(f.negotiate(.all, argumentPage: L1GPA(Plan.slotSize)) == HypercallError.fault.returnValue)
        #expect(f.negotiate(.all) == 0)
        #expect(f.negotiate(.all) == HypercallError.invalid.returnValue)   // once only
    }

    @Test func aHypercallOfADisabledFeatureIsNotSupported() throws {
        let f = try Fixture(.pv, negotiating: [.directCPUID])
        #expect(f.hypercall(.mapGPABatch, 1).rax == HypercallError.notSupported.returnValue)
        #expect(f.hypercall(.setMSRPolicy, 0).rax == HypercallError.notSupported.returnValue)
        #expect(f.hypercall(.registerL0Ports, 0x4D0, 1, 1).rax == HypercallError.notSupported.returnValue)
    }
}

@Suite struct PVBatchMapTests {
    func writeBatch(_ f: Fixture, _ entries: [(UInt64, UInt64, UInt64, UInt64)]) throws {
        for (i, e) in entries.enumerated() {
            let base = Plan.argumentPage.raw + UInt64(i) * PVMapBatchEntry.size
            try f.store64(e.0, L1GPA(base + PVMapBatchEntry.l2GPA))
            try f.store64(e.1, L1GPA(base + PVMapBatchEntry.l1GPA))
            try f.store64(e.2, L1GPA(base + PVMapBatchEntry.length))
            try f.store64(e.3, L1GPA(base + PVMapBatchEntry.flags))
        }
    }

    @Test func aBatchMapsEveryRange() throws {
        let f = try Fixture(.pv)
        try writeBatch(f, [(0x1000, 0x40_0000, 0x1000, PVMapFlags.rwx), (0x8000, 0x50_0000, 0x2000, PVMapFlags.read)])
        #expect(f.hypercall(.mapGPABatch, 2).rax == 0)
        #expect(f.vcpu.ept02.translate(L2GPA(0x1234)) == HostOffset(Plan.slotHost.raw + 0x40_0234))
        #expect(f.vcpu.ept02.translate(L2GPA(0x9000)) == HostOffset(Plan.slotHost.raw + 0x50_1000))
        #expect(f.vcpu.ept02.translate(L2GPA(0x9000), access: EPT.write) == nil)
    }

    @Test func oneBadEntryLeavesEverythingAsItWas() throws {
        let f = try Fixture(.pv)
        let before = try f.ept02Snapshot()
        try writeBatch(f, [(0x1000, 0x40_0000, 0x1000, PVMapFlags.rwx), (0x8000, Plan.slotSize, 0x1000, PVMapFlags.rwx)])
        #expect(f.hypercall(.mapGPABatch, 2).rax == HypercallError.fault.returnValue)
        #expect(try f.ept02Snapshot() == before && f.pv.map.mappings.isEmpty)
    }

    @Test func entriesThatOverlapEachOtherAreRefused() throws {
        let f = try Fixture(.pv)
        try writeBatch(f, [(0x1000, 0x40_0000, 0x2000, PVMapFlags.rwx), (0x2000, 0x50_0000, 0x1000, PVMapFlags.rwx)])
        #expect(f.hypercall(.mapGPABatch, 2).rax == HypercallError.invalid.returnValue)
        #expect(f.pv.map.mappings.isEmpty)
    }

    @Test func aBatchLargerThanTheArgumentPageIsTooBigAndAnEmptyOneInvalid() throws {
        let f = try Fixture(.pv)
        #expect(f.hypercall(.mapGPABatch, PVMapBatchEntry.maxPerCall + 1).rax == HypercallError.tooBig.returnValue)
        #expect(f.hypercall(.mapGPABatch, 0).rax == HypercallError.invalid.returnValue)
    }
}

@Suite struct PVMSRPolicyTests {
    func writePolicies(_ f: Fixture, _ p: [(UInt32, UInt32, UInt64, UInt64)]) throws {
        for (i, e) in p.enumerated() {
            let base = Plan.argumentPage.raw + UInt64(i) * PVMSRPolicyEntry.size
            try f.store64(UInt64(e.0) | UInt64(e.1) << 32, L1GPA(base + PVMSRPolicyEntry.index))
            try f.store64(e.2, L1GPA(base + PVMSRPolicyEntry.value))
            try f.store64(e.3, L1GPA(base + PVMSRPolicyEntry.writableMask))
        }
    }

    func l2MSR(_ f: Fixture, write: Bool, _ msr: UInt32, _ value: UInt64 = 0) -> NextStep {
        f.l2Run[register: .rcx] = UInt64(msr)
        f.l2Run[register: .rax] = value & 0xFFFF_FFFF
        f.l2Run[register: .rdx] = value >> 32
        f.l2Run[register: .rip] = 0x1000
        f.l2Run[RunPage.eventInjection] = 0
        return f.l2Exit(L2ExitInfo(reason: write ? .msrWrite : .msrRead, instructionLength: 2))
    }

    @Test func anEmulatedMSRIsReadAndWrittenInL0WithinItsWritableMask() throws {
        let f = try Fixture(.pv)
        try writePolicies(f, [(0x3B, PVMSRAction.emulate.rawValue, 0x1_0000_0005, 0xFFFF)])
        #expect(f.hypercall(.setMSRPolicy, 1).rax == 0)
        #expect(l2MSR(f, write: false, 0x3B) == .resume(.l2))
        #expect(f.l2Run[register: .rax] == 5 && f.l2Run[register: .rdx] == 1 && f.l2Run[register: .rip] == 0x1002)
        #expect(l2MSR(f, write: true, 0x3B, 0x1_0000_1234) == .resume(.l2))       // only writable bits change
        #expect(f.vcpu.l0MSRs[0x3B] == 0x1_0000_1234)
        #expect(l2MSR(f, write: true, 0x3B, 0x2_0000_0000) == .resume(.l2))       // a read-only bit: #GP
        #expect(f.l2Run[RunPage.eventInjection] & 0x8000_0FFF == 0x8000_0B0D)  // valid, error code, hw exception, 13
        #expect(f.l2Run[register: .rip] == 0x1000 && f.vcpu.l0MSRs[0x3B] == 0x1_0000_1234)
        #expect(f.vcpu.counters.totalDeliveries == 0)
    }

    @Test func passToL1AndUnknownMSRsAreDeliveredAndInjectGPFaults() throws {
        let f = try Fixture(.pv)
        _ = f.hypercall(.createVCPU, Plan.exitPage.raw)
        try writePolicies(f, [(0x1A0, PVMSRAction.passToL1.rawValue, 0, 0), (0x99, PVMSRAction.injectGP.rawValue, 0, 0)])
        #expect(f.hypercall(.setMSRPolicy, 2).rax == 0)
        #expect(l2MSR(f, write: false, 0x1A0) == .resume(.l1))
        #expect(l2MSR(f, write: false, 0x1B) == .resume(.l1))                 // no policy
        #expect(l2MSR(f, write: false, 0x99) == .resume(.l2))
        #expect(f.l2Run[RunPage.eventInjection] & 0xFF == 13)
    }

    @Test func anUnknownActionIsRefusedAndLeavesPoliciesAlone() throws {
        let f = try Fixture(.pv)
        try writePolicies(f, [(0x3B, PVMSRAction.emulate.rawValue, 0, ~0), (0x10, 7, 0, 0)])
        #expect(f.hypercall(.setMSRPolicy, 2).rax == HypercallError.invalid.returnValue)
        #expect(f.pv.msrPolicy.isEmpty)
        #expect(f.hypercall(.setMSRPolicy, PVMSRPolicyEntry.maxPerCall + 1).rax == HypercallError.tooBig.returnValue)
    }

    @Test func l1ReadsEmulatedValuesBackInOneCallAndRestoresThem() throws {
        let f = try Fixture(.pv)
        try writePolicies(f, [(0x3B, PVMSRAction.emulate.rawValue, 77, ~0), (0x1A0, PVMSRAction.passToL1.rawValue, 0, 0)])
        _ = f.hypercall(.setMSRPolicy, 2)
        // kvm_msr_entry[] { 0x3B, 0x1A0 }: the first is L0's, the second is not, so one is filled.
        try f.store64(0x3B, L1GPA(Plan.argumentPage.raw + KVMMSREntry.index))
        try f.store64(0x1A0, L1GPA(Plan.argumentPage.raw + KVMMSREntry.size + KVMMSREntry.index))
        #expect(f.hypercall(.getMSRs, 2).rax == 1)
        #expect(try f.vcpu.l1Memory.load64(L1GPA(Plan.argumentPage.raw + KVMMSREntry.data)) == 77)
        try f.store64(99, L1GPA(Plan.argumentPage.raw + KVMMSREntry.data))
        #expect(f.hypercall(.setMSRs, 1).rax == 1)
        #expect(f.vcpu.l0MSRs[0x3B] == 99)
        #expect(f.hypercall(.getMSRs, KVMMSREntry.maxPerCall + 1).rax == HypercallError.tooBig.returnValue)
    }
}

@Suite struct PVPortTests {
    func l2Port(_ f: Fixture, _ port: UInt16, isIn: Bool, value: UInt64 = 0) -> NextStep {
        f.l2Run[register: .rax] = value
        return f.l2Exit(L2ExitInfo(reason: .ioInstruction, qualification: IOQualification.make(port: port, size: 4, isIn: isIn), instructionLength: 1))
    }

    @Test func portsHandedToL0AreCompletedThereAndOthersGoToL1() throws {
        let f = try Fixture(.pv)
        _ = f.hypercall(.createVCPU, Plan.exitPage.raw)
        #expect(f.hypercall(.registerL0Ports, 0x4D0, 2, PVL0Device.latch.rawValue).rax == 0)
        #expect(l2Port(f, 0x4D0, isIn: false, value: 0xCAFE) == .resume(.l2))
        #expect(l2Port(f, 0x4D0, isIn: true) == .resume(.l2) && f.l2Run[register: .rax] == 0xCAFE)
        #expect(l2Port(f, 0x3F8, isIn: false, value: 0x41) == .resume(.l1))
    }

    @Test func badPortRangesAreRefused() throws {
        let f = try Fixture(.pv)
        #expect(f.hypercall(.registerL0Ports, 0x4D0, 0, 1).rax == HypercallError.invalid.returnValue)        // empty
        #expect(f.hypercall(.registerL0Ports, 0xFFFF, 2, 1).rax == HypercallError.invalid.returnValue)      // past 0xFFFF
        #expect(f.hypercall(.registerL0Ports, 0x0FFF, 2, 1).rax == HypercallError.invalid.returnValue)      // covers ucall
        #expect(f.hypercall(.registerL0Ports, 0x4D0, 1, 9).rax == HypercallError.invalid.returnValue)       // unknown device
        #expect(f.hypercall(.registerL0Ports, 0x4D0, 2, 1).rax == 0)
        #expect(f.hypercall(.registerL0Ports, 0x4D1, 1, 1).rax == HypercallError.invalid.returnValue)       // overlap
    }
}

@Suite struct PVPermissionFaultTests {
    @Test func aPermissionFaultTellsL1TheAccessAndWhatTheMappingAllows() throws {
        let f = try Fixture(.pv)
        _ = f.hypercall(.createVCPU, Plan.exitPage.raw)
        #expect(f.map(l2: 0x30_0000, l1: 0x40_0000, length: pageSize, flags: PVMapFlags.read | PVMapFlags.execute) == 0)
        let outcome = f.l2Exit(L2ExitInfo(reason: .eptViolation, qualification: EPTViolationQualification.dataWrite,
                                         guestPhysicalAddress: L2GPA(0x30_0010), instructionLength: 3))
        #expect(outcome == .resume(.l1))
        let page = try f.runPage(at: Plan.exitPage)
        #expect(page.exitReason == .eptViolation && page[RunPage.guestPhysicalAddress] == 0x30_0010)
        #expect(page[RunPage.exitQualification] == EPTViolationQualification.dataWrite | (EPT.read | EPT.execute) << 3)
        // Not mapped at all: rights 0.
        _ = f.l2Exit(L2ExitInfo(reason: .eptViolation, qualification: EPTViolationQualification.dataRead, guestPhysicalAddress: L2GPA(0x90_0000)))
        #expect(page[RunPage.exitQualification] == EPTViolationQualification.dataRead)
    }
}

/// Random hypercall sequences, random arguments, every number (valid or not): L0 never crashes,
/// never maps outside L1 memory, and EPT02 is exactly what the PV map says.
@Suite struct PVRandomHypercallTests {
    static let pages: UInt64 = 64     // a small L2/L1 window so ranges collide often

    @Test func randomHypercallsKeepEPT02ExactlyTheMapAndInsideL1Memory() async {
        let step = zip(Gen.int(in: 0...14), Gen.int(in: 0...Int(Self.pages)), Gen.int(in: 0...Int(Self.pages)),
                       Gen.int(in: 0...5), Gen.int(in: 0...15))
        await propertyCheck(count: 150, input: step.array(of: 1...30)) { steps in
            guard let f = try? Fixture(.pv) else { Issue.record("fixture"); return }
            for (c, a, b, n, flags) in steps {
                // Page-aligned most of the time, sometimes off by a few bytes or at the slot's end.
                let l2 = UInt64(a) * pageSize + (n == 5 ? 8 : 0)
                let l1 = n == 4 ? Plan.slotSize - pageSize : UInt64(b) * pageSize
                let len = UInt64(n) * pageSize
                switch c {
                case 0...13:
                    let nr = PVHypercall.base + UInt64(c)
                    if nr == PVHypercall.mapGPABatch.rawValue {
                        for i in 0..<UInt64(n) {
                            let base = Plan.argumentPage.raw + i * PVMapBatchEntry.size
                            try? f.store64(l2 + i * 2 * pageSize, L1GPA(base + PVMapBatchEntry.l2GPA))
                            try? f.store64(l1, L1GPA(base + PVMapBatchEntry.l1GPA))
                            try? f.store64(pageSize, L1GPA(base + PVMapBatchEntry.length))
                            try? f.store64(UInt64(flags), L1GPA(base + PVMapBatchEntry.flags))
                        }
                        _ = f.hypercall(nr, UInt64(n))
                    } else {
                        _ = f.hypercall(nr, l2, l1, len, UInt64(flags))
                    }
                default:
                    _ = f.hypercall(UInt64(a) << 20 | UInt64(b), l2, l1, len)       // anything at all
                }
            }
            // EPT02 <-> map, both ways, over the window (plus a little beyond).
            for p in 0..<(Self.pages * 3) {
                let gpa = L2GPA(p * pageSize)
                let entry = f.vcpu.ept02.entry(gpa)
                if let m = f.pv.map.lookup(gpa) {
                    let l1 = m.l1Address(for: gpa)!
                    let expected = try? f.vcpu.l1Memory.memslots.translate(l1, length: pageSize)
                    #expect(expected != nil, "map points outside L1 memory at \(gpa)")
                    #expect(EPT02Entry.isPresent(entry, generation: f.vcpu.ept02.generation) && EPT02Entry.host(entry) == expected && entry & EPT.rwxMask == m.permissions,
                            "EPT02 disagrees with the map at \(gpa)")
                    let host = EPT02Entry.host(entry).raw
                    #expect(host >= Plan.slotHost.raw && host + pageSize <= Plan.slotHost.raw + Plan.slotSize)
                    #expect(m.permissions & EPT.write == 0 || m.permissions & EPT.read != 0)
                } else {
                    #expect(!EPT02Entry.isPresent(entry, generation: f.vcpu.ept02.generation), "EPT02 maps \(gpa), which the map does not")
                }
            }
        }
    }
}

@Suite struct PVProtectedStateTests {
    @Test func aPVNestedL2IsRefusedInsideAProtectedStateL1AndL0SaysWhy() throws {
        let f = try Fixture(.pv)
        f.vcpu.vm = VMHandle(id: 1, type: .tdx)
        #expect(f.hypercall(.createVCPU, Plan.exitPage.raw).rax == HypercallError.permission.returnValue)
        if case .host(.pvNestingRefused) = f.pv.refusal {} else { Issue.record("refusal: \(String(describing: f.pv.refusal))") }
        #expect("\(f.pv.refusal!)".contains("protected state") && "\(f.pv.refusal!)".contains("TCB"))   // what pvm launch prints
        #expect(!f.pv.vcpuCreated && !f.vcpu.backend.hasL2VCPU)
    }

    @Test func privateMemoryAloneDoesNotStopPVNesting() throws {
        let f = try Fixture(.pv)
        f.vcpu.vm = VMHandle(id: 1, type: .swProtected)
        #expect(f.hypercall(.createVCPU, Plan.exitPage.raw).rax == 0)
    }
}
