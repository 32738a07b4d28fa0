import ABI

/// A VMCS in memory, accessed by field encoding: vmcs12 or an eVMCS (in L1 memory, through
/// `HostMemory.vmcs`) or the shadow VMCS (`ControlMemory.shadowVMCS`). All use `VMCS12Layout`;
/// the page is checked to lie inside its region when the view is made.
public struct VMCSImage: @unchecked Sendable {
    let region: SharedRegion
    let base: UInt64

    init(region: SharedRegion, base: UInt64) throws {
        try region.check(base, VMCS12Layout.size)
        self.region = region
        self.base = base
    }

    /// A page at a layout offset of control memory: a bad layout is a bug, so it traps.
    init(fixed region: SharedRegion, base: UInt64) {
        precondition((try? region.check(base, VMCS12Layout.size)) != nil, "VMCS page 0x\(String(base, radix: 16)) outside its region")
        self.region = region
        self.base = base
    }

    /// Same page of the same memory.
    public func isSamePage(as other: VMCSImage) -> Bool { region === other.region && base == other.base }

    /// The field's value (width-masked), or nil if vmcs12 does not support the field.
    @inline(__always)
    public func read(_ f: VMCSField) -> UInt64? {
        guard let (offset, high) = VMCS12Layout.slot(of: f) else { return nil }
        let raw = region.unchecked(load: UInt64.self, at: base + offset)
        return high ? raw >> 32 : raw & f.valueMask
    }

    /// Reads a field the caller knows is supported (a `VMCSField` constant from the layout).
    @inline(__always)
    public subscript(f: VMCSField) -> UInt64 {
        get { read(f) ?? 0 }
        nonmutating set { _ = write(f, newValue) }
    }

    /// Stores the field (width-masked; a high access replaces bits 63:32). False if unsupported.
    @discardableResult
    @inline(__always)
    public func write(_ f: VMCSField, _ value: UInt64) -> Bool {
        guard let (offset, high) = VMCS12Layout.slot(of: f) else { return false }
        let at = base + offset
        if high {
            let old = region.unchecked(load: UInt64.self, at: at)
            region.unchecked(store: (old & 0xFFFF_FFFF) | (value << 32), at: at)
        } else {
            region.unchecked(store: value & f.valueMask, at: at)
        }
        return true
    }

    public var revisionID: UInt32 {
        get { region.unchecked(load: UInt32.self, at: base + VMCS12Layout.revisionOffset) }
        nonmutating set { region.unchecked(store: newValue, at: base + VMCS12Layout.revisionOffset) }
    }
    /// An eVMCS's clean-fields word (Hyper-V TLFS): a set bit = that field group unchanged.
    public var evmcsCleanFields: UInt32 {
        get { region.unchecked(load: UInt32.self, at: base + EnlightenedVMCS.cleanFieldsOffset) }
        nonmutating set { region.unchecked(store: newValue, at: base + EnlightenedVMCS.cleanFieldsOffset) }
    }
    /// An eVMCS's hv_enlightenments_control word.
    public var evmcsEnlightenmentsControl: UInt32 {
        get { region.unchecked(load: UInt32.self, at: base + EnlightenedVMCS.enlightenmentsControlOffset) }
        nonmutating set { region.unchecked(store: newValue, at: base + EnlightenedVMCS.enlightenmentsControlOffset) }
    }
    public var launched: Bool {
        get { region.unchecked(load: UInt32.self, at: base + VMCS12Layout.launchStateOffset) != 0 }
        nonmutating set { region.unchecked(store: UInt32(newValue ? 1 : 0), at: base + VMCS12Layout.launchStateOffset) }
    }

    /// Copies whole 8-byte slots (offsets from `VMCS12Layout.slot`) to another image:
    /// shadow VMCS <-> vmcs12.
    @inline(__always)
    public func copySlots(_ offsets: [UInt64], to other: VMCSImage) {
        for offset in offsets {
            other.region.unchecked(store: region.unchecked(load: UInt64.self, at: base + offset), at: other.base + offset)
        }
    }
}
