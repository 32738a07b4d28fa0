import ABI
import Transport

/// The enlightened-VMCS side of nested VMX (KVM: hyperv_evmcs.c, nested_vmx_handle_enlightened_vmptrld,
/// copy_enlightened_to_vmcs12, copy_vmcs12_to_enlightened). L1 writes fields into the eVMCS in its
/// memory; L0 keeps its own cached vmcs12 and copies only what the clean bits say changed.
extension L0VCPU {
    /// Byte offsets of the eVMCS slots per clean-field group, and of the ones copied every entry.
    static let evmcsGroupOffsets: [[UInt64]] = {
        var g = [[UInt64]](repeating: [], count: EnlightenedVMCS.Group.allCases.count)
        for (f, _) in VMCSField.supported where !f.isReadOnly {
            if let group = EnlightenedVMCS.group(of: f), let slot = VMCS12Layout.slot(of: f) { g[group.rawValue].append(slot.offset) }
        }
        return g
    }()
    static let evmcsAlwaysCopiedOffsets: [UInt64] = VMCSField.supported.compactMap { f, _ in
        !f.isReadOnly && EnlightenedVMCS.group(of: f) == nil ? VMCS12Layout.slot(of: f)?.offset : nil
    }
    /// What a nested exit writes back into the eVMCS: guest RIP/RSP/RFLAGS, interruptibility and
    /// the exit information.
    static let evmcsWriteBackOffsets: [UInt64] = VMCSField.supported.compactMap { f, _ in
        (f.isReadOnly || EnlightenedVMCS.group(of: f) == nil || f == .guestInterruptibilityInfo) ? VMCS12Layout.slot(of: f)?.offset : nil
    }

    /// L1's RDMSR/WRMSR: the VP assist page MSR is how L1 names its eVMCS; other MSRs of L1 are
    /// kept by L0 (L1's own MSRs are not this prototype's subject).
    func handleL1MSR(_ exit: GuestExit) -> L1ExitOutcome {
        let msr = UInt32(truncatingIfNeeded: l1Run[register: .rcx])
        skipL1Instruction(exit)
        if exit.reason == .msrWrite {
            let v = l1Run[register: .rdx] << 32 | l1Run[register: .rax] & 0xFFFF_FFFF
            if msr == VPAssistPage.msr {
                let page = L1GPA(v & ~(pageSize - 1))
                guard v & VPAssistPage.enable == 0 || (try? l1Memory.memslots.translate(page, length: pageSize)) != nil else {
                    injectIntoL1(vector: 13, errorCode: 0)
                    return .resumeL1
                }
                nested.vpAssistPage = v & VPAssistPage.enable != 0 ? page : nil
            }
            l1MSRs[msr] = v
        } else {
            let v = l1MSRs[msr] ?? 0
            l1Run[register: .rax] = v & 0xFFFF_FFFF
            l1Run[register: .rdx] = v >> 32
        }
        return .resumeL1
    }

    /// nested_vmx_handle_enlightened_vmptrld, at VMLAUNCH/VMRESUME: find the eVMCS through the VP
    /// assist page, then copy the groups whose clean bit is clear into the cached vmcs12.
    /// false: no usable eVMCS (VMfailInvalid).
    func loadEnlightenedVMCS() -> Bool {
        guard let assist = nested.vpAssistPage,
              let flagAt = try? l1Memory.memslots.translate(L1GPA(assist.raw + VPAssistPage.enlightenVMEntry), length: 1),
              let enlightened: UInt8 = try? l1Memory.host.load(at: flagAt), enlightened != 0,
              let gpaRaw = try? l1Memory.load64(L1GPA(assist.raw + VPAssistPage.currentNestedVMCS)),
              let evmcs = vmxRegion(L1GPA(gpaRaw)), evmcs.revisionID == EnlightenedVMCS.revision else { return false }
        var clean = evmcs.region.unchecked(load: UInt32.self, at: evmcs.base + EnlightenedVMCS.cleanFieldsOffset)
        if nested.current != L1GPA(gpaRaw) {
            // A new eVMCS: everything is dirty (KVM clears hv_clean_fields), and L0's cache starts clear.
            nested.current = L1GPA(gpaRaw)
            nested.evmcs = evmcs
            nested.vmcs12 = nested.cachedVMCS12
            nested.cachedVMCS12.launched = false
            clean = 0
        }
        var copied: [UInt64] = Self.evmcsAlwaysCopiedOffsets
        for group in EnlightenedVMCS.Group.allCases where clean & group.bit == 0 {
            copied += Self.evmcsGroupOffsets[group.rawValue]
        }
        evmcs.copySlots(copied, to: nested.cachedVMCS12)
        counters.evmcsFieldCopies += UInt64(copied.count)
        // Anything beyond the always-copied fields changed: the full vmcs02 rebuild.
        if copied.count > Self.evmcsAlwaysCopiedOffsets.count { nested.vmcs12Dirty = true }
        return true
    }

    /// copy_vmcs12_to_enlightened at a nested exit: guest state and exit information back into
    /// the eVMCS, and every clean bit set.
    func writeBackEnlightenedVMCS() {
        guard let evmcs = nested.evmcs else { return }
        nested.cachedVMCS12.copySlots(Self.evmcsWriteBackOffsets, to: evmcs)
        counters.evmcsFieldCopies += UInt64(Self.evmcsWriteBackOffsets.count)
        evmcs.region.unchecked(store: UInt32(EnlightenedVMCS.allClean), at: evmcs.base + EnlightenedVMCS.cleanFieldsOffset)
    }
}
