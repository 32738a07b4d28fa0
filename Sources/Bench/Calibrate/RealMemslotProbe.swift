import Foundation
import Transport

/// Memslot zapping on the real KVM (seeds/001, the ChromeOS pattern): the calibration guest's
/// VM gets two more memslots, "other" memory that stays and a "target" slot that is deleted and
/// created again; the guest touches every 4 KiB page of them (one byte store per page). Each
/// round deletes the target slot (timed: the ioctl), creates it again, and touches the target and
/// then the other memory again (timed per page: the refault cost, and whether the other memory
/// was zapped too), with the VM's binary statistics read around the delete.
public enum RealMemslotProbe {
    public struct Scenario: Sendable {
        public var name: String
        public var otherBytes: Int
        public var targetBytes: Int
        public var rounds: Int
        public init(name: String, otherBytes: Int, targetBytes: Int, rounds: Int) {
            self.name = name; self.otherBytes = otherBytes; self.targetBytes = targetBytes; self.rounds = rounds
        }
    }

    /// One round's figures (medians are taken over rounds by the caller).
    public struct Round: Sendable {
        public var deleteNanos: UInt64
        public var targetRefaultNanosPerPage: Double
        public var otherRetouchNanosPerPage: Double
        /// What the kernel says the delete did: statistic -> change across the delete ioctl.
        public var statsAcrossDelete: [String: Int64]
        /// The statistics just before the delete (instant ones like pages_4k say what was mapped).
        public var statsBeforeDelete: [String: UInt64]
    }

    public struct Result: Sendable {
        public var scenario: Scenario
        public var firstTouchNanosPerPage: Double
        /// Touching the other memory again with nothing deleted: what a page costs while mapped.
        public var otherMappedNanosPerPage: Double
        public var rounds: [Round]
    }

    // Guest-physical layout beyond the calibration guest's 2 MiB: the other memory at 1 GiB,
    // the target slot at 4 GiB; their page directories and the touch loop inside the 2 MiB.
    static let otherGPA: UInt64 = 1 << 30
    static let targetGPA: UInt64 = 4 << 30
    static let pageDirectories: UInt64 = 0x8000   // up to 8 PDs: 8 GiB of 2 MiB pages
    static let touchCode: UInt64 = 0x20000

    /// mov byte [rdi], al; add rdi, 0x1000; dec rsi; jnz (back 14 bytes); out donePort, al.
    static let touchLoop: [UInt8] = [0x88, 0x07, 0x48, 0x81, 0xC7, 0x00, 0x10, 0x00, 0x00, 0x48, 0xFF, 0xCE, 0x75, 0xF2,
                                     0xE6, UInt8(CalibrationGuest.donePort)]

    /// The statistics the result reports (VM-wide, from KVM_GET_STATS_FD).
    public static let reportedStats = ["mmu_shadow_zapped", "remote_tlb_flush", "remote_tlb_flush_requests", "pages_4k", "pages_2m", "mmu_unsync"]

    public static func run(_ s: Scenario, device: String = "/dev/kvm") throws -> Result {
        precondition(s.otherBytes % (2 << 20) == 0 && s.targetBytes % (2 << 20) == 0 && s.otherBytes <= 1 << 30
                     && s.targetBytes >= 2 << 20 && s.targetBytes <= 4 << 30,
                     "memslot probe sizes: 2 MiB multiples, other <= 1 GiB, target 2 MiB to 4 GiB")
        let kvm = try KVMDevice(path: device)
        let vm = try kvm.createVM(memoryBytes: CalibrationGuest.memoryBytes)
        let vcpu = try vm.createVCPU()
        let cpuid = try kvm.supportedCPUID()
        try vcpu.setCPUID(cpuid)
        try vcpu.setSystemState(CalibrationGuest.systemState)
        for (gpa, bytes) in CalibrationGuest.image { try vm.write(bytes, at: gpa) }
        try vm.write(touchLoop, at: touchCode)
        // Identity-map both regions with 2 MiB pages: a PD per GiB, linked from the PDPT.
        var nextPD = pageDirectories
        for (base, bytes) in [(otherGPA, s.otherBytes), (targetGPA, s.targetBytes)] where bytes > 0 {
            var gpa = base
            while gpa < base + UInt64(bytes) {
                let gib = gpa >> 30
                try vm.store64(nextPD | 0x3, at: CalibrationGuest.pdpt + gib * 8)
                for i in 0..<UInt64(512) where gib << 30 + i << 21 < base + UInt64(bytes) {
                    try vm.store64((gib << 30 + i << 21) | 0x83, at: nextPD + i * 8)   // present, writable, 2 MiB
                }
                nextPD += 0x1000
                gpa = (gib + 1) << 30
            }
        }
        let other = s.otherBytes > 0 ? try vm.addSlot(1, at: otherGPA, bytes: s.otherBytes) : nil
        let target = try vm.addSlot(2, at: targetGPA, bytes: s.targetBytes)

        func touch(_ base: UInt64, bytes: Int) throws -> UInt64 {
            var regs = KVMRegisters()
            regs.rip = touchCode
            regs.rdi = base
            regs.rsi = UInt64(bytes / 4096)
            regs.rax = 1
            regs.rsp = CalibrationGuest.stackTop
            regs.rflags = 0x2
            try vcpu.setRegisters(regs)
            let start = monotonicNanos()
            // Generous: 2 s plus 50 us a page.
            let exit = try vcpu.withTimeLimit(nanos: 2_000_000_000 + UInt64(bytes / 4096) * 50_000) { try vcpu.run() }
            let dt = monotonicNanos() - start
            guard case .io(port: CalibrationGuest.donePort, isOut: true, _, _, _) = exit else {
                throw CalibrationError.unexpectedExit(kind: .io, exit: exit, rip: (try? vcpu.registers().rip) ?? 0)
            }
            return dt
        }
        func stats() throws -> [String: UInt64] {
            var out: [String: UInt64] = [:]
            for st in try vm.stats() where reportedStats.contains(st.name) { out[st.name] = st.value }
            return out
        }
        let pages = Double(s.targetBytes / 4096)
        if let other { _ = try touch(other.guestPhysicalAddress, bytes: other.bytes) }
        let first = try touch(target.guestPhysicalAddress, bytes: target.bytes)
        let mapped = try other.map { Double(try touch($0.guestPhysicalAddress, bytes: $0.bytes)) / Double($0.bytes / 4096) } ?? 0
        var rounds: [Round] = []
        for _ in 0..<max(1, s.rounds) {
            let before = try stats()
            let t = monotonicNanos()
            try target.delete()
            let deleteNanos = monotonicNanos() - t
            let after = try stats()
            try target.create()
            let refault = try touch(target.guestPhysicalAddress, bytes: target.bytes)
            let retouch = try other.map { try touch($0.guestPhysicalAddress, bytes: $0.bytes) } ?? 0
            var delta: [String: Int64] = [:]
            for k in reportedStats where before[k] != nil || after[k] != nil {
                delta[k] = Int64(bitPattern: (after[k] ?? 0) &- (before[k] ?? 0))
            }
            rounds.append(Round(deleteNanos: deleteNanos, targetRefaultNanosPerPage: Double(refault) / pages,
                                otherRetouchNanosPerPage: other.map { Double(retouch) / Double($0.bytes / 4096) } ?? 0,
                                statsAcrossDelete: delta, statsBeforeDelete: before))
        }
        return Result(scenario: s, firstTouchNanosPerPage: Double(first) / pages, otherMappedNanosPerPage: mapped, rounds: rounds)
    }
}
