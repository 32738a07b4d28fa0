// VMX execution-control bits and EPT entry bits (SDM 24.6, 28.2). Absent from the uAPI
// header; names follow the kernel's CPU_BASED_* / SECONDARY_EXEC_* / VMX_EPT_*.

public enum PinBased {
    public static let externalInterruptExiting: UInt64 = 1 << 0
    public static let nmiExiting: UInt64 = 1 << 3
    public static let virtualNMIs: UInt64 = 1 << 5
    public static let preemptionTimer: UInt64 = 1 << 6
}

public enum CPUBased {
    public static let interruptWindowExiting: UInt64 = 1 << 2
    public static let useTSCOffsetting: UInt64 = 1 << 3
    public static let hltExiting: UInt64 = 1 << 7
    public static let invlpgExiting: UInt64 = 1 << 9
    public static let mwaitExiting: UInt64 = 1 << 10
    public static let rdpmcExiting: UInt64 = 1 << 11
    public static let rdtscExiting: UInt64 = 1 << 12
    public static let cr3LoadExiting: UInt64 = 1 << 15
    public static let cr3StoreExiting: UInt64 = 1 << 16
    public static let cr8LoadExiting: UInt64 = 1 << 19
    public static let cr8StoreExiting: UInt64 = 1 << 20
    public static let tprShadow: UInt64 = 1 << 21
    public static let nmiWindowExiting: UInt64 = 1 << 22
    public static let movDRExiting: UInt64 = 1 << 23
    public static let unconditionalIOExiting: UInt64 = 1 << 24
    public static let useIOBitmaps: UInt64 = 1 << 25
    public static let monitorTrapFlag: UInt64 = 1 << 27
    public static let useMSRBitmaps: UInt64 = 1 << 28
    public static let monitorExiting: UInt64 = 1 << 29
    public static let pauseExiting: UInt64 = 1 << 30
    public static let activateSecondaryControls: UInt64 = 1 << 31
}

public enum SecondaryExec {
    public static let enableEPT: UInt64 = 1 << 1
    public static let descriptorTableExiting: UInt64 = 1 << 2
    public static let rdtscp: UInt64 = 1 << 3
    public static let enableVPID: UInt64 = 1 << 5
    public static let wbinvdExiting: UInt64 = 1 << 6
    public static let unrestrictedGuest: UInt64 = 1 << 7
    public static let pauseLoopExiting: UInt64 = 1 << 10
    public static let rdrandExiting: UInt64 = 1 << 11
    public static let enableINVPCID: UInt64 = 1 << 12
    public static let shadowVMCS: UInt64 = 1 << 14
    public static let rdseedExiting: UInt64 = 1 << 16
    public static let enableUserWaitPause: UInt64 = 1 << 26
}

public enum VMEntryControl {
    public static let ia32eModeGuest: UInt64 = 1 << 9
    public static let loadIA32EFER: UInt64 = 1 << 15
}

public enum VMExitControl {
    public static let hostAddressSpaceSize: UInt64 = 1 << 9
    public static let ackInterruptOnExit: UInt64 = 1 << 15
    public static let loadIA32EFER: UInt64 = 1 << 21
}

/// EPT paging-structure entry bits (SDM 28.3.2) and EPTP format (24.6.11).
public enum EPT {
    /// The index of `gpa`'s entry in its table at `level` (4 = PML4 ... 1 = PT): the one place the
    /// 9-bits-per-level split is written, for L0's EPT12 walk and L1's EPT12 builder alike.
    public static func tableIndex(_ gpa: L2GPA, level: Int) -> UInt64 {
        (gpa.raw >> UInt64(12 + 9 * (level - 1))) & (entriesPerTable - 1)
    }
    /// A non-leaf or leaf entry pointing at L1 page `page` with the other bits in `bits`.
    public static func entry(_ page: L1GPA, _ bits: UInt64) -> UInt64 { page.raw & addressMask | bits }
    public static let read: UInt64 = 1 << 0
    public static let write: UInt64 = 1 << 1
    public static let execute: UInt64 = 1 << 2
    public static let rwxMask: UInt64 = 0x7
    public static let memoryTypeShift: UInt64 = 3
    public static let memoryTypeMask: UInt64 = 0x7 << 3
    public static let ignorePAT: UInt64 = 1 << 6
    public static let largePage: UInt64 = 1 << 7
    public static let accessed: UInt64 = 1 << 8
    public static let dirty: UInt64 = 1 << 9
    /// Bits 51:12 hold the next table's (or the page's) physical address.
    public static let addressMask: UInt64 = 0x000F_FFFF_FFFF_F000
    public static let memoryTypeUC: UInt64 = 0
    public static let memoryTypeWB: UInt64 = 6
    /// EPTP: memory type in bits 2:0, page-walk length minus one in bits 5:3, A/D enable bit 6.
    public static let eptpWalkLength4: UInt64 = 3 << 3
    public static let eptpADEnable: UInt64 = 1 << 6
    public static let levels = 4
    public static let entriesPerTable: UInt64 = 512
}

/// EPT-violation exit qualification bits (SDM 28.3.3.2).
public enum EPTViolationQualification {
    public static let dataRead: UInt64 = 1 << 0
    public static let dataWrite: UInt64 = 1 << 1
    public static let instructionFetch: UInt64 = 1 << 2
    /// Bits 3-5: the R/W/X permissions of the translation (AND of the walked entries).
    public static let readableShift: UInt64 = 3
    public static let guestLinearAddressValid: UInt64 = 1 << 7
}

/// I/O instruction exit qualification (SDM Table 28-5).
/// The exit qualification of a control-register access (SDM Table 28-3): CR number in bits 3:0,
/// access type in 5:4 (0 MOV to CR, 1 MOV from CR, 2 CLTS, 3 LMSW), the GPR in 11:8 (SDM numbering).
public enum CRAccessQualification {
    public static let movToCR: UInt64 = 0
    public static let movFromCR: UInt64 = 1
    public static func make(cr: UInt64, type: UInt64, register: Register) -> UInt64 {
        (cr & 0xF) | (type & 3) << 4 | register.sdmNumber << 8
    }
    public static func cr(_ q: UInt64) -> UInt64 { q & 0xF }
    public static func type(_ q: UInt64) -> UInt64 { (q >> 4) & 3 }
    public static func register(_ q: UInt64) -> Register? { Register(sdmNumber: (q >> 8) & 0xF) }
}

/// The exit qualification of a debug-register access (SDM Table 28-4): DR number in bits 2:0,
/// direction in bit 4 (0 MOV to DR, 1 MOV from DR), the GPR in 11:8.
public enum DRAccessQualification {
    public static func make(dr: UInt64, toDR: Bool, register: Register) -> UInt64 {
        (dr & 7) | (toDR ? 0 : 1 << 4) | register.sdmNumber << 8
    }
    public static func dr(_ q: UInt64) -> UInt64 { q & 7 }
    public static func isToDR(_ q: UInt64) -> Bool { q & (1 << 4) == 0 }
    public static func register(_ q: UInt64) -> Register? { Register(sdmNumber: (q >> 8) & 0xF) }
}

/// CR0/CR4 bits, and the ones KVM lets a guest own with EPT on (a MOV to CR0/CR4 that changes
/// only guest-owned bits does not exit): vmx_l1_guest_owned_cr0_bits (TS, WP) and
/// KVM_POSSIBLE_CR4_GUEST_BITS (PVI, DE, TSD, PGE, PCE, OSFXSR, OSXMMEXCPT, FSGSBASE).
public enum ControlRegisterBits {
    public static let cr0TS: UInt64 = 1 << 3
    public static let cr0WP: UInt64 = 1 << 16
    public static let cr4PGE: UInt64 = 1 << 7
    public static let kvmGuestOwnedCR0: UInt64 = cr0TS | cr0WP
    public static let kvmGuestOwnedCR4: UInt64 = 1 << 1 | 1 << 3 | 1 << 2 | cr4PGE | 1 << 8 | 1 << 9 | 1 << 10 | 1 << 16
    /// The guest/host masks a KVM runs its guest with (a set bit: the hypervisor owns it).
    public static let kvmCR0GuestHostMask: UInt64 = ~kvmGuestOwnedCR0
    public static let kvmCR4GuestHostMask: UInt64 = ~kvmGuestOwnedCR4
    /// The CR0 and CR4 values the guests here start with (64-bit paging, PAE, OSFXSR...).
    public static let initialCR0: UInt64 = 0x8005_0033
    public static let initialCR4: UInt64 = 0x0000_2020
}

public enum IOQualification {
    public static func make(port: UInt16, size: Int, isIn: Bool) -> UInt64 {
        UInt64(size - 1) | (isIn ? 1 << 3 : 0) | UInt64(port) << 16
    }
    public static func port(_ q: UInt64) -> UInt16 { UInt16(truncatingIfNeeded: q >> 16) }
    public static func size(_ q: UInt64) -> Int { Int(q & 7) + 1 }
    public static func isIn(_ q: UInt64) -> Bool { q & (1 << 3) != 0 }
}
