import ABI
@testable import L0
import Testing
import Transport

/// L1's VMX instructions as L0 emulates them: VMsucceed / VMfailInvalid / VMfailValid(n) (SDM 31.2).
@Suite struct VMXInstructionTests {
    static let ud: UInt64 = 1 << 31 | 3 << 8 | 6

    @Test(arguments: [ExitReason.vmptrld, .vmclear, .vmread, .vmwrite, .vmlaunch, .vmresume, .vmxoff, .vmptrst, .invept])
    func aVMXInstructionBeforeVMXONRaisesUDInL1(reason: ExitReason) throws {
        let f = try Fixture(.nvmx)
        f.l1Run[register: .rip] = 0x500
        let outcome = f.vmx(reason, Plan.vmcs12)
        #expect(outcome == .resume(.l1))
        #expect(f.l1Run[RunPage.eventInjection] == Self.ud)
        #expect(f.l1Run[RunPage.eventInjection] & (1 << 31) != 0)
        #expect(f.l1Run[RunPage.eventInjection] & 0xFF == 6)
        // A fault: RIP stays on the instruction, no VMX result is written.
        #expect(f.l1Run[register: .rip] == 0x500)
        #expect(f.vmxResult == nil)
        #expect(f.nested.current == nil)
    }

    @Test func vmxInstructionsOnThePVPathRaiseUD() throws {
        let f = try Fixture(.pv)
        try f.store32(VMCS12Layout.revisionID, Plan.vmxonRegion)
        #expect(f.vmx(.vmxon, Plan.vmxonRegion) == .resume(.l1))
        #expect(f.l1Run[RunPage.eventInjection] == Self.ud)
        // A PV L1 has no VMX state at all: its backend never enters VMX operation.
        #expect(!(f.vcpu.backend is NestedVMXBackend))
    }

    @Test func vmxonSucceedsOnceThenVMfails() throws {
        let f = try Fixture(.nvmx)
        f.l1Run[register: .rip] = 0x500
        try f.enterVMXOperation()
        #expect(f.l1Run[register: .rip] == 0x503)
        #expect(f.nested.vmxon)
        // No current VMCS: VMfailInvalid.
        f.vmx(.vmxon, Plan.vmxonRegion)
        #expect(f.vmxResult == .failInvalid)
        // With a current VMCS: VMfailValid(VMXON executed in VMX root operation).
        try f.prepareValidVMCS12()
        f.vmx(.vmptrld, Plan.vmcs12)
        f.vmx(.vmxon, Plan.vmxonRegion)
        #expect(f.vmxResult == .failValid(.vmxonInVMXRoot))
        #expect(try f.vmcs(at: Plan.vmcs12)[.vmInstructionError] == 15)
    }

    @Test func vmxonWithABadRegionIsVMfailInvalid() throws {
        let f = try Fixture(.nvmx)
        try f.store32(0x1234, Plan.vmxonRegion)
        f.vmx(.vmxon, Plan.vmxonRegion)                          // wrong revision
        #expect(f.vmxResult == .failInvalid)
        try f.store32(VMCS12Layout.revisionID, Plan.vmxonRegion)
        f.vmx(.vmxon, operand: Plan.vmxonRegion.raw + 0x10)      // misaligned
        #expect(f.vmxResult == .failInvalid)
        f.vmx(.vmxon, operand: Plan.slotSize)                     // outside L1 memory
        #expect(f.vmxResult == .failInvalid)
        #expect(!f.nested.vmxon)
    }

    @Test func vmptrldOfABadAddressIsVMfailInvalidWithoutACurrentVMCSAndVMfailValid9WithOne() throws {
        let f = try Fixture(.nvmx)
        try f.enterVMXOperation()
        f.vmx(.vmptrld, operand: Plan.vmcs12.raw + 8)
        #expect(f.vmxResult == .failInvalid)
        f.vmx(.vmptrld, operand: Plan.slotSize)
        #expect(f.vmxResult == .failInvalid)

        let current = try f.prepareValidVMCS12()
        f.vmx(.vmptrld, Plan.vmcs12)
        #expect(f.vmxResult == .succeed)
        f.vmx(.vmptrld, operand: Plan.otherVMCS.raw + 8)
        #expect(f.vmxResult == .failValid(.vmptrldInvalidAddress))
        #expect(current[.vmInstructionError] == 9)
        f.vmx(.vmptrld, operand: Plan.slotSize)
        #expect(f.vmxResult == .failValid(.vmptrldInvalidAddress))
        // The current VMCS did not change.
        #expect(f.nested.current == Plan.vmcs12)
    }

    @Test func vmptrldOfTheVMXONRegionIs10AndOfAWrongRevisionIs11() throws {
        let f = try Fixture(.nvmx)
        try f.loadValidVMCS12()
        f.vmx(.vmptrld, Plan.vmxonRegion)
        #expect(f.vmxResult == .failValid(.vmptrldVMXONPointer))
        try f.store32(0xBAD, Plan.otherVMCS)
        f.vmx(.vmptrld, Plan.otherVMCS)
        #expect(f.vmxResult == .failValid(.vmptrldIncorrectRevision))
        #expect(f.nested.current == Plan.vmcs12)
        // Without a current VMCS the same errors are VMfailInvalid.
        f.vmx(.vmclear, Plan.vmcs12)
        #expect(f.vmxResult == .succeed)
        f.vmx(.vmptrld, Plan.otherVMCS)
        #expect(f.vmxResult == .failInvalid)
        f.vmx(.vmptrld, Plan.vmxonRegion)
        #expect(f.vmxResult == .failInvalid)
    }

    @Test func vmptrstStoresTheCurrentVMCSPointerOrAllOnes() throws {
        let f = try Fixture(.nvmx)
        try f.enterVMXOperation()
        f.vmx(.vmptrst)
        #expect(f.vmxResult == .succeed)
        #expect(f.l1Run[RunPage.vmxOperand] == ~0)
        try f.prepareValidVMCS12()
        f.vmx(.vmptrld, Plan.vmcs12)
        f.vmx(.vmptrst)
        #expect(f.l1Run[RunPage.vmxOperand] == Plan.vmcs12.raw)
    }

    @Test func vmreadAndVMWriteWithoutACurrentVMCSAreVMfailInvalid() throws {
        let f = try Fixture(.nvmx)
        try f.enterVMXOperation()
        #expect(f.vmread(.guestRIP) == 0xBAD0_BAD0_BAD0_BAD0)
        #expect(f.vmxResult == .failInvalid)
        f.vmwrite(.guestRIP, 5)
        #expect(f.vmxResult == .failInvalid)
    }

    @Test func unsupportedOrMalformedFieldsAreVMfailValid12() throws {
        let f = try Fixture(.nvmxNoShadow)
        try f.loadValidVMCS12()
        let unsupported: [UInt64] = [0x7FFE, 0x1000, 0x681E | 0x1000, 0x6C18, 0x0002, 0x8000, 0x1_0000]
        for field in unsupported {
            #expect(VMCS12Layout.slot(of: VMCSField(rawValue: UInt32(truncatingIfNeeded: field))) == nil
                    || !VMCSField(rawValue: UInt32(truncatingIfNeeded: field)).isWellFormed)
            #expect(f.vmread(field) == 0xBAD0_BAD0_BAD0_BAD0, "VMREAD 0x\(String(field, radix: 16))")
            #expect(f.vmxResult == .failValid(.unsupportedVMCSComponent), "VMREAD 0x\(String(field, radix: 16))")
            f.vmwrite(field, 1)
            #expect(f.vmxResult == .failValid(.unsupportedVMCSComponent), "VMWRITE 0x\(String(field, radix: 16))")
        }
        // The high half of a field that is not 64 bits wide does not exist either.
        f.vmwrite(UInt64(VMCSField.guestRIP.rawValue | 1), 1)
        #expect(f.vmxResult == .failValid(.unsupportedVMCSComponent))
    }

    /// In 64-bit mode the field encoding is the whole 64-bit register: bits 63:15 set is no
    /// field at all (KVM: get_vmcs12_field_offset returns -ENOENT when `field >> 15`).
    @Test func aFieldEncodingWithHighRegisterBitsSetIsUnsupported() throws {
        let f = try Fixture(.nvmxNoShadow)
        let v = try f.loadValidVMCS12()
        let field = UInt64(1) << 32 | UInt64(VMCSField.guestRIP.rawValue)
        _ = f.vmread(field)
        do {
            #expect(f.vmxResult == .failValid(.unsupportedVMCSComponent))
        }
        f.vmwrite(field, 0x9999)
        do {
            #expect(f.vmxResult == .failValid(.unsupportedVMCSComponent))
            #expect(v[.guestRIP] == Plan.guestRIP)
        }
    }

    @Test func vmwriteToAReadOnlyFieldIsVMfailValid13() throws {
        let f = try Fixture(.nvmxNoShadow)
        let v = try f.loadValidVMCS12()
        v[.vmExitReason] = 10
        for field in [VMCSField.vmExitReason, .exitQualification, .guestPhysicalAddress, .guestPhysicalAddressHigh,
                      .vmInstructionError, .vmxInstructionInfo, .guestLinearAddress] {
            f.vmwrite(field, 0x55)
            #expect(f.vmxResult == .failValid(.vmwriteReadOnlyComponent), "\(field)")
        }
        #expect(v[.vmExitReason] == 10)
        #expect(v[.vmInstructionError] == 13)
    }

    @Test func vmwriteThenVMReadRoundTripsWithWidthMasking() throws {
        let f = try Fixture(.nvmxNoShadow)
        let v = try f.loadValidVMCS12()
        let cases: [(VMCSField, UInt64, UInt64)] = [
            (.guestCSSelector, 0x1234_5678_9ABC_DEF0, 0xDEF0),                 // 16-bit
            (.vmEntryControls, 0xFFFF_FFFF_0000_1234, 0x1234),                 // 32-bit
            (.tscOffset, 0xFEDC_BA98_7654_3210, 0xFEDC_BA98_7654_3210),        // 64-bit
            (.guestCR3, 0x8000_0000_1234_5000, 0x8000_0000_1234_5000),         // natural width
        ]
        for (field, written, expected) in cases {
            f.vmwrite(field, written)
            #expect(f.vmxResult == .succeed, "\(field)")
            #expect(f.vmread(field) == expected, "\(field)")
            #expect(f.vmxResult == .succeed, "\(field)")
            #expect(v[field] == expected, "\(field)")
        }
        // High access of a 64-bit field: VMWRITE replaces bits 63:32, VMREAD returns them.
        let tscHigh = UInt64(VMCSField.tscOffset.rawValue | 1)
        f.vmwrite(tscHigh, 0xFFFF_FFFF_0000_0042)
        #expect(f.vmxResult == .succeed)
        #expect(v[.tscOffset] == 0x0000_0042_7654_3210)
        #expect(f.vmread(tscHigh) == 0x42)
        // GUEST_PHYSICAL_ADDRESS_HIGH (0x2401) reads bits 63:32 of GUEST_PHYSICAL_ADDRESS.
        v[.guestPhysicalAddress] = 0x1234_5678_9ABC_D000
        #expect(f.vmread(.guestPhysicalAddressHigh) == 0x1234_5678)
        #expect(f.vmread(.guestPhysicalAddress) == 0x1234_5678_9ABC_D000)
        #expect(f.vmxResult == .succeed)
        // KVM's handle_vmwrite: a field outside the shadowed read-write list marks vmcs12 dirty
        // (the next entry rebuilds vmcs02 in full); a hot field such as GUEST_CR3 does not.
        f.nested.vmcs12Dirty = false
        f.vmwrite(.guestCR3, 0x1000)
        #expect(!f.nested.vmcs12Dirty)
        f.vmwrite(.tscOffset, 0x1000)
        #expect(f.nested.vmcs12Dirty)
    }

    @Test func vmreadAndVMWriteUseTheRegistersNamedByTheInstructionInfo() throws {
        let f = try Fixture(.nvmxNoShadow)
        let v = try f.loadValidVMCS12()
        f.l1Run[register: .r9] = UInt64(VMCSField.guestRSP.rawValue)
        f.l1Run[register: .r12] = 0xABCD
        f.vmx(.vmwrite, info: VMXInstructionInfo.make(valueRegister: .r12, fieldRegister: .r9))
        #expect(f.vmxResult == .succeed)
        #expect(v[.guestRSP] == 0xABCD)
        f.l1Run[register: .rbx] = 0
        f.vmx(.vmread, info: VMXInstructionInfo.make(valueRegister: .rbx, fieldRegister: .r9))
        #expect(f.l1Run[register: .rbx] == 0xABCD)
    }

    // MARK: VM entry

    @Test func vmlaunchEntersL2WithVMCS12GuestStateAndL1GPRs() throws {
        let f = try Fixture(.nvmxNoShadow)
        f.l1Run[register: .rbx] = 0xB0B
        f.l1Run[register: .r15] = 0xF15
        let v = try f.launchL2()
        #expect(v.launched)
        #expect(f.vcpu.backend.hasL2VCPU)
        #expect(f.l2Run[register: .rip] == Plan.guestRIP)
        #expect(f.l2Run[register: .rsp] == Plan.guestRSP)
        #expect(f.l2Run[register: .rflags] == 0x2)
        #expect(f.l2Run[register: .rbx] == 0xB0B)
        #expect(f.l2Run[register: .r15] == 0xF15)
        #expect(f.nested.shadowedEPTP == Plan.eptp)
    }

    @Test func vmlaunchOfALaunchedVMCSIs4AndVMResumeOfAClearOneIs5() throws {
        let f = try Fixture(.nvmxNoShadow)
        try f.loadValidVMCS12()
        f.vmx(.vmresume)
        #expect(f.vmxResult == .failValid(.vmresumeNonLaunchedVMCS))
        #expect(f.vmx(.vmlaunch) == .enterL2)
        // L2 exits (CPUID is always L1's), L1 tries VMLAUNCH again.
        #expect(f.l2CPUID(function: 0) == .resume(.l1))
        #expect(f.vmx(.vmlaunch) == .resume(.l1))
        #expect(f.vmxResult == .failValid(.vmlaunchNonClearVMCS))
        #expect(f.vmx(.vmresume) == .enterL2)
    }

    @Test func vmlaunchWithoutACurrentVMCSIsVMfailInvalid() throws {
        let f = try Fixture(.nvmx)
        try f.enterVMXOperation()
        #expect(f.vmx(.vmlaunch) == .resume(.l1))
        #expect(f.vmxResult == .failInvalid)
    }

    @Test func entryWithoutEPTOrWithABadEPTPIsVMfailValid7() throws {
        let badControls: [(String, (VMCSImage) -> Void)] = [
            ("EPT off", { $0[.secondaryVMExecControl] = 0 }),
            ("secondary controls off", { $0[.cpuBasedVMExecControl] = 0 }),
            ("EPTP memory type 2", { $0[.eptPointer] = Plan.ept12Root.raw | 2 | EPT.eptpWalkLength4 }),
            ("EPTP walk length 5", { $0[.eptPointer] = Plan.ept12Root.raw | 6 | 4 << 3 }),
            ("EPTP reserved bit 7", { $0[.eptPointer] = Plan.eptp | 1 << 7 }),
            ("EPT root outside L1 memory", { $0[.eptPointer] = Plan.slotSize | 6 | EPT.eptpWalkLength4 }),
            ("I/O bitmap outside L1 memory", {
                $0[.cpuBasedVMExecControl] |= CPUBased.useIOBitmaps
                $0[.ioBitmapA] = Plan.ioBitmapA.raw
                $0[.ioBitmapB] = Plan.slotSize
            }),
            ("misaligned MSR bitmap", {
                $0[.cpuBasedVMExecControl] |= CPUBased.useMSRBitmaps
                $0[.msrBitmap] = Plan.msrBitmap.raw + 8
            }),
        ]
        for (what, breakIt) in badControls {
            let f = try Fixture(.nvmxNoShadow)
            try f.enterVMXOperation()
            breakIt(try f.prepareValidVMCS12())
            f.vmx(.vmptrld, Plan.vmcs12)
            #expect(f.vmx(.vmlaunch) == .resume(.l1), "\(what)")
            #expect(f.vmxResult == .failValid(.entryInvalidControlField), "\(what)")
            #expect(!f.nested.guestMode, "\(what)")
            #expect(try f.vmcs(at: Plan.vmcs12).launched == false, "\(what)")
        }
    }

    @Test func entryWithABadHostStateIsVMfailValid8() throws {
        let badHost: [(String, (VMCSImage) -> Void)] = [
            ("HOST_CR0.PG clear", { $0[.hostCR0] = Plan.cr0PE }),
            ("HOST_CR0.PE clear", { $0[.hostCR0] = Plan.cr0PG }),
            ("HOST_CR4.PAE clear", { $0[.hostCR4] = 0 }),
            ("host address-space size clear", { $0[.vmExitControls] = 0 }),
            ("non-canonical HOST_RIP", { $0[.hostRIP] = 0x0000_8000_0000_0000 }),
        ]
        for (what, breakIt) in badHost {
            let f = try Fixture(.nvmxNoShadow)
            try f.enterVMXOperation()
            breakIt(try f.prepareValidVMCS12())
            f.vmx(.vmptrld, Plan.vmcs12)
            #expect(f.vmx(.vmlaunch) == .resume(.l1), "\(what)")
            #expect(f.vmxResult == .failValid(.entryInvalidHostStateField), "\(what)")
        }
    }

    @Test func entryWithABadGuestStateIsAnEntryFailureVMExitToHostRIP() throws {
        let badGuest: [(String, (VMCSImage) -> Void)] = [
            ("RFLAGS bit 1 clear", { $0[.guestRFLAGS] = 0 }),
            ("RFLAGS bit 22 set", { $0[.guestRFLAGS] = 0x2 | 1 << 22 }),
            ("IA-32e guest without CR0.PG", { $0[.guestCR0] = Plan.cr0PE }),
            ("IA-32e guest without CR4.PAE", { $0[.guestCR4] = 0 }),
            ("non-canonical GUEST_RIP", { $0[.guestRIP] = 0x1234_0000_0000_0000 }),
        ]
        for path in [NestingPath.nvmx, .nvmxNoShadow] {
            for (what, breakIt) in badGuest {
                let f = try Fixture(path)
                try f.enterVMXOperation()
                breakIt(try f.prepareValidVMCS12())
                f.vmx(.vmptrld, Plan.vmcs12)
                let outcome = f.vmx(.vmlaunch)
                #expect(outcome == .resume(.l1), "\(path) \(what)")
                let v = try f.vmcs(at: Plan.vmcs12)
                #expect(v[.vmExitReason] == 33 | 0x8000_0000, "\(path) \(what)")
                #expect(f.l1Run[RunPage.enteredByVMExit] == 1, "\(path) \(what)")
                #expect(f.l1Run[register: .rip] == Plan.hostRIP, "\(path) \(what)")
                #expect(f.l1Run[register: .rsp] == Plan.hostRSP, "\(path) \(what)")
                #expect(f.l1Run[register: .rflags] == 0x2, "\(path) \(what)")
                #expect(f.vmxResult == .succeed, "\(path) \(what)")
                #expect(!f.nested.guestMode, "\(path) \(what)")
                if path == .nvmx {
                    #expect(f.nested.shadowVMCS[.vmExitReason] == 33 | 0x8000_0000, "\(what)")
                }
            }
        }
    }

    /// SDM VMLAUNCH pseudocode: the launch state becomes "launched" only after guest state and
    /// MSRs loaded; a failed entry leaves it clear (KVM sets launch_state only in prepare_vmcs12
    /// for exits without the failed-entry bit). So L1 can fix the state and VMLAUNCH again.
    @Test func aFailedEntryLeavesTheVMCSClearSoL1CanRelaunch() throws {
        let f = try Fixture(.nvmxNoShadow)
        try f.enterVMXOperation()
        try f.prepareValidVMCS12()[.guestRFLAGS] = 0
        f.vmx(.vmptrld, Plan.vmcs12)
        #expect(f.vmx(.vmlaunch) == .resume(.l1))
        let v = try f.vmcs(at: Plan.vmcs12)
        f.vmwrite(.guestRFLAGS, 0x2)
        do {
            #expect(!v.launched)
            #expect(f.vmx(.vmlaunch) == .enterL2)
        }
    }

    /// A VM entry that fails on guest state never ran L2: L1's general-purpose registers (no
    /// VMCS holds them) are as they were at VMLAUNCH; only RIP/RSP/RFLAGS come from host state.
    @Test func aFailedEntryKeepsL1GeneralPurposeRegisters() throws {
        let f = try Fixture(.nvmxNoShadow)
        try f.enterVMXOperation()
        try f.prepareValidVMCS12()[.guestRFLAGS] = 0
        f.vmx(.vmptrld, Plan.vmcs12)
        for r in Register.gprsOutsideVMCS { f.l1Run[register: r] = 0x1100 + UInt64(r.rawValue) }
        for r in Register.gprsOutsideVMCS { f.l2Run[register: r] = 0xDEAD_0000 + UInt64(r.rawValue) }  // stale L2 state
        #expect(f.vmx(.vmlaunch) == .resume(.l1))
        do {
            for r in Register.gprsOutsideVMCS {
                #expect(f.l1Run[register: r] == 0x1100 + UInt64(r.rawValue), "\(r)")
            }
        }
    }

    /// KVM prepare_vmcs12: "On VM-Exit due to a failed VM-Entry, the VMCS isn't marked launched
    /// and only EXIT_REASON and EXIT_QUALIFICATION are updated, all other exit info fields are
    /// unmodified" (SDM: a failed entry saves no guest state and no other exit information).
    @Test func aFailedEntryUpdatesOnlyTheExitReasonAndQualification() throws {
        let f = try Fixture(.nvmxNoShadow)
        try f.enterVMXOperation()
        let v = try f.prepareValidVMCS12()
        v[.guestRFLAGS] = 0
        let kept: [(VMCSField, UInt64)] = [
            (.guestPhysicalAddress, 0x30_0000), (.guestLinearAddress, 0x7000), (.vmExitInstructionLen, 3),
            (.vmxInstructionInfo, 0x400), (.vmExitIntrInfo, 0x8000_0B0E), (.guestRIP, Plan.guestRIP),
        ]
        for (field, value) in kept { v[field] = value }
        v[.exitQualification] = 0x99
        f.vmx(.vmptrld, Plan.vmcs12)
        #expect(f.vmx(.vmlaunch) == .resume(.l1))
        #expect(v[.vmExitReason] == 33 | 0x8000_0000)
        #expect(v[.exitQualification] == 0)           // ENTRY_FAIL_DEFAULT
        #expect(v[.guestRIP] == Plan.guestRIP)        // no guest state saved
        do {
            for (field, value) in kept { #expect(v[field] == value, "\(field)") }
        }
    }

    @Test func vmclearResetsTheLaunchStateAndReleasesTheCurrentVMCS() throws {
        let f = try Fixture(.nvmxNoShadow)
        let v = try f.launchL2()
        #expect(f.l2CPUID(function: 0) == .resume(.l1))
        #expect(v.launched)
        f.vmx(.vmclear, Plan.vmcs12)
        #expect(f.vmxResult == .succeed)
        #expect(!v.launched)
        #expect(f.nested.current == nil)
        #expect(f.nested.vmcs12 == nil)
        f.vmx(.vmresume)
        #expect(f.vmxResult == .failInvalid)
        f.vmx(.vmptrld, Plan.vmcs12)
        f.vmx(.vmresume)
        #expect(f.vmxResult == .failValid(.vmresumeNonLaunchedVMCS))
        #expect(f.vmx(.vmlaunch) == .enterL2)
    }

    @Test func vmclearOfABadAddressIs2AndOfTheVMXONRegionIs3() throws {
        let f = try Fixture(.nvmx)
        try f.loadValidVMCS12()
        f.vmx(.vmclear, operand: Plan.otherVMCS.raw + 0x80)
        #expect(f.vmxResult == .failValid(.vmclearInvalidAddress))
        f.vmx(.vmclear, operand: Plan.slotSize)
        #expect(f.vmxResult == .failValid(.vmclearInvalidAddress))
        f.vmx(.vmclear, Plan.vmxonRegion)
        #expect(f.vmxResult == .failValid(.vmclearVMXONPointer))
        #expect(f.nested.current == Plan.vmcs12)
        // Clearing a VMCS that is not current leaves the current one alone.
        try f.prepareValidVMCS12(at: Plan.otherVMCS).launched = true
        f.vmx(.vmclear, Plan.otherVMCS)
        #expect(f.vmxResult == .succeed)
        #expect(try !f.vmcs(at: Plan.otherVMCS).launched)
        #expect(f.nested.current == Plan.vmcs12)
    }

    @Test func vmxoffReleasesTheVMCSAndLaterVMXInstructionsRaiseUD() throws {
        let f = try Fixture(.nvmx)
        try f.loadValidVMCS12()
        f.vmx(.vmxoff)
        #expect(f.vmxResult == .succeed)
        #expect(!f.nested.vmxon)
        #expect(f.nested.current == nil)
        f.l1Run[RunPage.eventInjection] = 0
        f.vmx(.vmptrld, Plan.vmcs12)
        #expect(f.l1Run[RunPage.eventInjection] == Self.ud)
    }

    // MARK: INVEPT

    @Test func inveptWithAnUnsupportedTypeIsVMfailValid28() throws {
        let f = try Fixture(.nvmx)
        try f.loadValidVMCS12()
        for type: UInt64 in [0, 3, 1 << 32 | 2] {
            f.l1Run[register: .rax] = type
            f.vmx(.invept, operand: Plan.eptp)
            #expect(f.vmxResult == .failValid(.invalidOperandToINVEPTOrINVVPID), "type \(type)")
        }
    }

    /// L2 touched `gpa` (a walked fill), then L1 changed that page's leaf entry: a store that
    /// trapped (the leaf table was write-protected) and left the leaf unsync.
    func touchedThenRemapped(_ f: Fixture, _ gpa: UInt64, to backing: UInt64) throws {
        try f.writeEPT12Path(gpa: gpa, leafLevel: 1, leaf: Fixture.eptLeaf(Plan.l2Backing.raw))
        #expect(f.l2Exit(L2ExitInfo(reason: .eptViolation, qualification: EPTViolationQualification.dataRead,
                                    guestPhysicalAddress: L2GPA(gpa), instructionLength: 3)) == .resume(.l2))
        #expect(f.vcpu.ept02.translate(L2GPA(gpa)) != nil)
        let entry = L1GPA(Plan.ept12Tables[3].raw + Fixture.eptIndex(gpa, level: 1) * 8)
        f.l1Run[register: .rax] = Fixture.eptLeaf(backing)
        #expect(f.vcpu.handleL1Exit(L1ExitInfo(reason: .eptViolation, qualification: EPTViolationQualification.dataWrite,
                                               guestPhysicalAddress: entry, instructionLength: 3, instructionInfo: 8)) == .resume(.l1))
    }

    /// KVM's INVEPT frees the roots it names but keeps the shadow pages: the unsync leaves are
    /// re-synced, and only EPT02 entries whose EPT12 entry changed go (kvm-nested-work.md 4).
    @Test func inveptSingleContextResyncsOnlyTheShadowedEPTPAndGlobalResyncsEverything() throws {
        let f = try Fixture(.nvmx)
        try f.launchL2()
        let gpa: UInt64 = 0x20_0000
        try touchedThenRemapped(f, gpa, to: Plan.l2Backing.raw + 0x1000)
        f.l1Run[register: .rax] = 1
        f.vmx(.invept, operand: Plan.eptp ^ 0x1000)       // another EPTP: nothing of this root
        #expect(f.vmxResult == .succeed)
        #expect(f.vcpu.ept02.translate(L2GPA(gpa)) != nil && f.vcpu.counters.ept12Resyncs == 0)

        f.l1Run[register: .rax] = 1
        f.vmx(.invept, operand: Plan.eptp)
        #expect(f.vmxResult == .succeed)
        #expect(f.vcpu.ept02.translate(L2GPA(gpa)) == nil)   // its entry changed: dropped
        #expect(f.vcpu.counters.ept12Resyncs == 1 && f.nested.shadows.unsync.isEmpty)

        try touchedThenRemapped(f, gpa + pageSize, to: Plan.l2Backing.raw + 0x3000)
        f.l1Run[register: .rax] = 2
        f.vmx(.invept, operand: 0)
        #expect(f.vmxResult == .succeed)
        #expect(f.vcpu.ept02.translate(L2GPA(gpa + pageSize)) == nil && f.vcpu.counters.ept12Resyncs == 2)
    }

    /// SDM INVEPT: single-context invalidates "mappings associated with EPTP[51:12]": an EPTP
    /// with the same root but other (valid) memory-type or A/D bits names the same context.
    @Test func inveptSingleContextMatchesTheEPTPRootAddress() throws {
        let f = try Fixture(.nvmx)
        try f.launchL2()
        var gpa: UInt64 = 0x30_0000
        for variant in [Plan.eptp | EPT.eptpADEnable, Plan.ept12Root.raw | EPT.memoryTypeUC | EPT.eptpWalkLength4] {
            try touchedThenRemapped(f, gpa, to: Plan.l2Backing.raw + 0x5000)
            f.l1Run[register: .rax] = 1
            f.vmx(.invept, operand: variant)
            #expect(f.vmxResult == .succeed)
            #expect(f.vcpu.ept02.entry(L2GPA(gpa)) == 0, "EPTP 0x\(String(variant, radix: 16))")
            gpa += pageSize
        }
    }

    /// SDM INVEPT: single-context with an EPTP a VM entry would reject is VMfailValid(28).
    @Test func inveptSingleContextWithAnInvalidEPTPIsVMfailValid28() throws {
        let f = try Fixture(.nvmx)
        try f.loadValidVMCS12()
        f.l1Run[register: .rax] = 1
        f.vmx(.invept, operand: Plan.ept12Root.raw | 2 | EPT.eptpWalkLength4)   // memory type 2
        do {
            #expect(f.vmxResult == .failValid(.invalidOperandToINVEPTOrINVVPID))
        }
    }
}
