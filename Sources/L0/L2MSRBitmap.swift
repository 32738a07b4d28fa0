import ABI
import Transport

/// L2's MSR bitmap and pass-through MSR values: what the hardware would use while L2 runs
/// (vmcs02's MSR bitmap, and the MSRs themselves). L0 writes both; L2's CPU reads them, and
/// accesses a pass-through MSR without an exit.
extension L0VCPU {
    var msrBitmapBase: UInt64 { nested.l2MSRBitmap }

    /// Sets whether L2's access to `msr` exits.
    func setL2Intercept(_ msr: UInt32, write: Bool, _ intercept: Bool) {
        guard let (byte, bit) = MSRBitmap.position(of: msr, write: write) else { return }
        let at = msrBitmapBase + byte
        let old = nested.control.unchecked(load: UInt8.self, at: at)
        nested.control.unchecked(store: intercept ? old | (1 << bit) : old & ~(1 << bit), at: at)
    }

    /// nested_vmx_prepare_msr_bitmap: an MSR passes through to L2 only where L0 and L1 both let it.
    func mergeL2MSRBitmap(_ v: VMCSImage) {
        let l1Bitmap = v[.cpuBasedVMExecControl] & CPUBased.useMSRBitmaps != 0 ? L1GPA(v[.msrBitmap]) : nil
        for msr in PassthroughMSRs.all {
            for write in [false, true] {
                var l1Intercepts = true
                if let base = l1Bitmap, let (byte, bit) = MSRBitmap.position(of: msr, write: write),
                   let at = base.adding(byte), let host = try? l1Memory.memslots.translate(at),
                   let b: UInt8 = try? l1Memory.host.load(at: host) {
                    l1Intercepts = b & (1 << bit) != 0
                }
                setL2Intercept(msr, write: write, l1Intercepts)
            }
        }
        counters.msrBitmapMerges += 1
    }

    /// The value of a pass-through MSR as L2 has it.
    func l2PassthroughMSR(_ msr: UInt32) -> UInt64? {
        PassthroughMSRs.slot(of: msr).map { nested.control.unchecked(load: UInt64.self, at: nested.l2MSRValues + $0) }
    }
    func setL2PassthroughMSR(_ msr: UInt32, _ value: UInt64) {
        guard let slot = PassthroughMSRs.slot(of: msr) else { return }
        nested.control.unchecked(store: value, at: nested.l2MSRValues + slot)
    }
}
