import ABI
import Foundation
import L0
import Transport

/// `pvm bench --suite memslot` (seeds/004): what deleting a memslot costs under each zap policy,
/// and what rebuilding the mappings L2 then touches costs. Run in-process on a real L0 vCPU over
/// real memfds (the cost is L0's own bookkeeping; no tier needs to run for it).
///
/// Scenarios, each with `fast` and `targeted`:
/// - "recreate 2 GiB": the ChromeOS pattern: a 2 GiB slot is deleted and re-created again and
///   again while 1 GiB of other memory stays mapped; L2 has touched `touchedPages` of each.
/// - "delete large": one very large slot (32 GiB, `largeTouchedPages` of it touched) goes.
public enum MemslotSuite {
    public struct Row: Sendable {
        public var scenario: String
        public var policy: MemslotZapPolicy
        public var deleteMicros: Double       // median
        public var entriesZapped: Int
        public var refaults: Int              // L2 exits to rebuild what L2 touches afterwards
        public var rebuildMillis: Double      // median
    }

    /// One in-process PV vCPU with negotiated features and an exit page.
    final class Rig {
        let control: ControlMemory
        let host: SharedRegion
        let vcpu: L0VCPU
        static let argumentPage = L1GPA(0x1000), exitPage = L1GPA(0x2000)

        init(hostBytes: UInt64, l2Limit: UInt64) throws {
            let layout = ControlLayout(vcpuCount: 1, l2AddressLimit: l2Limit)
            // In-process, nothing to share: private anonymous memory, no memfds.
            control = try ControlMemory.anonymous(layout: layout)
            host = try SharedRegion(anonymous: hostBytes)
            L0VCPU.initialize(control)
            var slots = L1Memslots(hostSize: hostBytes)
            try slots.add(MemorySlot(slot: 0, guestPhysAddr: L1GPA(0), memorySize: 1 << 30, hostOffset: HostOffset(0)))
            vcpu = L0VCPU(id: 0, path: .pv, control: control,
                              l1Memory: L1MemoryAccess(memslots: slots, host: HostMemory(region: host)))
            _ = hypercall(.negotiate, PVABIVersion.current.packed, PVFeatures.all.rawValue, Self.argumentPage.raw)
            _ = hypercall(.createVCPU, Self.exitPage.raw)
        }

        func hypercall(_ c: PVHypercall, _ a: UInt64 = 0, _ b: UInt64 = 0, _ d: UInt64 = 0, _ e: UInt64 = 0) -> UInt64 {
            vcpu.l1Run[register: .rax] = c.rawValue
            vcpu.l1Run[register: .rbx] = a; vcpu.l1Run[register: .rcx] = b
            vcpu.l1Run[register: .rdx] = d; vcpu.l1Run[register: .rsi] = e
            _ = vcpu.handleL1Exit(L1ExitInfo(reason: .vmcall, instructionLength: 3))
            return vcpu.l1Run[register: .rax]
        }

        /// L2 touches each page as its MMU would: an exit only where EPT02 has no entry.
        func touch(_ l2: L2GPA, pages: UInt64) -> Int {
            var exits = 0
            for p in 0..<pages {
                let gpa = l2 + p * pageSize
                if vcpu.ept02.translate(gpa) == nil {
                    exits += 1
                    _ = vcpu.handleL2Exit(L2ExitInfo(reason: .eptViolation, qualification: EPTViolationQualification.dataRead,
                                                     guestPhysicalAddress: gpa, instructionLength: 3, instructionInfo: 8))
                }
            }
            return exits
        }
    }


    /// `scale` divides the touched-page counts (1 for the real suite; tests use a larger one).
    /// `progress` is told each zap policy as its runs start (for a progress line).
    public static func run(rounds: Int = 5, scale: UInt64 = 1, progress: (MemslotZapPolicy) -> Void = { _ in }) throws -> [Row] {
        var rows: [Row] = []
        let touched = 65_536 / scale                     // 256 MiB of each slot
        for policy in MemslotZapPolicy.allCases {
            progress(policy)
            // The ChromeOS pattern.
            let rig = try Rig(hostBytes: 3 << 30, l2Limit: 4 << 30)
            rig.vcpu.memslotZapPolicy = policy
            _ = rig.hypercall(.mapGPARange, 0, 0, touched * pageSize, PVMapFlags.rwx)               // other memory
            _ = rig.touch(L2GPA(0), pages: touched)
            var deletes: [Double] = [], rebuilds: [Double] = []
            var zapped = 0, refaults = 0
            for _ in 0..<rounds {
                try rig.vcpu.createMemslot(MemorySlot(slot: 1, guestPhysAddr: L1GPA(2 << 30), memorySize: 2 << 30,
                                                      hostOffset: HostOffset(1 << 30)))
                _ = rig.hypercall(.mapGPARange, 1 << 30, 2 << 30, touched * pageSize, PVMapFlags.rwx)
                _ = rig.touch(L2GPA(1 << 30), pages: touched)
                let t0 = monotonicNanos()
                zapped = try rig.vcpu.deleteMemslot(1)
                deletes.append(Double(monotonicNanos() - t0) / 1000)
                let t1 = monotonicNanos()
                refaults = rig.touch(L2GPA(0), pages: touched)                   // the memory that stayed
                rebuilds.append(Double(monotonicNanos() - t1) / 1_000_000)
            }
            rows.append(Row(scenario: "recreate 2 GiB", policy: policy, deleteMicros: Median.of(deletes),
                            entriesZapped: zapped, refaults: refaults, rebuildMillis: Median.of(rebuilds)))
        }
        for policy in MemslotZapPolicy.allCases {
            // One very large slot (sparse: only what L2 touched is ever allocated).
            var deletes: [Double] = [], rebuilds: [Double] = []
            var zapped = 0, refaults = 0
            for _ in 0..<rounds {
                let rig = try Rig(hostBytes: (1 << 30) + (32 << 30), l2Limit: 4 << 30)
                rig.vcpu.memslotZapPolicy = policy
                try rig.vcpu.createMemslot(MemorySlot(slot: 1, guestPhysAddr: L1GPA(64 << 30), memorySize: 32 << 30,
                                                      hostOffset: HostOffset(1 << 30)))
                _ = rig.hypercall(.mapGPARange, 0, 0, touched * pageSize, PVMapFlags.rwx)
                _ = rig.touch(L2GPA(0), pages: touched)
                _ = rig.hypercall(.mapGPARange, 1 << 30, 64 << 30, 4 * touched * pageSize, PVMapFlags.rwx)
                _ = rig.touch(L2GPA(1 << 30), pages: 4 * touched)
                let t0 = monotonicNanos()
                zapped = try rig.vcpu.deleteMemslot(1)
                deletes.append(Double(monotonicNanos() - t0) / 1000)
                let t1 = monotonicNanos()
                refaults = rig.touch(L2GPA(0), pages: touched)
                rebuilds.append(Double(monotonicNanos() - t1) / 1_000_000)
            }
            rows.append(Row(scenario: "delete 32 GiB", policy: policy, deleteMicros: Median.of(deletes),
                            entriesZapped: zapped, refaults: refaults, rebuildMillis: Median.of(rebuilds)))
        }
        return rows
    }

    public static func table(_ rows: [Row]) -> String {
        var out = "scenario        policy     delete us  entries zapped  refaults after  rebuild ms\n"
        for r in rows {
            out += r.scenario.padding(toLength: 16, withPad: " ", startingAt: 0)
                + r.policy.rawValue.padding(toLength: 9, withPad: " ", startingAt: 0)
                + Report.pad(Report.fmt(r.deleteMicros, 1), 11, right: true)
                + Report.pad("\(r.entriesZapped)", 16, right: true)
                + Report.pad("\(r.refaults)", 16, right: true)
                + Report.pad(Report.fmt(r.rebuildMillis, 2), 12, right: true) + "\n"
        }
        return out
    }
}
