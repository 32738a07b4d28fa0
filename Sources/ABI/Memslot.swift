import CPVMShim

/// How deleting or moving a memslot drops the mappings derived from it (seeds/004).
public enum MemslotZapPolicy: String, Sendable, CaseIterable {
    /// Invalidate every mapping at once (a generation bump) and rebuild lazily as L2 touches memory.
    case fast
    /// Remove only the mappings of that slot (through a reverse map); the rest stay.
    case targeted
}

/// One slot of L1 memory, in the shape of `struct kvm_userspace_memory_region`: L1 GPAs
/// [guestPhysAddr, +memorySize) are backed by host memory at `hostOffset` (the field KVM calls
/// userspace_addr; here the "userspace" is the host memfd every tier maps).
public struct MemorySlot: Hashable, Sendable, CustomStringConvertible {
    public var slot: UInt32
    public var flags: UInt32
    public var guestPhysAddr: L1GPA
    public var memorySize: UInt64
    public var hostOffset: HostOffset

    public init(slot: UInt32, flags: UInt32 = 0, guestPhysAddr: L1GPA, memorySize: UInt64, hostOffset: HostOffset) {
        self.slot = slot
        self.flags = flags
        self.guestPhysAddr = guestPhysAddr
        self.memorySize = memorySize
        self.hostOffset = hostOffset
    }

    public init(_ r: kvm_userspace_memory_region) {
        self.init(slot: r.slot, flags: r.flags, guestPhysAddr: L1GPA(r.guest_phys_addr),
                  memorySize: r.memory_size, hostOffset: HostOffset(r.userspace_addr))
    }

    public var uapi: kvm_userspace_memory_region {
        kvm_userspace_memory_region(slot: slot, flags: flags, guest_phys_addr: guestPhysAddr.raw,
                                    memory_size: memorySize, userspace_addr: hostOffset.raw)
    }

    /// The L1 GPAs the slot covers (empty if its fields would wrap; `L1Memslots.add` refuses that).
    public var guestRange: AddressRange<L1GPA> {
        AddressRange(start: guestPhysAddr, length: memorySize) ?? AddressRange(start: guestPhysAddr, length: 0)!
    }

    /// KVM_MEM_READONLY from <linux/kvm.h>.
    public static let readOnlyFlag = UInt32(KVM_MEM_READONLY)
    /// This project's flag (not in <linux/kvm.h>): when the slot is deleted or moved, zap only
    /// its own mappings instead of the VM's zap policy (seeds/004: a per-memslot choice).
    public static let targetedZapFlag: UInt32 = 1 << 16
    public static let knownFlags: UInt32 = readOnlyFlag | targetedZapFlag

    public var description: String {
        "slot \(slot): L1 GPA 0x\(String(guestPhysAddr.raw, radix: 16)) +0x\(String(memorySize, radix: 16)) -> host 0x\(String(hostOffset.raw, radix: 16))"
    }
}

/// A CPUID entry exactly as `struct kvm_cpuid_entry2` (<asm/kvm.h>) lays it out, so L1 can
/// hand L0 the same array it would hand KVM_SET_CPUID2.
public struct CPUIDEntry: Hashable, Sendable {
    public var function: UInt32
    public var index: UInt32
    public var flags: UInt32
    public var eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32

    public init(function: UInt32, index: UInt32 = 0, flags: UInt32 = 0,
                eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32) {
        self.function = function; self.index = index; self.flags = flags
        self.eax = eax; self.ebx = ebx; self.ecx = ecx; self.edx = edx
    }

    /// KVM_CPUID_FLAG_SIGNIFCANT_INDEX (sic, the header's spelling).
    public static let significantIndex = UInt32(KVM_CPUID_FLAG_SIGNIFCANT_INDEX)
    public static let byteSize = UInt64(MemoryLayout<kvm_cpuid_entry2>.size)
    /// Byte offsets of function, index, flags, eax, ebx, ecx, edx, read from the C struct itself.
    public static let wordOffsets: [UInt64] = [
        MemoryLayout<kvm_cpuid_entry2>.offset(of: \.function)!, MemoryLayout<kvm_cpuid_entry2>.offset(of: \.index)!,
        MemoryLayout<kvm_cpuid_entry2>.offset(of: \.flags)!, MemoryLayout<kvm_cpuid_entry2>.offset(of: \.eax)!,
        MemoryLayout<kvm_cpuid_entry2>.offset(of: \.ebx)!, MemoryLayout<kvm_cpuid_entry2>.offset(of: \.ecx)!,
        MemoryLayout<kvm_cpuid_entry2>.offset(of: \.edx)!,
    ].map { UInt64($0) }
    /// The members in `wordOffsets` order.
    public var words: [UInt32] { [function, index, flags, eax, ebx, ecx, edx] }
    public init(words w: [UInt32]) {
        self.init(function: w[0], index: w[1], flags: w[2], eax: w[3], ebx: w[4], ecx: w[5], edx: w[6])
    }

    public var matchesIndex: Bool { flags & Self.significantIndex != 0 }
}
