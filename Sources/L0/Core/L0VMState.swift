import ABI
import GuestDevices
import Transport

/// What every vCPU of one VM shares in L0, as KVM keeps it in `struct kvm` rather than in each
/// `kvm_vcpu`: L1's memory and memslots, L0's in-kernel devices, the VM handle and its memslot
/// zap policy. The vCPUs of a stack hold the same object (L0's vCPU loop runs them on one
/// thread, so nothing here needs a lock).
public final class L0VMState {
    public var l1Memory: L1MemoryAccess
    /// L1's VM: its type and capability booleans (the PV path needs one without protected state).
    public var vm = VMHandle(id: 0, type: .default)
    /// How deleting or moving one of L1's memslots drops derived mappings (KVM's default: fast).
    public var memslotZapPolicy: MemslotZapPolicy = .fast
    /// Devices L0 runs on ports (its in-kernel devices): fixed on nvmx, registered by L1 on pv.
    public var l0Devices = L0Devices()
    /// The local APICs L0 runs, one per vCPU: L2's on single, and on pv when L1 enabled
    /// `directAPIC`; nil where another tier runs them (L1 for its L2 on nvmx).
    public var apics: LocalAPICs?
    /// The tier whose local APICs those are: L2 (single, pv), or L1 (nvmx: L1's own APICs,
    /// while L1 runs its L2's).
    public var apicTier: Tier = .l2
    /// Halted vCPUs an interrupt woke while L0 handled another vCPU's exit: the loop enters
    /// them after that exit (`L0Stack.run`).
    public var wakeups: [Int] = []
    /// Whether each vCPU's guest tier holds its turn now (in guest mode, as KVM's vcpu->mode
    /// says): only such a target needs a kick to see an interrupt. Kept by the loop.
    public var inGuestMode: [Bool] = []
    /// Each vCPU's steal-time area (`KVMStealTime`), as its guest registered it: a guest GPA,
    /// translated through EPT02 at every use (the guest may unmap it).
    public var stealTime: [L2GPA?] = []
    /// L2's flush hypercall: for each vCPU waiting in it, the vCPUs it kicked that have not yet
    /// left guest mode. One entry per sender at most (bounded by the vCPU count).
    public var flushWaits: [Int: Set<Int>] = [:]
    /// Every vCPU's backend, for what one vCPU does to the whole VM (a memslot deleted: each
    /// backend drops what it derived, pvm-rfc's switcher view of its own area included).
    public var backends: [any NestingBackend] = []

    public init(l1Memory: L1MemoryAccess) {
        self.l1Memory = l1Memory
    }
}
