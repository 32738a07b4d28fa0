import ABI
@testable import L0
import Testing
import Transport

/// VMCS shadowing (nvmx): shadowed fields live in the shadow VMCS between L0's syncs.
@Suite struct VMCSShadowingTests {
    static let allCount = UInt64(NestedVMXBackend.shadowedAllOffsets.count)
    static let rwCount = UInt64(NestedVMXBackend.shadowedReadWriteOffsets.count)

    func shadowActive(_ f: Fixture) throws -> UInt32 {
        try f.control.l1Tables.load(UInt32.self, at: f.layout.shadowVMCSActive(0).raw)
    }

    @Test func theBitmapsLetOnlyShadowedFieldsThrough() throws {
        let f = try Fixture(.nvmx)
        func bit(_ bitmap: ControlOffset, _ field: VMCSField) throws -> Bool {
            let b = UInt64(field.rawValue & 0x7FFF)
            let byte: UInt8 = try f.control.l1Tables.load(at: (bitmap + b / 8).raw)
            return byte & (1 << UInt8(b % 8)) != 0
        }
        for field in ShadowedFields.readWrite {
            #expect(try !bit(f.layout.vmreadBitmap, field), "\(field)")
            #expect(try !bit(f.layout.vmwriteBitmap, field), "\(field)")
        }
        for field in ShadowedFields.readOnly {
            #expect(try !bit(f.layout.vmreadBitmap, field), "\(field)")
            #expect(try bit(f.layout.vmwriteBitmap, field), "\(field)")
        }
        for field in [VMCSField.vmInstructionError, .eptPointer, .hostRIP, .vmEntryControls] {
            #expect(try bit(f.layout.vmreadBitmap, field), "\(field)")
            #expect(try bit(f.layout.vmwriteBitmap, field), "\(field)")
        }
    }

    @Test func afterVMPTRLDTheShadowVMCSHoldsVMCS12sShadowedFields() throws {
        let f = try Fixture(.nvmx)
        try f.enterVMXOperation()
        let v = try f.prepareValidVMCS12()
        v[.vmExitReason] = 12
        v[.guestPhysicalAddress] = 0xABC_D000
        v[.guestCR3] = 0x7000
        #expect(try shadowActive(f) == 0)
        f.vmx(.vmptrld, Plan.vmcs12)
        #expect(f.vmxResult == .succeed)
        let shadow = f.nested.shadowVMCS
        for field in ShadowedFields.readWrite + ShadowedFields.readOnly {
            #expect(shadow[field] == v[field], "\(field)")
        }
        #expect(shadow[.guestRIP] == Plan.guestRIP)
        #expect(shadow[.guestPhysicalAddressHigh] == 0)
        #expect(shadow[.guestCR3] == 0x7000)
        // Fields that are not shadowed are not copied.
        #expect(shadow[.eptPointer] == 0)
        #expect(shadow[.hostRIP] == 0)
        #expect(f.vcpu.counters.shadowVMCSFieldCopies == Self.allCount)
        #expect(try shadowActive(f) == 1)
    }

    @Test func aShadowWriteOfGuestRIPReachesVMCS12AtVMLAUNCHAndVMRESUME() throws {
        let f = try Fixture(.nvmx)
        let v = try f.loadValidVMCS12()
        f.nested.shadowVMCS[.guestRIP] = 0x12_3000   // L1's VMWRITE, not exiting
        #expect(v[.guestRIP] == Plan.guestRIP)
        let copies = f.vcpu.counters.shadowVMCSFieldCopies
        #expect(f.vmx(.vmlaunch) == .enterL2)
        #expect(v[.guestRIP] == 0x12_3000)
        #expect(f.l2Run[register: .rip] == 0x12_3000)
        #expect(f.vcpu.counters.shadowVMCSFieldCopies == copies + Self.rwCount)

        #expect(f.l2CPUID(function: 0) == .resume(.l1))
        f.nested.shadowVMCS[.guestRIP] = 0x12_3002
        #expect(f.vmx(.vmresume) == .enterL2)
        #expect(v[.guestRIP] == 0x12_3002)
        #expect(f.l2Run[register: .rip] == 0x12_3002)
    }

    @Test func aReflectedExitCopiesVMCS12ExitFieldsToTheShadow() throws {
        let f = try Fixture(.nvmx)
        let v = try f.launchL2()
        let copies = f.vcpu.counters.shadowVMCSFieldCopies
        f.l2Run[register: .rip] = 0x1_0040
        f.l2Run[register: .rsp] = 0x7FF0
        #expect(f.l2Exit(L2ExitInfo(reason: .hlt, qualification: 0, instructionLength: 1)) == .resume(.l2))   // not asked for
        #expect(f.l2CPUID(function: 0, length: 2) == .resume(.l1))
        let shadow = f.nested.shadowVMCS
        #expect(v[.vmExitReason] == UInt64(ExitReason.cpuid.rawValue))
        #expect(shadow[.vmExitReason] == UInt64(ExitReason.cpuid.rawValue))
        #expect(shadow[.vmExitInstructionLen] == 2)
        #expect(shadow[.guestRIP] == 0x1_0041)   // HLT was skipped by L0
        #expect(shadow[.guestRSP] == 0x7FF0)
        for field in ShadowedFields.readOnly + ShadowedFields.readWrite {
            #expect(shadow[field] == v[field], "\(field)")
        }
        #expect(f.vcpu.counters.shadowVMCSFieldCopies == copies + Self.allCount)
    }

    @Test func vmclearOfTheCurrentVMCSFoldsTheShadowBackAndDeactivatesIt() throws {
        let f = try Fixture(.nvmx)
        let v = try f.loadValidVMCS12()
        f.nested.shadowVMCS[.guestRSP] = 0x6666
        f.vmx(.vmclear, Plan.vmcs12)
        #expect(v[.guestRSP] == 0x6666)
        #expect(try shadowActive(f) == 0)
    }

    @Test func vmptrldOfAnotherVMCSFoldsTheShadowIntoTheOldOneFirst() throws {
        let f = try Fixture(.nvmx)
        let v = try f.loadValidVMCS12()
        let other = try f.prepareValidVMCS12(at: Plan.otherVMCS)
        other[.guestRIP] = 0x9000
        f.nested.shadowVMCS[.guestRIP] = 0x5555
        f.vmx(.vmptrld, Plan.otherVMCS)
        #expect(f.vmxResult == .succeed)
        #expect(v[.guestRIP] == 0x5555)
        #expect(f.nested.shadowVMCS[.guestRIP] == 0x9000)
        #expect(try shadowActive(f) == 1)
    }

    @Test func withoutShadowingNothingIsCopied() throws {
        let f = try Fixture(.nvmxNoShadow)
        #expect(!f.nested.shadowing)
        let v = try f.loadValidVMCS12()
        #expect(f.nested.shadowVMCS[.guestRIP] == 0)
        #expect(try shadowActive(f) == 0)
        f.nested.shadowVMCS[.guestRIP] = 0x12_3000   // nobody reads it on this path
        #expect(f.vmx(.vmlaunch) == .enterL2)
        #expect(v[.guestRIP] == Plan.guestRIP)
        #expect(f.l2Run[register: .rip] == Plan.guestRIP)
        #expect(f.l2CPUID(function: 0) == .resume(.l1))
        #expect(f.nested.shadowVMCS[.vmExitReason] == 0)
        #expect(v[.vmExitReason] == UInt64(ExitReason.cpuid.rawValue))
        f.vmx(.vmclear, Plan.vmcs12)
        #expect(f.vcpu.counters.shadowVMCSFieldCopies == 0)
    }
}
