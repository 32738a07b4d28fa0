import ABI

/// L2's TLB: a guest-virtual page -> the frame the first stage gave it (an L2 GPA on the
/// two-dimensional paths, an L1 GPA through the shadow tables on pvm-rfc), with the rights the
/// walk found. Direct-mapped, 64 entries. It caches only the first stage: the second (EPT02, or
/// L1's memslot) is looked up on every access, so a change L0 makes there is seen at once, as
/// INVEPT would make it. L2 flushes it as the architecture says (a CR3 write: all of it, no PCID
/// or global pages modelled; INVLPG: one page); on pvm-rfc L1 also flushes it after changing a
/// shadow entry (KVM's remote TLB flush), through the switcher's flush generation.
struct GuestTLB<Frame: AddressSpaceValue> {
    struct Entry {
        /// The GVA page number + 1 (0: empty).
        var tag: UInt64 = 0
        var frame = Frame(0)
        var writable = false, user = false, executable = false
        /// The walk that filled it set the dirty flag (a write through a clean entry walks again).
        var dirty = false
    }
    static var size: Int { 64 }
    private var entries = [Entry](repeating: Entry(), count: 64)

    @inline(__always)
    static func slot(_ gva: L2GVA) -> Int { Int(truncatingIfNeeded: gva.pageNumber & 63) }

    /// The entry for `gva` if it allows the access (else nil: the CPU walks again).
    @inline(__always)
    mutating func lookup(_ gva: L2GVA, _ access: PageWalk.Access) -> Entry? {
        let e = entries[Self.slot(gva)]
        guard e.tag == gva.pageNumber &+ 1,
              !access.contains(.write) || (e.writable && e.dirty),
              !access.contains(.user) || e.user,
              !access.contains(.fetch) || e.executable else {
            return nil
        }
        return e
    }

    mutating func insert(_ gva: L2GVA, _ e: Entry) {
        var e = e
        e.tag = gva.pageNumber &+ 1
        entries[Self.slot(gva)] = e
    }

    /// INVLPG.
    mutating func flush(_ gva: L2GVA) {
        if entries[Self.slot(gva)].tag == gva.pageNumber &+ 1 { entries[Self.slot(gva)] = Entry() }
    }

    /// A CR3 write (no PCID): everything.
    mutating func flushAll() {
        for i in entries.indices { entries[i] = Entry() }
    }
}
