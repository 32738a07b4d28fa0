/// Whether a VM may run a PV-nested L2 (seeds/003's stated limit). The PV ABI works because L0
/// answers L2's exits itself (CPUID, MSRs, ports) and maps L2's memory on L1's behalf: L0 reads
/// and writes L2's register state and L1's memory. In a protected-state L1 (SEV-ES, SNP, TDX) the
/// whole point is that L0 can do neither: L0 is outside the TCB and must stay there. So the host
/// refuses, with the reason, instead of building an L2 it could only run by breaking that.
extension VMHandle {
    public var mayRunPVNestedGuest: Bool { !hasProtectedState }

    /// Throws `HostError.pvNestingRefused` when `mayRunPVNestedGuest` is false; the error's
    /// description says why (protected state, TCB). For the PV `createVCPU` hypercall.
    public func checkMayRunPVNestedGuest() throws(HostError) {
        guard mayRunPVNestedGuest else { throw .pvNestingRefused(vm: id, type: type) }
    }
}

/// Whether a VM may run nested VMX. A TDX guest has no VMX: the TDX module does not virtualize
/// it, so the guest's VMXON is #UD and KVM's nested VMX cannot run inside it.
extension VMHandle {
    public var mayRunNestedVMX: Bool { type != .tdx }

    /// Throws `HostError.nestedVMXRefused` when `mayRunNestedVMX` is false.
    public func checkMayRunNestedVMX() throws(HostError) {
        guard mayRunNestedVMX else { throw .nestedVMXRefused(vm: id, type: type) }
    }
}
