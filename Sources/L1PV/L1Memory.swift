import ABI
import Transport

/// Where L1's stores to write-protected pages go: its CPU, which exits to L0 (L1's own EPT
/// violation) so L0 can emulate the store.
public protocol L1StoreTrap: AnyObject {
    func isWriteProtected(_ gpa: L1GPA) -> Bool
    func trappedStore(_ value: UInt64, size: Int, at gpa: L1GPA) throws
}

/// L1's own RAM as L1 addresses it: its memslot, mapped from the host memfd. L1 can reach only
/// [slot base, +size); everything else throws. Stores honour L0's write protection, as the
/// hardware would through EPT01: a store to a protected page traps instead of landing.
public struct L1Memory {
    public let slot: MemorySlot
    public let host: HostMemory
    public var trap: (any L1StoreTrap)?

    public init(slot: MemorySlot, host: HostMemory, trap: (any L1StoreTrap)? = nil) {
        self.slot = slot
        self.host = host
        self.trap = trap
    }

    public func hostOffset(_ gpa: L1GPA, length: UInt64) throws -> HostOffset {
        guard let off = gpa.offset(from: slot.guestPhysAddr), off <= slot.memorySize, length <= slot.memorySize - off else {
            throw L1Fault.outsideOwnMemory(gpa)
        }
        return slot.hostOffset + off
    }

    public func load64(_ gpa: L1GPA) throws -> UInt64 { try host.load(at: hostOffset(gpa, length: 8)) }
    public func load8(_ gpa: L1GPA) throws -> UInt8 { try host.load(at: hostOffset(gpa, length: 1)) }

    public func store64(_ v: UInt64, _ gpa: L1GPA) throws {
        let at = try hostOffset(gpa, length: 8)
        if let trap, trap.isWriteProtected(gpa) { return try trap.trappedStore(v, size: 8, at: gpa) }
        try host.store(v, at: at)
    }
    public func store32(_ v: UInt32, _ gpa: L1GPA) throws {
        let at = try hostOffset(gpa, length: 4)
        if let trap, trap.isWriteProtected(gpa) { return try trap.trappedStore(UInt64(v), size: 4, at: gpa) }
        try host.store(v, at: at)
    }
    public func store8(_ v: UInt8, _ gpa: L1GPA) throws {
        let at = try hostOffset(gpa, length: 1)
        if let trap, trap.isWriteProtected(gpa) { return try trap.trappedStore(UInt64(v), size: 1, at: gpa) }
        try host.store(v, at: at)
    }
    public func store16(_ v: UInt16, _ gpa: L1GPA) throws {
        let at = try hostOffset(gpa, length: 2)
        if let trap, trap.isWriteProtected(gpa) { return try trap.trappedStore(UInt64(v), size: 2, at: gpa) }
        try host.store(v, at: at)
    }
    public func zero(_ gpa: L1GPA, length: UInt64) throws {
        let at = try hostOffset(gpa, length: length)
        if let trap {
            var p = gpa.pageBase.raw
            while p < gpa.raw + length {
                if trap.isWriteProtected(L1GPA(p)) {
                    // A protected page: every store traps (rare: L1 reusing a shadowed table page).
                    var o = max(p, gpa.raw)
                    while o < min(p + pageSize, gpa.raw + length) { try trap.trappedStore(0, size: 8, at: L1GPA(o)); o += 8 }
                }
                p += pageSize
            }
        }
        try host.fill(0, at: at, count: length)
    }
    public func runPage(_ gpa: L1GPA) throws -> RunPageView { try host.runPage(at: hostOffset(gpa, length: RunPage.size)) }
    public func vmcs(_ gpa: L1GPA) throws -> VMCSImage {
        try host.vmcs(at: hostOffset(gpa, length: VMCS12Layout.size))
    }
}

/// Why L1 gave up.
public enum L1Fault: Error, CustomStringConvertible {
    case outsideOwnMemory(L1GPA)
    case undefinedOpcode(String)
    case vmxFailure(String, VMXInstructionResult)
    case hypercallFailed(PVHypercall, HypercallError)
    case abiMismatch(l1: PVABIVersion, l0: PVABIVersion)
    case unexpectedExit(ExitReason, String)

    public var description: String {
        switch self {
        case .outsideOwnMemory(let g): "\(g) is outside L1's memory"
        case .undefinedOpcode(let i): "#UD on \(i)"
        case let .vmxFailure(i, r): "\(i) failed: \(r)"
        case let .hypercallFailed(h, e): "hypercall \(h) failed with \(e)"
        case let .abiMismatch(l1, l0): "PV ABI version mismatch: this L1 speaks \(l1), L0 speaks \(l0)"
        case let .unexpectedExit(r, why): "unexpected L2 exit \(r): \(why)"
        }
    }
}

/// How L1 lays out its own memory (L1's choice; nothing in the ABI depends on it).
public enum L1MemoryPlan {
    public static let vmxonRegion = L1GPA(0x0010_0000)
    public static let vmcs12 = L1GPA(0x0010_1000)
    public static let pvExitPage = L1GPA(0x0010_2000)
    public static let ioBitmapA = L1GPA(0x0010_3000)
    public static let ioBitmapB = L1GPA(0x0010_4000)
    public static let msrBitmap = L1GPA(0x0010_5000)
    /// The enlightened VMCS and the VP assist page naming it (nvmx-evmcs).
    public static let evmcs = L1GPA(0x0010_7000)
    public static let vpAssistPage = L1GPA(0x0010_8000)
    /// The PV argument page (registered at negotiate).
    public static let pvArgumentPage = L1GPA(0x0010_6000)
    /// Bulk hypercall arguments (the CPUID table).
    public static let argumentArea = L1GPA(0x0011_0000)
    public static let argumentAreaSize: UInt64 = 64 << 10
    /// Pages for EPT12 tables (nvmx).
    public static let ept12Pool = L1GPA(0x0100_0000)
    public static let ept12PoolSize: UInt64 = 16 << 20
    /// L2's RAM: L2 GPA [0, l2RAMSize) is backed by L1 GPA [l2RAMBacking, +l2RAMSize).
    public static let l2RAMBacking = L1GPA(0x1000_0000)
    public static let l2RAMSize: UInt64 = 128 << 20
    /// Pages L1 maps with fewer rights, to show permission faults: read+execute, read+write.
    public static let l2ReadOnlyPage = L2GPA(0x30_0000)
    public static let l2NoExecutePage = L2GPA(0x31_0000)
    /// The rights L1 first gives an L2 page.
    public static func initialPermissions(of gpa: L2GPA) -> UInt64 {
        switch gpa.pageBase {
        case l2ReadOnlyPage: EPT.read | EPT.execute
        case l2NoExecutePage: EPT.read | EPT.write
        default: EPT.rwxMask
        }
    }
    /// The MSRs L1 sets policies for, and the port it hands L0 (pv) / leaves to L0 (nvmx).
    public static let tscAdjustMSR: UInt32 = 0x3B
    public static let miscEnableMSR: UInt32 = 0x1A0
    /// An MSR no CPU has: L1 asks L0 to answer it with #GP.
    public static let bogusMSR: UInt32 = 0x4B56_4DFF

    /// vCPU `i`'s copy of one of the per-vCPU pages above (the VMXON region, vmcs12, the PV exit
    /// page, the bitmaps, the eVMCS and VP assist page, [0x10_0000, 0x10_9000)): vCPU 0 keeps the
    /// addresses above; vCPU i > 0 has a 64 KiB block of its own at 8 MiB + i x 64 KiB.
    public static func perVCPU(_ page: L1GPA, vcpu i: Int) -> L1GPA {
        precondition(page.raw >= vmxonRegion.raw && page.raw < vmxonRegion.raw + perVCPUBlock, "\(page) is not a per-vCPU page")
        precondition(i >= 0 && i < 64, "vCPU \(i)")
        guard i > 0 else { return page }
        return perVCPUArea + (UInt64(i) * perVCPUBlock + (page.raw - vmxonRegion.raw))
    }
    static let perVCPUArea = L1GPA(0x0080_0000)
    static let perVCPUBlock: UInt64 = 0x1_0000

    /// L2's entry point and stack (values only: L2's code is the guest program).
    public static let l2EntryRIP: UInt64 = 0x10_0000
    public static let l2StackTop: UInt64 = 0x80_0000

    /// The L1 GPA backing an L2 GPA, if it is inside L2's RAM.
    public static func backing(of gpa: L2GPA) -> L1GPA? {
        gpa.raw < l2RAMSize ? l2RAMBacking.adding(gpa.raw) : nil
    }
}
