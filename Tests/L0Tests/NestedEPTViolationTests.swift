import ABI
@testable import L0
import Testing
import Transport

/// L2 EPT violations on the nvmx paths: L0 walks EPT12 and either fills EPT02 silently or
/// reflects the violation (or a misconfiguration) to L1.
@Suite struct NestedEPTViolationTests {
    static let l2Page: UInt64 = 0x30_0000

    /// A launched L2 whose EPT12 maps L2 [3 MiB, +4 KiB) to L1 `Plan.l2Backing` with `permissions`.
    func launched(_ path: NestingPath, permissions: UInt64 = EPT.rwxMask) throws -> (Fixture, VMCSImage) {
        let f = try Fixture(path)
        try f.writeEPT12Path(gpa: Self.l2Page, leafLevel: 1, leaf: Fixture.eptLeaf(Plan.l2Backing.raw, permissions: permissions))
        let v = try f.launchL2()
        return (f, v)
    }

    func violation(_ gpa: UInt64, _ access: UInt64) -> L2ExitInfo {
        L2ExitInfo(reason: .eptViolation, qualification: access, guestPhysicalAddress: L2GPA(gpa), instructionLength: 3)
    }

    @Test(arguments: [NestingPath.nvmx, .nvmxNoShadow])
    func aViolationEPT12MapsIsFilledInEPT02AndL2Resumes(path: NestingPath) throws {
        let (f, _) = try launched(path)
        f.l2Run[register: .rip] = 0x1_0000
        let before = f.vcpu.counters
        let outcome = f.l2Exit(violation(Self.l2Page + 0x123, EPTViolationQualification.dataWrite))
        #expect(outcome == .resume(.l2))
        #expect(f.vcpu.ept02.translate(L2GPA(Self.l2Page + 0x123), access: EPT.rwxMask)
                == HostOffset(Plan.slotHost.raw + Plan.l2Backing.raw + 0x123))
        #expect(EPT02Entry.host(f.vcpu.ept02.entry(L2GPA(Self.l2Page))) == f.hostOffset(Plan.l2Backing))
        #expect(f.vcpu.counters.ept02Fills == 1)
        #expect(f.vcpu.counters.ept12EntriesWalked - before.ept12EntriesWalked == 4)
        #expect(f.vcpu.counters.totalDeliveries == 0)
        #expect(f.nested.guestMode)
        // L2 retries the access: RIP is not advanced.
        #expect(f.l2Run[register: .rip] == 0x1_0000)
    }

    @Test func aFillThroughALargeEPT12LeafInstallsTheRight4KiBPage() throws {
        let f = try Fixture(.nvmx)
        try f.writeEPT12Path(gpa: 0x20_0000, leafLevel: 2, leaf: Fixture.eptLeaf(0x80_0000, permissions: EPT.read, large: true))
        try f.launchL2()
        #expect(f.l2Exit(violation(0x2F_5008, EPTViolationQualification.dataRead)) == .resume(.l2))
        #expect(f.vcpu.ept02.translate(L2GPA(0x2F_5008)) == HostOffset(Plan.slotHost.raw + 0x8F_5008))
        #expect(f.vcpu.ept02.translate(L2GPA(0x2F_5008), access: EPT.write) == nil)
        #expect(f.vcpu.ept02.translate(L2GPA(0x2F_4000)) == nil)   // one page at a time
    }

    @Test(arguments: [NestingPath.nvmx, .nvmxNoShadow])
    func aViolationEPT12DoesNotMapIsReflectedAsReason48(path: NestingPath) throws {
        let (f, v) = try launched(path)
        f.l2Run[register: .rip] = 0x1_0000
        let gpa = Self.l2Page + 0x10_0000 + 0x18
        let outcome = f.l2Exit(violation(gpa, EPTViolationQualification.dataWrite))
        #expect(outcome == .resume(.l1))
        #expect(v[.vmExitReason] == 48)
        #expect(v[.guestPhysicalAddress] == gpa)
        #expect(v[.exitQualification] & 7 == EPTViolationQualification.dataWrite)
        #expect(v[.exitQualification] >> 3 & 7 == 0)               // nothing was readable
        #expect(v[.guestRIP] == 0x1_0000)
        #expect(f.vcpu.ept02.entry(L2GPA(gpa)) == 0)
        #expect(f.vcpu.counters.ept02Fills == 0)
        #expect(f.vcpu.counters.deliveries[48] == 1)
        #expect(!f.nested.guestMode)
        #expect(f.l1Run[register: .rip] == Plan.hostRIP)
        #expect(f.l1Run[RunPage.enteredByVMExit] == 1)
        if path == .nvmx {
            #expect(f.nested.shadowVMCS[.vmExitReason] == 48)
            #expect(f.nested.shadowVMCS[.guestPhysicalAddress] == gpa)
        }
    }

    @Test func anAccessEPT12DoesNotAllowIsReflectedWithTheWalkedPermissions() throws {
        let (f, v) = try launched(.nvmx, permissions: EPT.read | EPT.execute)
        let outcome = f.l2Exit(violation(Self.l2Page + 8, EPTViolationQualification.dataWrite))
        #expect(outcome == .resume(.l1))
        #expect(v[.vmExitReason] == 48)
        #expect(v[.exitQualification] & 7 == EPTViolationQualification.dataWrite)
        #expect(v[.exitQualification] >> 3 & 7 == EPT.read | EPT.execute)
        #expect(f.vcpu.ept02.entry(L2GPA(Self.l2Page)) == 0)
    }

    @Test func aMisconfiguredEPT12IsReflectedAsReason49() throws {
        let (f, v) = try launched(.nvmx, permissions: EPT.write)
        let outcome = f.l2Exit(violation(Self.l2Page + 8, EPTViolationQualification.dataRead))
        #expect(outcome == .resume(.l1))
        #expect(v[.vmExitReason] == 49)
        #expect(v[.guestPhysicalAddress] == Self.l2Page + 8)
        #expect(f.vcpu.ept02.entry(L2GPA(Self.l2Page)) == 0)
        #expect(f.vcpu.counters.deliveries[49] == 1)
    }

    @Test func afterAReflectedViolationL1FixesEPT12AndTheRetryFillsSilently() throws {
        let (f, v) = try launched(.nvmx)
        let gpa = Self.l2Page + 0x1000
        #expect(f.l2Exit(violation(gpa, EPTViolationQualification.dataRead)) == .resume(.l1))
        try f.writeEPT12Path(gpa: gpa, leafLevel: 1, leaf: Fixture.eptLeaf(Plan.l2Backing.raw + 0x1000))
        f.nested.shadowVMCS[.guestRIP] = v[.guestRIP]
        #expect(f.vmx(.vmresume) == .enterL2)
        #expect(f.l2Exit(violation(gpa, EPTViolationQualification.dataRead)) == .resume(.l2))
        #expect(f.vcpu.ept02.translate(L2GPA(gpa)) == HostOffset(Plan.slotHost.raw + Plan.l2Backing.raw + 0x1000))
        #expect(f.vcpu.counters.deliveries[48] == 1)
    }

    @Test func aNewEPTPAtEntryStartsAFreshEPT02() throws {
        let (f, v) = try launched(.nvmxNoShadow)
        #expect(f.l2Exit(violation(Self.l2Page, EPTViolationQualification.dataRead)) == .resume(.l2))
        #expect(f.l2CPUID(function: 0) == .resume(.l1))
        f.vmwrite(.eptPointer, Plan.eptp | EPT.eptpADEnable)
        #expect(f.vmx(.vmresume) == .enterL2)
        #expect(f.vcpu.ept02.entry(L2GPA(Self.l2Page)) == 0)
        // The same EPTP again keeps EPT02.
        #expect(f.l2Exit(violation(Self.l2Page, EPTViolationQualification.dataRead)) == .resume(.l2))
        #expect(f.l2CPUID(function: 0) == .resume(.l1))
        #expect(f.vmx(.vmresume) == .enterL2)
        #expect(f.vcpu.ept02.entry(L2GPA(Self.l2Page)) != 0)
        #expect(v[.eptPointer] == Plan.eptp | EPT.eptpADEnable)
    }
}
