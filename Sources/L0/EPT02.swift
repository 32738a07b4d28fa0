import ABI
import Transport

/// EPT02: the table L2's MMU uses, L2 GPA page -> host page + R/W/X. L0 alone writes it, from the
/// PV map (pv path) or from EPT12 walks (nvmx path). L2's MMU reads it on every access, so a
/// removed entry is gone before L2 runs again. L0 remembers which entries are present, so
/// dropping everything costs what is there, not the size of the L2 address space.
public final class EPT02: @unchecked Sendable {
    let control: SharedRegion
    let layout: ControlLayout
    /// Frames with a present entry.
    public private(set) var present: Set<UInt64> = []

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
        control.unchecked(store: EPT02Entry.make(host: host.pageBase, permissions: permissions), at: s)
        present.insert(gpa.pageNumber)
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
                present.remove(p >> pageShift)
                removed += 1
            }
            p += pageSize
        }
        return removed
    }

    /// Drops every entry (INVEPT, or a fresh EPT02 root).
    public func removeAll() {
        for frame in present { control.unchecked(store: UInt64(0), at: layout.ept02 + frame * 8) }
        present.removeAll(keepingCapacity: true)
    }
}
