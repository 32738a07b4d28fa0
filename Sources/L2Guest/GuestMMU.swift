import ABI

/// L2's MMU on the two-dimensional paths: a guest-virtual address goes through L2's own page
/// tables (`PageWalk`, cached in the TLB) to an L2 GPA, then through EPT02 (`physicalAccess`).
/// A first-stage fault is L2's own: the CPU delivers #PF (or #GP) to L2's handler with no exit,
/// and retries the access when the handler returns, as hardware does after an IRET. The walk's
/// own reads and its accessed/dirty writes are guest-physical accesses: an EPT violation on a
/// page-table page exits like any other.
extension GuestCPU {
    /// A load or store at a guest-virtual address.
    func access(_ va: L2GVA, size: Int, write: Bool, value: UInt64 = 0) -> UInt64 {
        if switcher != nil { return shadowAccess(va, size: size, kind: write ? [.write] : [], value: value) }
        var kind: PageWalk.Access = write ? [.write] : []
        if privilege.cpl == 3 { kind.insert(.user) }
        let gpa = firstStage(va, kind)
        return physicalAccess(gpa, size: size, write: write, value: value)
    }

    /// The L2 GPA `va` maps to for `kind` (plus the CPL's user bit), after whatever #PF the
    /// access takes and L2's handler resolves; the identity while L2 has no page tables.
    func firstStage(_ va: L2GVA, _ kind: PageWalk.Access) -> L2GPA {
        guard let space = addressSpace else { return L2GPA(va.raw) }
        var kind = kind
        if privilege.cpl == 3 { kind.insert(.user) }
        while true {
            if let e = tlb.lookup(va, kind) { return e.frame + va.offsetInPage }
            count(.tlbMisses)
            switch PageWalk.translate(va, kind, in: space,
                                      read: { physicalAccess($0, size: 8, write: false) },
                                      write: { _ = physicalAccess($0, size: 8, write: true, value: $1) }) {
            case .mapped(let gpa, _):
                // The entry grants what this walk checked (a read walk does not make it writable).
                tlb.insert(va, .init(frame: gpa.pageBase, writable: kind.contains(.write), user: kind.contains(.user),
                                     executable: kind.contains(.fetch), dirty: kind.contains(.write)))
                return gpa
            case .pageFault(let code):
                raise(.pageFault, errorCode: code, address: va)
            case .generalProtection:
                raise(.generalProtection, errorCode: 0, address: va)
            case .tableUnreadable(let at):
                // The walk's reads never fail here (an unbacked table reads as what L1 answers).
                guestAssert(false, "page walk of \(va) could not read \(at)")
            }
        }
    }

    /// MOV to CR3: L2's page tables switch and its TLB is flushed (no PCID modelled).
    func loadCR3(_ value: UInt64) {
        count(.cr3Loads)
        addressSpace = value == 0 ? nil : PageWalk.Context(cr3: value)
        tlb.flushAll()
        shadowTLB.flushAll()
    }

    /// INVLPG: no exit with EPT (KVM clears INVLPG exiting); drops the page's TLB entry. On
    /// pvm-rfc it traps to L1 (the RFC's TLB_INVLPG), which syncs the shadow entry.
    public func invlpg(_ va: L2GVA) {
        count(.invlpgs)
        if switcher != nil {
            while vmexit(.invlpg, length: 3, qualification: va.raw) == .retry {}
            shadowTLB.flush(va)
        }
        tlb.flush(va)
    }
}
