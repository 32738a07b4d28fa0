import ABI
import Transport

extension L0VCPU {
    /// Emulates one of L1's VMX instructions (KVM: handle_vmxon, handle_vmptrld, handle_vmread, ...).
    func handleVMXInstruction(_ exit: GuestExit) -> L1ExitOutcome {
        l1Run[RunPage.enteredByVMExit] = 0
        if exit.reason != .vmxon, !nested.vmxon {
            injectIntoL1(vector: 6)   // #UD outside VMX operation
            return .resumeL1
        }
        skipL1Instruction(exit)
        let result: VMXInstructionResult
        switch exit.reason {
        case .vmxon: result = vmxon(L1GPA(exit.vmxOperand))
        case .vmxoff: result = vmxoff()
        case .vmclear: result = vmclear(L1GPA(exit.vmxOperand))
        case .vmptrld: result = vmptrld(L1GPA(exit.vmxOperand))
        case .vmptrst:
            l1Run[RunPage.vmxOperand] = nested.current?.raw ?? ~0
            result = .succeed
        case .vmread: result = vmread(exit)
        case .vmwrite: result = vmwrite(exit)
        case .invept:
            let typeRegister = VMXInstructionInfo.typeRegister(exit.instructionInfo) ?? .rax
            result = invept(type: l1Run[register: typeRegister], eptp: exit.vmxOperand)
        case .vmlaunch, .vmresume:
            switch nestedVMEntry(launch: exit.reason == .vmlaunch) {
            case .entered: return .enterL2
            case .failed(let r): result = r
            case .entryFailureExit:
                return .resumeL1   // L1 resumes at HOST_RIP with exit reason 33 | 0x80000000
            }
        default: return .stop(.fatal("\(exit.reason) is not a VMX instruction"))
        }
        setVMXResult(result)
        return .resumeL1
    }

    /// VMsucceed / VMfailInvalid / VMfailValid (SDM 30.2), including VM_INSTRUCTION_ERROR.
    func setVMXResult(_ r: VMXInstructionResult) {
        switch r {
        case .succeed:
            l1Run[RunPage.vmxResult] = 0
        case .failInvalid:
            l1Run[RunPage.vmxResult] = 1
        case .failValid(let e):
            guard let vmcs12 = nested.vmcs12 else { l1Run[RunPage.vmxResult] = 1; return }
            vmcs12[.vmInstructionError] = UInt64(e.rawValue)
            counters.vmcs12FieldWrites += 1
            l1Run[RunPage.vmxResult] = 2
            l1Run[RunPage.vmInstructionError] = UInt64(e.rawValue)
        }
    }

    /// VMfail with `e`: VMfailValid if there is a current VMCS, VMfailInvalid otherwise.
    func vmfail(_ e: VMInstructionError) -> VMXInstructionResult {
        nested.vmcs12 == nil ? .failInvalid : .failValid(e)
    }

    /// A 4 KiB VMX region pointer inside L1 memory, or nil.
    func vmxRegion(_ gpa: L1GPA) -> VMCSImage? {
        guard gpa.isPageAligned, let host = try? l1Memory.memslots.translate(gpa, length: VMCS12Layout.size) else { return nil }
        return try? VMCSImage(region: l1Memory.host.region, base: host.raw)
    }

    func vmxon(_ ptr: L1GPA) -> VMXInstructionResult {
        if nested.vmxon { return vmfail(.vmxonInVMXRoot) }
        guard let region = vmxRegion(ptr), region.revisionID == VMCS12Layout.revisionID else { return .failInvalid }
        nested.vmxon = true
        nested.vmxonPointer = ptr
        return .succeed
    }

    func vmxoff() -> VMXInstructionResult {
        releaseCurrentVMCS()
        nested.vmxon = false
        nested.vmxonPointer = nil
        return .succeed
    }

    func vmclear(_ ptr: L1GPA) -> VMXInstructionResult {
        guard let region = vmxRegion(ptr) else { return vmfail(.vmclearInvalidAddress) }
        if ptr == nested.vmxonPointer { return vmfail(.vmclearVMXONPointer) }
        if ptr == nested.current { releaseCurrentVMCS() }
        region.launched = false
        return .succeed
    }

    func vmptrld(_ ptr: L1GPA) -> VMXInstructionResult {
        guard let region = vmxRegion(ptr) else { return vmfail(.vmptrldInvalidAddress) }
        if ptr == nested.vmxonPointer { return vmfail(.vmptrldVMXONPointer) }
        guard region.revisionID == VMCS12Layout.revisionID else { return vmfail(.vmptrldIncorrectRevision) }
        if ptr != nested.current {
            releaseCurrentVMCS()
            nested.current = ptr
            nested.vmcs12 = region
            nested.vmcs12Dirty = true
            if nested.shadowing {
                copyVMCS12ToShadow()
                nested.setShadowActive(true)
            }
        }
        return .succeed
    }

    /// The current VMCS goes away (VMCLEAR, VMPTRLD of another, VMXOFF): shadow -> vmcs12 first.
    func releaseCurrentVMCS() {
        guard nested.vmcs12 != nil else { return }
        if nested.shadowing {
            copyShadowToVMCS12()
            nested.setShadowActive(false)
        }
        nested.current = nil
        nested.vmcs12 = nil
    }

    /// VMREAD/VMWRITE's operands: the field (whole 64-bit register: KVM refuses any bit above
    /// 14) and the value register. A VMfail result if they are unusable.
    enum FieldOperands {
        case usable(VMCSImage, VMCSField, valueRegister: Register)
        case fail(VMXInstructionResult)
    }

    func fieldOperands(_ exit: GuestExit) -> FieldOperands {
        guard let vmcs12 = nested.vmcs12 else { return .fail(.failInvalid) }
        guard let fieldReg = VMXInstructionInfo.fieldRegister(exit.instructionInfo),
              let valueReg = VMXInstructionInfo.valueRegister(exit.instructionInfo) else { return .fail(vmfail(.unsupportedVMCSComponent)) }
        let raw = l1Run[register: fieldReg]
        let field = VMCSField(rawValue: UInt32(truncatingIfNeeded: raw))
        guard raw >> 15 == 0, field.isWellFormed, VMCS12Layout.slot(of: field) != nil else {
            return .fail(vmfail(.unsupportedVMCSComponent))
        }
        return .usable(vmcs12, field, valueRegister: valueReg)
    }

    func vmread(_ exit: GuestExit) -> VMXInstructionResult {
        switch fieldOperands(exit) {
        case .fail(let r): return r
        case let .usable(vmcs12, field, valueReg):
            l1Run[register: valueReg] = vmcs12[field]
            counters.vmcs12FieldReads += 1
            return .succeed
        }
    }

    func vmwrite(_ exit: GuestExit) -> VMXInstructionResult {
        switch fieldOperands(exit) {
        case .fail(let r): return r
        case let .usable(vmcs12, field, valueReg):
            if field.isReadOnly { return vmfail(.vmwriteReadOnlyComponent) }
            vmcs12.write(field, l1Run[register: valueReg])
            counters.vmcs12FieldWrites += 1
            // KVM: a VMWRITE that exits dirties vmcs12, forcing the full vmcs02 rebuild.
            nested.vmcs12Dirty = true
            return .succeed
        }
    }

    /// INVEPT: type 1 single-context (the EPTP's root, bits 51:12), 2 global. Drops the EPT02
    /// shadow it names. A single-context EPTP VM entry would refuse is an invalid operand.
    func invept(type: UInt64, eptp: UInt64) -> VMXInstructionResult {
        switch type {
        case 1:
            guard eptpIsValid(eptp) else { return vmfail(.invalidOperandToINVEPTOrINVVPID) }
            if let shadowed = nested.shadowedEPTP, shadowed & EPT.addressMask == eptp & EPT.addressMask { dropEPT02Shadows() }
        case 2:
            dropEPT02Shadows()
        default:
            return vmfail(.invalidOperandToINVEPTOrINVVPID)
        }
        return .succeed
    }

    // MARK: shadow VMCS synchronisation (KVM: copy_shadow_to_vmcs12 / copy_vmcs12_to_shadow)

    func copyShadowToVMCS12() {
        guard let vmcs12 = nested.vmcs12 else { return }
        nested.shadowVMCS.copySlots(NestedVMXState.shadowedReadWriteOffsets, to: vmcs12)
        counters.shadowVMCSFieldCopies += UInt64(NestedVMXState.shadowedReadWriteOffsets.count)
    }

    func copyVMCS12ToShadow() {
        guard let vmcs12 = nested.vmcs12 else { return }
        vmcs12.copySlots(NestedVMXState.shadowedAllOffsets, to: nested.shadowVMCS)
        counters.shadowVMCSFieldCopies += UInt64(NestedVMXState.shadowedAllOffsets.count)
    }
}
