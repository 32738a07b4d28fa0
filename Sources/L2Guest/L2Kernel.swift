import ABI

/// The kernel part of the paging guest programs: L2's own memory management, written with
/// ordinary loads and stores through the guest CPU (so every page-table write is a store the
/// path sees, as a shadow MMU must). It owns a pool of physical pages, builds 4-level tables,
/// and keeps a direct map of low memory (the identity: `L2GVA(directMap:)`), supervisor-only,
/// that every address space shares through PML4 entry 0. User memory lives from `userBase`
/// (PML4 entry 1), private to each address space.
public final class L2Kernel {
    /// The direct map covers L2 GPA [0, 16 MiB): the programs' own pages, the ucall block and
    /// the pool, so the kernel reaches all of them once paging is on.
    public static let directMapBytes: UInt64 = 16 << 20
    /// Pages for tables and user memory: L2 GPA [8 MiB, 16 MiB), 2,048 pages.
    public static let pool = AddressRange(start: L2GPA(8 << 20), length: 8 << 20)!
    /// Where user memory starts: PML4 entry 1 (512 GiB), so the kernel half is one entry.
    public static let userBase = L2GVA(0x80_0000_0000)

    typealias Bit = PageWalk.Bit
    /// A kernel entry: present, writable, supervisor. A user entry adds U/S.
    static let kernelFlags = Bit.present | Bit.writable
    static let userTableFlags = Bit.present | Bit.writable | Bit.user

    let cpu: GuestCPU
    /// Freed pages, by use: table pages come back with every entry cleared, data pages with
    /// whatever user code wrote, so each kind is reused only as itself (no zeroing needed).
    private var freeTables: [L2GPA] = []
    private var freeData: [L2GPA] = []
    private var nextFresh = L2Kernel.pool.start
    /// The PDPT of the direct map: PML4 entry 0 of every address space.
    private(set) var kernelPDPT = L2GPA(0)
    /// Table pages of each address space's user half (freed with it), and the entries the
    /// kernel set in them (cleared when it goes), by root.
    private var userTables: [L2GPA: [L2GPA]] = [:]
    private var userEntries: [L2GPA: Set<L2GPA>] = [:]

    /// Builds the direct map (before paging is on: physical stores). Call once, then
    /// `newAddressSpace()` and `cpu.writeCR(3, space.cr3)`.
    public init(cpu: GuestCPU) {
        self.cpu = cpu
        kernelPDPT = allocateTable()
        let pd = allocateTable()
        cpu.write64(kernelPDPT, pd.raw | Self.kernelFlags)
        for t in 0..<(Self.directMapBytes >> 21) {
            let pt = allocateTable()
            cpu.write64(pd + t * 8, pt.raw | Self.kernelFlags)
            for e in 0..<UInt64(512) {
                let frame = (t << 21) | (e << 12)
                cpu.write64(pt + e * 8, frame | Self.kernelFlags)
            }
        }
    }

    /// A data page from the pool (its contents are whatever it held).
    public func allocate() -> L2GPA {
        freeData.popLast() ?? fresh()
    }

    /// A zeroed page for a page table.
    func allocateTable() -> L2GPA {
        freeTables.popLast() ?? fresh()
    }

    private func fresh() -> L2GPA {
        cpu.guestAssert(nextFresh < Self.pool.end, "L2 kernel: out of pool pages")
        defer { nextFresh = nextFresh + pageSize }
        return nextFresh
    }

    /// Gives a data page back.
    public func free(_ page: L2GPA) { freeData.append(page) }

    /// A new address space: its PML4 holds the kernel half, the user half is empty.
    public func newAddressSpace() -> AddressSpace {
        let root = allocateTable()
        cpu.write64(root, kernelPDPT.raw | Self.kernelFlags)
        userTables[root] = []
        return AddressSpace(root: root)
    }

    /// The leaf entry's physical address for `va` in `space`, creating the user tables on the way.
    func leafEntry(_ space: AddressSpace, _ va: L2GVA, create: Bool) -> L2GPA? {
        var table = space.root
        for level in stride(from: 4, through: 2, by: -1) {
            let at = table + ((va.raw >> (12 + 9 * UInt64(level - 1))) & 0x1FF) * 8
            let e = cpu.read64(at)
            if e & Bit.present == 0 {
                guard create else { return nil }
                let t = allocateTable()
                userTables[space.root, default: []].append(t)
                userEntries[space.root, default: []].insert(at)
                cpu.write64(at, t.raw | Self.userTableFlags)
                table = t
            } else {
                table = L2GPA(e & Bit.addressMask)
            }
        }
        return table + ((va.raw >> 12) & 0x1FF) * 8
    }

    /// Where the page-directory entry for user address `va` is (nil: no such table yet).
    public func directoryEntry(_ space: AddressSpace, _ va: L2GVA) -> L2GPA? {
        var table = space.root
        for level in stride(from: 4, through: 3, by: -1) {
            let e = cpu.read64(table + ((va.raw >> (12 + 9 * UInt64(level - 1))) & 0x1FF) * 8)
            guard e & Bit.present != 0 else { return nil }
            table = L2GPA(e & Bit.addressMask)
        }
        return table + ((va.raw >> 21) & 0x1FF) * 8
    }

    /// Maps user page `va` to `frame` (a PTE store; the caller flushes the TLB if it replaced one).
    public func map(_ space: AddressSpace, _ va: L2GVA, to frame: L2GPA, writable: Bool) {
        guard let pte = leafEntry(space, va, create: true) else { return }
        userEntries[space.root, default: []].insert(pte)
        cpu.write64(pte, frame.raw | Bit.present | Bit.user | (writable ? Bit.writable : 0))
    }

    /// The user PTE of `va` (0: none).
    public func entry(_ space: AddressSpace, _ va: L2GVA) -> UInt64 {
        leafEntry(space, va, create: false).map { cpu.read64($0) } ?? 0
    }

    /// Rewrites the user PTE of `va` (clear it with 0), then INVLPG.
    public func setEntry(_ space: AddressSpace, _ va: L2GVA, _ value: UInt64) {
        guard let pte = leafEntry(space, va, create: false) else { return }
        cpu.write64(pte, value)
        cpu.invlpg(va)
    }

    /// Frees the user half of `space` and its root: clears the entries it set (so the pages go
    /// back to the pool zeroed) and returns the pages. The caller is off this CR3.
    public func destroy(_ space: AddressSpace) {
        for e in (userEntries.removeValue(forKey: space.root) ?? []).sorted() where cpu.read64(e) != 0 {
            cpu.write64(e, 0)
        }
        freeTables += userTables.removeValue(forKey: space.root) ?? []
        cpu.write64(space.root, 0)
        freeTables.append(space.root)
    }
}

/// One L2 address space: the root its CR3 loads.
public struct AddressSpace: Sendable, Equatable {
    public let root: L2GPA
    public var cr3: UInt64 { root.raw }
}
