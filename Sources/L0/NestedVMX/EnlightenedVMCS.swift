import ABI
import Transport

/// The enlightened-VMCS side of nested VMX (KVM: hyperv_evmcs.c, nested_vmx_handle_enlightened_vmptrld,
/// copy_enlightened_to_vmcs12, copy_vmcs12_to_enlightened). L1 writes fields into the eVMCS in its
/// memory; L0 keeps its own cached vmcs12 and copies only what the clean bits say changed.
extension NestedVMXBackend {
    /// Byte offsets of the eVMCS slots per clean-field group, and of the ones copied every entry.
    static let evmcsGroupOffsets: [[UInt64]] = {
        var g = [[UInt64]](repeating: [], count: EnlightenedVMCS.Group.allCases.count)
        for (f, _) in VMCSField.supported where !f.isReadOnly {
            if let group = EnlightenedVMCS.group(of: f), let slot = VMCS12Layout.slot(of: f) { g[group.rawValue].append(slot.offset) }
        }
        return g
    }()
    static let evmcsAlwaysCopiedOffsets: [UInt64] = VMCSField.supported.compactMap { f, _ in
        EnlightenedVMCS.copiedOnEveryEntry(f) ? VMCS12Layout.slot(of: f)?.offset : nil
    }
    /// What a nested exit writes back into the eVMCS (copy_vmcs12_to_enlightened), one slot per
    /// field (a 64-bit field's high half shares its slot).
    static let evmcsWriteBackOffsets: [UInt64] = Array(Set(VMCSField.supported.compactMap { f, _ in
        EnlightenedVMCS.writtenBackAtExit(f) ? VMCS12Layout.slot(of: f)?.offset : nil
    })).sorted()

    /// nested_vmx_handle_enlightened_vmptrld, at VMLAUNCH/VMRESUME: find the eVMCS through the VP
    /// assist page, then copy the groups whose clean bit is clear into the cached vmcs12.
    /// false: no usable eVMCS (VMfailInvalid).
    func loadEnlightenedVMCS(launch: Bool, _ vcpu: L0VCPU) -> Bool {
        guard let assist = vpAssistPage,
              let enlightened: UInt8 = try? vcpu.l1Memory.load(assist + VPAssistPage.enlightenVMEntry), enlightened != 0,
              let gpaRaw: UInt64 = try? vcpu.l1Memory.load(assist + VPAssistPage.currentNestedVMCS),
              let evmcs = vmxRegion(L1GPA(gpaRaw), vcpu), evmcs.revisionID == EnlightenedVMCS.revision else { return false }
        // KVM ignores the clean bits on VMLAUNCH (everything is copied) and for a new eVMCS.
        var clean = launch ? 0 : evmcs.evmcsCleanFields
        if current != L1GPA(gpaRaw) {
            // A new eVMCS: everything is dirty (KVM clears hv_clean_fields), and L0's cache starts clear.
            current = L1GPA(gpaRaw)
            self.evmcs = evmcs
            vmcs12 = cachedVMCS12
            cachedVMCS12.launched = false
            clean = 0
        }
        lastEVMCSClean = clean
        var copied: [UInt64] = Self.evmcsAlwaysCopiedOffsets
        for group in EnlightenedVMCS.Group.allCases where clean & group.bit == 0 {
            copied += Self.evmcsGroupOffsets[group.rawValue]
        }
        evmcs.copySlots(copied, to: cachedVMCS12)
        vcpu.counters.evmcsFieldCopies += UInt64(copied.count)
        // Anything beyond the always-copied fields changed: the full vmcs02 rebuild.
        if copied.count > Self.evmcsAlwaysCopiedOffsets.count { vmcs12Dirty = true }
        return true
    }

    /// copy_vmcs12_to_enlightened at a nested exit: guest state and exit information back into
    /// the eVMCS, and every clean bit set.
    func writeBackEnlightenedVMCS(_ vcpu: L0VCPU) {
        guard let evmcs else { return }
        cachedVMCS12.copySlots(Self.evmcsWriteBackOffsets, to: evmcs)
        vcpu.counters.evmcsFieldCopies += UInt64(Self.evmcsWriteBackOffsets.count)
        evmcs.evmcsCleanFields = UInt32(EnlightenedVMCS.allClean)
    }
}
