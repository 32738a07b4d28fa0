import ABI
import Transport

/// What L0 remembers about the EPT12 pages its EPT02 entries came from (KVM: shadow pages and
/// their write protection, mmu/mmu.c). Every table page a successful walk read is write-protected
/// so L1's edits trap; a 4 KiB leaf table goes "unsync" at its first trapped write (no more traps,
/// as KVM allows for last-level pages), and INVEPT frees every shadow (kvm_mmu_free_roots).
public struct EPT12ShadowTracker: Sendable {
    /// L1 page number of a shadowed table -> its level and the L2 pages whose translation used it.
    public internal(set) var tables: [UInt64: (level: Int, dependents: Set<UInt64>)] = [:]
    public internal(set) var unsync: Set<UInt64> = []
    public init() {}
}

extension L0VCPU {
    func setWriteProtected(_ page: UInt64, _ on: Bool) {
        guard page < ControlLayout.l1WriteProtectLimit / pageSize else { return }
        let at = nested.writeProtectBitmap + page / 8
        let byte = nested.control.unchecked(load: UInt8.self, at: at)
        let bit = UInt8(1) << UInt8(page % 8)
        nested.control.unchecked(store: on ? byte | bit : byte & ~bit, at: at)
    }

    /// After installing an EPT02 entry for `l2`: shadow (write-protect) the tables its walk read.
    func shadowWalk(_ walk: EPT12Walker.Walk, for l2: L2GPA) {
        for (i, table) in walk.tables.enumerated() {
            let page = table.pageNumber
            let level = EPT.levels - i
            nested.shadows.tables[page, default: (level, [])].dependents.insert(l2.pageNumber)
            if !nested.shadows.unsync.contains(page) { setWriteProtected(page, true) }
        }
    }

    /// L1 stored to one of its pages and trapped (its own EPT violation, reason 48): emulate the
    /// store, then keep EPT02 honest. A leaf table goes unsync; any other table loses the EPT02
    /// entries derived from it. A store to a page not protected (a stale trap) just completes.
    func handleL1WriteTrap(_ exit: GuestExit) -> L1ExitOutcome {
        let gpa = L1GPA(exit.guestPhysicalAddress)
        let value = l1Run[register: .rax]
        let stored: Bool
        switch exit.instructionInfo {
        case 1: stored = (try? l1Memory.host.store(UInt8(truncatingIfNeeded: value), at: l1Memory.memslots.translate(gpa, length: 1))) != nil
        case 4: stored = (try? l1Memory.store32(UInt32(truncatingIfNeeded: value), gpa)) != nil
        default: stored = (try? l1Memory.store64(value, gpa)) != nil
        }
        guard stored else { return .stop(.fatal("L1 stored to \(gpa), outside its memory")) }
        skipL1Instruction(exit)
        counters.ept12WriteTraps += 1
        let page = gpa.pageNumber
        guard let shadow = nested.shadows.tables[page] else { return .resumeL1 }
        if shadow.level == 1 {
            nested.shadows.unsync.insert(page)
            setWriteProtected(page, false)
            counters.ept12Unsyncs += 1
        } else {
            for dep in shadow.dependents { ept02.remove(L2GPA(dep << pageShift), length: pageSize) }
            nested.shadows.tables[page] = nil
            setWriteProtected(page, false)
        }
        return .resumeL1
    }

    /// INVEPT, a new EPTP: free every shadow (EPT02 and the write protection that guarded it).
    func dropEPT02Shadows() {
        ept02.removeAll()
        for page in nested.shadows.tables.keys { setWriteProtected(page, false) }
        nested.shadows = EPT12ShadowTracker()
    }
}
