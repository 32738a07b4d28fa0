import ABI
import Transport

/// The L1-exit side of nested VMX: L1's VMX instructions (KVM: handle_vmxon, handle_vmptrld,
/// handle_vmread, ...), its trapped stores to shadowed EPT12 pages, its MSRs. VMLAUNCH and
/// VMRESUME continue in NestedEntry.swift.
extension NestedVMXBackend {
    public func handleL1Exit(_ exit: L1Exit, _ regs: inout RegisterFile, _ vcpu: L0VCPU) -> NextStep {
        switch exit.kind {
        case .vmx(let instruction):
            return handleVMXInstruction(instruction, exit, &regs, vcpu)
        case .hypercall(let nr, _):
            return vcpu.refuseHypercall(nr, exit, &regs)
        case let .msrWrite(msr, v) where msr == VPAssistPage.msr:
            // How L1 names its eVMCS: remembered once L0 accepts the write.
            if vcpu.acceptsL1MSRWrite(msr, v) { vpAssistPage = v & VPAssistPage.enable != 0 ? L1GPA(v).pageBase : nil }
            return vcpu.handleL1MSR(exit, &regs)
        // L1's own local APIC: L0 runs it.
        case let .msrWrite(msr, value) where L0VCPU.isX2APICMSR(msr):
            return vcpu.handleAPICMSR(msr, writing: value, length: exit.info.instructionLength, &regs, resuming: .l1)
        case let .msrRead(msr) where L0VCPU.isX2APICMSR(msr):
            return vcpu.handleAPICMSR(msr, writing: nil, length: exit.info.instructionLength, &regs, resuming: .l1)
        case let .msrWrite(LocalAPICMSR.tscDeadline, value):
            return vcpu.handleTSCDeadlineMSR(writing: value, length: exit.info.instructionLength, &regs, resuming: .l1)
        case .msrRead(LocalAPICMSR.tscDeadline):
            return vcpu.handleTSCDeadlineMSR(writing: nil, length: exit.info.instructionLength, &regs, resuming: .l1)
        case .msrRead, .msrWrite:
            return vcpu.handleL1MSR(exit, &regs)
        case .other where exit.info.reason == .hlt:
            return vcpu.handleL1Halt(exit, &regs)
        case let .protectedStore(gpa, size, value):
            return handleProtectedStore(gpa, size: size, value: value, exit, &regs, vcpu)
        case .other:
            return .stop(.fatal(.unhandledL1Exit(exit.info.reason)))
        }
    }

    func handleVMXInstruction(_ instruction: VMXInstruction, _ exit: L1Exit, _ regs: inout RegisterFile, _ vcpu: L0VCPU) -> NextStep {
        vcpu.l1Run[RunPage.enteredByVMExit] = 0
        if case .vmxon = instruction {
            // In a TDX L1 there is no VMX to turn on: #UD, as the hardware gives it, and the
            // reason for `pvm launch` to print.
            do { try vcpu.vm.checkMayRunNestedVMX() } catch {
                refusal = .host(error)
                vcpu.inject(into: .l1, vector: 6)
                return .resume(.l1)
            }
        } else if !vmxon {
            vcpu.inject(into: .l1, vector: 6)   // #UD outside VMX operation
            return .resume(.l1)
        }
        regs.skipInstruction(length: exit.info.instructionLength)
        let result: VMXInstructionResult
        switch instruction {
        case .vmxon(let ptr): result = vmxon(ptr, vcpu)
        case .vmxoff: result = vmxoff(vcpu)
        case .vmclear(let ptr): result = vmclear(ptr, vcpu)
        case .vmptrld(let ptr): result = vmptrld(ptr, vcpu)
        case .vmptrst:
            vcpu.l1Run[RunPage.vmxOperand] = current?.raw ?? ~0
            result = .succeed
        case .vmread(let ops): result = vmread(ops, &regs, vcpu)
        case let .vmwrite(ops, value): result = vmwrite(ops, value: value, vcpu)
        case let .invept(type, eptp): result = invept(type: type, eptp: eptp, vcpu)
        case .vmlaunch, .vmresume:
            switch nestedVMEntry(launch: instruction == .vmlaunch, &regs, vcpu) {
            case .entered: return .enterL2
            case .failed(let r): result = r
            case .entryFailureExit:
                return .resume(.l1)   // L1 resumes at HOST_RIP with exit reason 33 | 0x80000000
            }
        }
        setVMXResult(result, vcpu)
        return .resume(.l1)
    }

    /// VMsucceed / VMfailInvalid / VMfailValid (SDM 30.2), including VM_INSTRUCTION_ERROR.
    func setVMXResult(_ r: VMXInstructionResult, _ vcpu: L0VCPU) {
        switch r {
        case .succeed:
            vcpu.l1Run[RunPage.vmxResult] = 0
        case .failInvalid:
            vcpu.l1Run[RunPage.vmxResult] = 1
        case .failValid(let e):
            guard let vmcs12 else { vcpu.l1Run[RunPage.vmxResult] = 1; return }
            vmcs12[.vmInstructionError] = UInt64(e.rawValue)
            vcpu.counters.vmcs12FieldWrites += 1
            vcpu.l1Run[RunPage.vmxResult] = 2
            vcpu.l1Run[RunPage.vmInstructionError] = UInt64(e.rawValue)
        }
    }

    /// VMfail with `e`: VMfailValid if there is a current VMCS, VMfailInvalid otherwise.
    func vmfail(_ e: VMInstructionError) -> VMXInstructionResult {
        vmcs12 == nil ? .failInvalid : .failValid(e)
    }

    /// A 4 KiB VMX region pointer inside L1 memory, or nil.
    func vmxRegion(_ gpa: L1GPA, _ vcpu: L0VCPU) -> VMCSImage? {
        guard gpa.isPageAligned else { return nil }
        return try? vcpu.l1Memory.vmcs(at: gpa)
    }

    func vmxon(_ ptr: L1GPA, _ vcpu: L0VCPU) -> VMXInstructionResult {
        if vmxon { return vmfail(.vmxonInVMXRoot) }
        guard let region = vmxRegion(ptr, vcpu), region.revisionID == VMCS12Layout.revisionID else { return .failInvalid }
        vmxon = true
        vmxonPointer = ptr
        return .succeed
    }

    func vmxoff(_ vcpu: L0VCPU) -> VMXInstructionResult {
        releaseCurrentVMCS(vcpu)
        vmxon = false
        vmxonPointer = nil
        return .succeed
    }

    func vmclear(_ ptr: L1GPA, _ vcpu: L0VCPU) -> VMXInstructionResult {
        guard let region = vmxRegion(ptr, vcpu) else { return vmfail(.vmclearInvalidAddress) }
        if ptr == vmxonPointer { return vmfail(.vmclearVMXONPointer) }
        if ptr == current { releaseCurrentVMCS(vcpu) }
        region.launched = false
        return .succeed
    }

    func vmptrld(_ ptr: L1GPA, _ vcpu: L0VCPU) -> VMXInstructionResult {
        guard let region = vmxRegion(ptr, vcpu) else { return vmfail(.vmptrldInvalidAddress) }
        if ptr == vmxonPointer { return vmfail(.vmptrldVMXONPointer) }
        guard region.revisionID == VMCS12Layout.revisionID else { return vmfail(.vmptrldIncorrectRevision) }
        if ptr != current {
            releaseCurrentVMCS(vcpu)
            current = ptr
            vmcs12 = region
            vmcs12Dirty = true
            if shadowing {
                copyVMCS12ToShadow(vcpu)
                shadowActive.isOn = true
            }
        }
        return .succeed
    }

    /// The current VMCS goes away (VMCLEAR, VMPTRLD of another, VMXOFF): shadow -> vmcs12 first.
    func releaseCurrentVMCS(_ vcpu: L0VCPU) {
        guard vmcs12 != nil else { return }
        if shadowing {
            copyShadowToVMCS12(vcpu)
            shadowActive.isOn = false
        }
        current = nil
        vmcs12 = nil
    }

    /// VMREAD/VMWRITE's field: the whole 64-bit register (KVM refuses any bit above 14), a
    /// well-formed encoding vmcs12 holds. A VMfail result if unusable.
    enum FieldOperands {
        case usable(VMCSImage, VMCSField, valueRegister: Register)
        case fail(VMXInstructionResult)
    }

    func field(_ ops: VMCSFieldOperands?) -> FieldOperands {
        guard let vmcs12 else { return .fail(.failInvalid) }
        guard let ops else { return .fail(vmfail(.unsupportedVMCSComponent)) }
        let field = VMCSField(rawValue: UInt32(truncatingIfNeeded: ops.field))
        guard ops.field >> 15 == 0, field.isWellFormed, VMCS12Layout.slot(of: field) != nil else {
            return .fail(vmfail(.unsupportedVMCSComponent))
        }
        return .usable(vmcs12, field, valueRegister: ops.valueRegister)
    }

    func vmread(_ ops: VMCSFieldOperands?, _ regs: inout RegisterFile, _ vcpu: L0VCPU) -> VMXInstructionResult {
        switch field(ops) {
        case .fail(let r): return r
        case let .usable(vmcs12, field, valueRegister):
            if needsRareSync, KVMWork.needsRareSync(field) {
                // copy_vmcs02_to_vmcs12_rare, before the first read of a rare field.
                vcpu.counters.rareFieldSyncs += 1
                vcpu.counters.count(KVMWork.rareCopyOutsideExit)
                needsRareSync = false
            }
            regs[valueRegister] = vmcs12[field]
            vcpu.counters.vmcs12FieldReads += 1
            return .succeed
        }
    }

    func vmwrite(_ ops: VMCSFieldOperands?, value: UInt64, _ vcpu: L0VCPU) -> VMXInstructionResult {
        switch field(ops) {
        case .fail(let r): return r
        case let .usable(vmcs12, field, _):
            if field.isReadOnly { return vmfail(.vmwriteReadOnlyComponent) }
            if needsRareSync, !ShadowedFields.readWrite.contains(field) {
                // handle_vmwrite outside the hot fields: copy_vmcs02_to_vmcs12_rare first.
                vcpu.counters.rareFieldSyncs += 1
                vcpu.counters.count(KVMWork.rareCopyOutsideExit)
                needsRareSync = false
            }
            vmcs12.write(field, value)
            vcpu.counters.vmcs12FieldWrites += 1
            // KVM's handle_vmwrite: a field outside the shadowed read-write list dirties vmcs12
            // (forcing the rare vmcs02 rebuild); GUEST_RIP and the other hot fields do not, with
            // or without VMCS shadowing.
            if !ShadowedFields.readWrite.contains(field) { vmcs12Dirty = true }
            return .succeed
        }
    }

    /// INVEPT: type 1 single-context (the EPTP's root, bits 51:12), 2 global: the shadows of that
    /// root are re-synced (NestedEPT.swift). A single-context EPTP VM entry would refuse is an
    /// invalid operand.
    func invept(type: UInt64, eptp: UInt64, _ vcpu: L0VCPU) -> VMXInstructionResult {
        switch type {
        case 1:
            guard eptpIsValid(eptp, vcpu) else { return vmfail(.invalidOperandToINVEPTOrINVVPID) }
            if let shadowed = shadowedEPTP, shadowed & EPT.addressMask == eptp & EPT.addressMask { syncShadowsAtINVEPT(vcpu) }
        case 2:
            syncShadowsAtINVEPT(vcpu)
        default:
            return vmfail(.invalidOperandToINVEPTOrINVVPID)
        }
        return .succeed
    }
}
