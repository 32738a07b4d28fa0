import ABI
import Testing

@Suite struct VMCSFieldTests {
    @Test func widthAndKindAreDecodedFromTheEncoding() {
        #expect(VMCSField.guestRIP.width == .natural && VMCSField.guestRIP.kind == .guestState)
        #expect(VMCSField.vmExitReason.width == .bits32 && VMCSField.vmExitReason.kind == .exitInformation)
        #expect(VMCSField.eptPointer.width == .bits64 && VMCSField.eptPointer.kind == .control)
        #expect(VMCSField.hostFSSelector.width == .bits16 && VMCSField.hostFSSelector.kind == .hostState)
        #expect(VMCSField.guestPhysicalAddressHigh.isHighAccess)
        #expect(VMCSField.vmExitReason.isReadOnly && !VMCSField.guestRIP.isReadOnly)
        #expect(!VMCSField(rawValue: 0x1000).isWellFormed && !VMCSField(rawValue: 0x1_0000).isWellFormed)
    }

    @Test func encodingsMatchTheFactsSheet() {
        let expected: [(VMCSField, UInt32)] = [
            (.vmExitReason, 0x4402), (.idtVectoringInfoField, 0x4408), (.vmExitInstructionLen, 0x440C),
            (.exitQualification, 0x6400), (.guestPhysicalAddress, 0x2400), (.guestRIP, 0x681E), (.guestRSP, 0x681C),
            (.guestInterruptibilityInfo, 0x4824), (.eptPointer, 0x201A), (.msrBitmap, 0x2004),
            (.vmInstructionError, 0x4400), (.hostRIP, 0x6C16), (.vmcsLinkPointer, 0x2800),
        ]
        for (f, v) in expected { #expect(f.rawValue == v, "\(f.name)") }
    }

    @Test func everySupportedFieldHasItsOwnSlotInsideTheVMCSPage() {
        var seen = Set<UInt64>()
        for (f, name) in VMCSField.supported {
            let slot = VMCS12Layout.slot(of: f)
            #expect(slot != nil, "\(name)")
            guard let slot else { continue }
            #expect(!slot.high)
            #expect(slot.offset >= VMCS12Layout.firstFieldOffset && slot.offset + 8 <= VMCS12Layout.size, "\(name)")
            #expect(seen.insert(slot.offset).inserted, "\(name) shares a slot")
        }
        #expect(Set(VMCSField.supported.map(\.0.rawValue)).count == VMCSField.supported.count)
    }

    @Test func highAccessSharesTheSlotOfItsSixtyFourBitField() {
        let low = VMCS12Layout.slot(of: .guestPhysicalAddress)!
        let high = VMCS12Layout.slot(of: .guestPhysicalAddressHigh)!
        #expect(low.offset == high.offset && high.high)
        #expect(VMCS12Layout.slot(of: VMCSField(rawValue: 0x681F)) == nil)   // natural width has no high access
        #expect(VMCS12Layout.slot(of: VMCSField(rawValue: 0x7FFE)) == nil)
    }

    @Test func everyShadowedFieldIsSupportedAndReadWriteOnesAreWritable() {
        for f in ShadowedFields.readOnly + ShadowedFields.readWrite {
            #expect(VMCS12Layout.slot(of: f) != nil, "\(f.name)")
        }
        for f in ShadowedFields.readWrite { #expect(!f.isReadOnly, "\(f.name)") }
        #expect(!ShadowedFields.readOnly.contains(.vmInstructionError) && !ShadowedFields.readWrite.contains(.vmInstructionError))
    }
}
