
/// L2's MMU, first stage: the x86-64 4-level page walk (SDM vol. 3, 4.5) from a guest-virtual
/// address to an L2 GPA, through page tables that live in L2's own RAM. Pure: it reads and writes
/// table entries through the closures it is given (the second stage, EPT02 or a shadow, is the
/// caller's), so it is tested with made-up tables and no process.
///
/// What it does as the architecture says: present and permission checks at every level (R/W with
/// CR0.WP = 1, U/S, XD with EFER.NXE), reserved-bit checks (PS in a PML4E, a huge page's low
/// address bits, XD without NXE), 2 MiB and 1 GiB pages, the accessed flag set on every entry the
/// walk used and the dirty flag on the leaf of a write (when the walk succeeds: the SDM lets a
/// faulting walk leave them either way, and this one leaves them clear), and the #PF error code.
/// What it leaves out (documented, the same on every path): PCID, protection keys, SMEP/SMAP,
/// 5-level paging, and the TLB (the caller caches, and flushes on INVLPG and CR3 writes).
public enum PageWalk {
    /// The entry bits the walk uses (SDM table 4-14 ff).
    public enum Bit {
        public static let present: UInt64 = 1 << 0
        public static let writable: UInt64 = 1 << 1
        public static let user: UInt64 = 1 << 2
        public static let accessed: UInt64 = 1 << 5
        public static let dirty: UInt64 = 1 << 6
        public static let pageSize: UInt64 = 1 << 7
        public static let executeDisable: UInt64 = 1 << 63
        /// A 2 MiB or 1 GiB page's PAT bit (bit 7 is PS there).
        public static let hugePAT: UInt64 = 1 << 12
        /// Bits 51:12: the next table's or the page's physical address.
        public static let addressMask: UInt64 = 0x000F_FFFF_FFFF_F000
    }

    /// What the access is.
    public struct Access: OptionSet, Sendable, Hashable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        public static let write = Access(rawValue: 1 << 0)
        /// From user mode (CPL 3).
        public static let user = Access(rawValue: 1 << 1)
        /// An instruction fetch.
        public static let fetch = Access(rawValue: 1 << 2)
    }

    /// The #PF error code's bits (SDM 4.7).
    public enum ErrorCode {
        public static let protection: UInt32 = 1 << 0   // the entry was present: a permission or reserved-bit fault
        public static let write: UInt32 = 1 << 1
        public static let user: UInt32 = 1 << 2
        public static let reserved: UInt32 = 1 << 3
        public static let fetch: UInt32 = 1 << 4
    }

    /// What a walk ends in, in the address space its tables point into: L2 GPAs for L2's own
    /// tables, L1 GPAs for the shadow tables of pvm-rfc (the same format, walked the same way).
    public enum Walk<Frame: AddressSpaceValue>: Equatable, Sendable {
        /// The frame address, and the size of the page that maps it (4 KiB, 2 MiB or 1 GiB).
        case mapped(Frame, pageBytes: UInt64)
        /// A page fault with its error code (CR2 is the address walked).
        case pageFault(errorCode: UInt32)
        /// A non-canonical address: #GP, no walk.
        case generalProtection
        /// A table the walk needed could not be read (outside the memory given): the caller's
        /// EPT violation or machine check, not a #PF.
        case tableUnreadable(Frame)
    }
    public typealias Outcome = Walk<L2GPA>

    /// CR3 and EFER.NXE, as the walk needs them.
    public struct Context: Sendable, Equatable {
        public var cr3: UInt64
        public var nxe: Bool
        public init(cr3: UInt64, nxe: Bool = true) { self.cr3 = cr3; self.nxe = nxe }
        /// The PML4's address (CR3 bits 51:12).
        public var root: L2GPA { L2GPA(cr3 & Bit.addressMask) }
    }

    /// Walks `gva` for `access`. `read` gives a table entry (nil: unreadable), `write` stores an
    /// entry whose accessed/dirty flags changed.
    public static func translate(_ gva: L2GVA, _ access: Access, in context: Context,
                                 read: (L2GPA) -> UInt64?, write: (L2GPA, UInt64) -> Void) -> Outcome {
        translate(gva, access, root: context.root, nxe: context.nxe, read: read, write: write)
    }

    /// The same walk from a root in any address space (the shadow tables' L1 GPAs).
    public static func translate<Frame: AddressSpaceValue>(_ gva: L2GVA, _ access: Access, root: Frame, nxe: Bool,
                                                           read: (Frame) -> UInt64?, write: (Frame, UInt64) -> Void) -> Walk<Frame> {
        let context = (root: root, nxe: nxe)
        guard gva.isCanonical else { return .generalProtection }
        var errorBase: UInt32 = 0
        if access.contains(.write) { errorBase |= ErrorCode.write }
        if access.contains(.user) { errorBase |= ErrorCode.user }
        if access.contains(.fetch) && context.nxe { errorBase |= ErrorCode.fetch }

        var table = context.root
        var writable = true, user = true, executable = true
        var used: [(Frame, UInt64)] = []
        // Levels 4 (PML4) to 1 (PT); each indexes 9 bits of the address.
        for level in stride(from: 4, through: 1, by: -1) {
            let index = (gva.raw >> (12 + 9 * UInt64(level - 1))) & 0x1FF
            let at = table + index * 8
            guard let entry = read(at) else { return .tableUnreadable(at) }
            guard entry & Bit.present != 0 else { return .pageFault(errorCode: errorBase) }
            // Reserved bits: XD without NXE; PS in a PML4E; a huge page's address bits below its size.
            let isLeaf = level == 1 || (level <= 3 && entry & Bit.pageSize != 0)
            let pageBytes: UInt64 = 1 << (12 + 9 * UInt64(level - 1))
            var reserved = (!context.nxe && entry & Bit.executeDisable != 0) || (level == 4 && entry & Bit.pageSize != 0)
            if isLeaf && level > 1 { reserved = reserved || entry & Bit.addressMask & (pageBytes - 1) & ~Bit.hugePAT != 0 }
            if reserved { return .pageFault(errorCode: errorBase | ErrorCode.protection | ErrorCode.reserved) }
            writable = writable && entry & Bit.writable != 0
            user = user && entry & Bit.user != 0
            executable = executable && !(context.nxe && entry & Bit.executeDisable != 0)
            used.append((at, entry))
            if isLeaf {
                // Permissions over the whole walk (CR0.WP = 1: supervisor writes obey R/W too).
                let denied = (access.contains(.write) && !writable) || (access.contains(.user) && !user)
                    || (access.contains(.fetch) && !executable)
                if denied { return .pageFault(errorCode: errorBase | ErrorCode.protection) }
                // Accessed on every entry used; dirty on the leaf of a write.
                for (i, (gpa, e)) in used.enumerated() {
                    var updated = e | Bit.accessed
                    if i == used.count - 1 && access.contains(.write) { updated |= Bit.dirty }
                    if updated != e { write(gpa, updated) }
                }
                let frame = entry & Bit.addressMask & ~(pageBytes - 1)
                return .mapped(Frame(frame | (gva.raw & (pageBytes - 1))), pageBytes: pageBytes)
            }
            table = Frame(entry & Bit.addressMask)
        }
        return .pageFault(errorCode: errorBase)   // unreachable: level 1 is always a leaf
    }
}

/// The vectors L2's handlers are installed for (SDM vol. 3, table 6-1).
public enum ExceptionVector: UInt8, Sendable {
    case breakpoint = 3
    case invalidOpcode = 6
    case generalProtection = 13
    case pageFault = 14
}
