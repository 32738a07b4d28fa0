import ABI
import Transport

/// EPT02: the table L2's MMU uses, L2 GPA page -> host page + R/W/X. L0 alone writes it, from the
/// PV map (pv path) or from EPT12 walks (nvmx path). Removing or narrowing an entry bumps the
/// generation so L2's MMU drops cached translations before it runs again.
public struct EPT02: @unchecked Sendable {
    let control: SharedRegion
    let layout: ControlLayout

    public init(control: SharedRegion, layout: ControlLayout) {
        self.control = control
        self.layout = layout
    }

    public var addressLimit: UInt64 { layout.l2AddressLimit }

    @inline(__always)
    func slot(_ gpa: L2GPA) -> UInt64? {
        let n = gpa.pageNumber
        return n < layout.ept02Entries ? layout.ept02 + n * 8 : nil
    }

    public func entry(_ gpa: L2GPA) -> UInt64 {
        guard let s = slot(gpa) else { return 0 }
        return control.unchecked(load: UInt64.self, at: s)
    }

    /// Host offset for an L2 GPA, if EPT02 maps it with every permission in `access`.
    public func translate(_ gpa: L2GPA, access: UInt64 = EPT.read) -> HostOffset? {
        let e = entry(gpa)
        guard EPT02Entry.isPresent(e), e & access == access else { return nil }
        return HostOffset(EPT02Entry.host(e).raw | gpa.offsetInPage)
    }

    /// Installs one page. Returns false if the GPA is beyond what EPT02 covers.
    @discardableResult
    public func install(_ gpa: L2GPA, host: HostOffset, permissions: UInt64) -> Bool {
        guard let s = slot(gpa) else { return false }
        let old = control.unchecked(load: UInt64.self, at: s)
        let new = EPT02Entry.make(host: host.pageBase, permissions: permissions)
        control.unchecked(store: new, at: s)
        // Replacing a live entry with another target or fewer rights must flush L2's TLB.
        if EPT02Entry.isPresent(old), old != new, (old & ~new) != 0 || EPT02Entry.host(old) != EPT02Entry.host(new) {
            bumpGeneration()
        }
        return true
    }

    /// Removes the pages of [gpa, +length); returns how many were present.
    @discardableResult
    public func remove(_ gpa: L2GPA, length: UInt64) -> Int {
        var removed = 0
        var p = gpa.pageBase.raw
        let end = min(gpa.raw &+ length, layout.l2AddressLimit)
        while p < end {
            let s = layout.ept02 + (p >> pageShift) * 8
            if control.unchecked(load: UInt64.self, at: s) != 0 {
                control.unchecked(store: UInt64(0), at: s)
                removed += 1
            }
            p += pageSize
        }
        if removed > 0 { bumpGeneration() }
        return removed
    }

    /// Drops every entry (INVEPT global, or a fresh EPT02 root).
    public func removeAll() {
        try? control.fill(0, at: layout.ept02, count: layout.ept02Entries * 8)
        bumpGeneration()
    }

    public var generation: UInt64 { control.unchecked(load: UInt64.self, at: ControlLayout.ept02GenerationOffset) }
    func bumpGeneration() {
        control.unchecked(store: generation &+ 1, at: ControlLayout.ept02GenerationOffset)
    }
}
