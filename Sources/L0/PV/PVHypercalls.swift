import ABI
import Transport

/// The PV ABI v1 hypercalls (docs/abi.md). Each validates everything before it changes anything,
/// so a refused call leaves every mapping, policy and table as it was.
extension L0VCPU {
    func handleHypercall(_ exit: GuestExit) -> L1ExitOutcome {
        let nr = l1Run[register: .rax]
        counters.hypercalls[nr, default: 0] += 1
        skipL1Instruction(exit)
        guard path == .pv, let call = PVHypercall(rawValue: nr) else {
            l1Run[register: .rax] = HypercallError.noSys.returnValue
            return .resumeL1
        }
        let a0 = l1Run[register: .rbx], a1 = l1Run[register: .rcx]
        let a2 = l1Run[register: .rdx], a3 = l1Run[register: .rsi]
        let result: Result<UInt64, HypercallError>
        if !pv.negotiated && !call.allowedBeforeNegotiation {
            result = .failure(.permission)
        } else if let f = call.feature, !pv.enabled.contains(f) {
            result = .failure(.notSupported)
        } else {
            switch call {
            case .getVersion: result = .success(PVABIVersion.current.packed)
            case .getFeatures: result = .success(pv.offered.rawValue)
            case .negotiate: result = hcNegotiate(version: PVABIVersion(packed: a0), features: a1, argumentPage: L1GPA(a2))
            case .setCPUID: result = hcSetCPUID(gpa: L1GPA(a0), count: a1)
            case .mapGPARange: result = hcMap(l2: L2GPA(a0), l1: L1GPA(a1), length: a2, flags: a3)
            case .unmapGPARange: result = hcUnmap(l2: L2GPA(a0), length: a1)
            case .mapGPABatch: result = hcMapBatch(count: a0)
            case .setMSRPolicy: result = hcSetMSRPolicy(count: a0)
            case .getMSRs: result = hcGetMSRs(count: a0)
            case .setMSRs: result = hcSetMSRs(count: a0)
            case .registerL0Ports: result = hcRegisterL0Ports(first: a0, count: a1, device: a2)
            case .createVCPU: result = hcCreateVCPU(exitPage: L1GPA(a0))
            case .enterL2:
                if case .failure(let e) = hcEnterL2() {
                    l1Run[register: .rax] = e.returnValue
                    return .resumeL1
                }
                return .enterL2
            }
        }
        switch result {
        case .success(let v): l1Run[register: .rax] = v
        case .failure(let e): l1Run[register: .rax] = e.returnValue
        }
        return .resumeL1
    }

    // MARK: discovery

    func hcNegotiate(version: PVABIVersion, features: UInt64, argumentPage: L1GPA) -> Result<UInt64, HypercallError> {
        guard !pv.negotiated else { return .failure(.invalid) }
        guard version.major == PVABIVersion.current.major else {
            pv.refusal = "L1 speaks PV ABI \(version), this L0 speaks \(PVABIVersion.current): majors differ"
            return .failure(.notSupported)
        }
        let wanted = PVFeatures(rawValue: features)
        guard wanted.isSubset(of: .known) else {
            pv.refusal = "unknown feature bits 0x\(String(features & ~PVFeatures.known.rawValue, radix: 16))"
            return .failure(.invalid)
        }
        guard wanted.isSubset(of: pv.offered) else {
            pv.refusal = "features \(wanted.subtracting(pv.offered)) are not offered"
            return .failure(.notSupported)
        }
        guard argumentPage.isPageAligned else { return .failure(.invalid) }
        guard (try? l1Memory.memslots.translate(argumentPage, length: PVArgumentPage.size)) != nil else { return .failure(.fault) }
        pv.negotiated = true
        pv.enabled = wanted
        pv.argumentPage = argumentPage
        return .success(0)
    }

    /// u64 at `offset` in the argument page.
    func argument(_ offset: UInt64) -> UInt64? {
        guard let page = pv.argumentPage, offset + 8 <= PVArgumentPage.size else { return nil }
        return try? l1Memory.load64(L1GPA(page.raw + offset))
    }
    func setArgument(_ offset: UInt64, _ v: UInt64) {
        guard let page = pv.argumentPage, offset + 8 <= PVArgumentPage.size else { return }
        try? l1Memory.store64(v, L1GPA(page.raw + offset))
    }

    // MARK: CPUID

    func hcSetCPUID(gpa: L1GPA, count: UInt64) -> Result<UInt64, HypercallError> {
        guard count <= PVState.maxCPUIDEntries else { return .failure(.tooBig) }
        var entries: [CPUIDEntry] = []
        for i in 0..<count {
            guard let base = gpa.adding(i * CPUIDEntry.byteSize),
                  let host = try? l1Memory.memslots.translate(base, length: CPUIDEntry.byteSize),
                  let bytes = try? l1Memory.host.readBytes(at: host, count: Int(CPUIDEntry.byteSize))
            else { return .failure(.fault) }
            let words = CPUIDEntry.wordOffsets.map { o in
                UInt32(bytes[Int(o)]) | UInt32(bytes[Int(o) + 1]) << 8 | UInt32(bytes[Int(o) + 2]) << 16 | UInt32(bytes[Int(o) + 3]) << 24
            }
            entries.append(CPUIDEntry(words: words))
        }
        pv.cpuid = CPUIDTable(entries)
        return .success(0)
    }

    // MARK: mapping

    /// A mapping that passed validation: where each page goes in host memory.
    struct ValidatedMapping {
        var mapping: PVMapping
        var hosts: [(host: HostOffset, memslot: UInt32)]
        var replace: Bool
    }

    /// Every rule of `mapGPARange`, without changing anything.
    func validateMapping(l2: L2GPA, l1: L1GPA, length: UInt64, flags: UInt64) -> Result<ValidatedMapping, HypercallError> {
        guard flags & ~PVMapFlags.known == 0, flags & PVMapFlags.rwx != 0 else { return .failure(.invalid) }
        // Write without read is an EPT misconfiguration (SDM 28.3.3.1): refuse it.
        guard flags & PVMapFlags.write == 0 || flags & PVMapFlags.read != 0 else { return .failure(.invalid) }
        guard l2.isPageAligned, l1.isPageAligned, length > 0, length % pageSize == 0 else { return .failure(.invalid) }
        guard let l2Range = AddressRange(start: l2, length: length), AddressRange(start: l1, length: length) != nil
        else { return .failure(.invalid) }
        guard l2Range.end.raw <= ept02.addressLimit else { return .failure(.invalid) }
        let replace = flags & PVMapFlags.replace != 0
        guard replace || pv.map.overlapping(l2Range).isEmpty else { return .failure(.invalid) }
        // Translate every page first: the range may span memslots, and must lie inside them.
        var hosts: [(host: HostOffset, memslot: UInt32)] = []
        hosts.reserveCapacity(Int(length / pageSize))
        var off: UInt64 = 0
        while off < length {
            let gpa = L1GPA(l1.raw + off)
            guard let h = try? l1Memory.memslots.translate(gpa, length: pageSize),
                  let slot = l1Memory.memslots.slot(containing: gpa) else { return .failure(.fault) }
            // Writable L2 mappings of read-only L1 memory are refused (KVM_MEM_READONLY).
            if flags & PVMapFlags.write != 0, slot.flags & MemorySlot.readOnlyFlag != 0 { return .failure(.permission) }
            hosts.append((h, slot.slot))
            off += pageSize
        }
        return .success(ValidatedMapping(mapping: PVMapping(l2: l2Range, l1: l1, permissions: flags & PVMapFlags.rwx),
                                         hosts: hosts, replace: replace))
    }

    func apply(_ v: ValidatedMapping) {
        if v.replace { pv.map.remove(v.mapping.l2) }
        for (i, h) in v.hosts.enumerated() {
            ept02.install(L2GPA(v.mapping.l2.start.raw + UInt64(i) * pageSize), host: h.host, permissions: v.mapping.permissions,
                          memslot: h.memslot)
        }
        counters.ept02Fills += UInt64(v.hosts.count)
        pv.map.insert(v.mapping)
    }

    func hcMap(l2: L2GPA, l1: L1GPA, length: UInt64, flags: UInt64) -> Result<UInt64, HypercallError> {
        validateMapping(l2: l2, l1: l1, length: length, flags: flags).map { apply($0); return 0 }
    }

    /// Many ranges from the argument page, all or nothing: ranges may not overlap each other.
    func hcMapBatch(count: UInt64) -> Result<UInt64, HypercallError> {
        guard count > 0 else { return .failure(.invalid) }
        guard count <= PVMapBatchEntry.maxPerCall else { return .failure(.tooBig) }
        var validated: [ValidatedMapping] = []
        for i in 0..<count {
            let base = i * PVMapBatchEntry.size
            guard let l2 = argument(base + PVMapBatchEntry.l2GPA), let l1 = argument(base + PVMapBatchEntry.l1GPA),
                  let len = argument(base + PVMapBatchEntry.length), let flags = argument(base + PVMapBatchEntry.flags)
            else { return .failure(.fault) }
            switch validateMapping(l2: L2GPA(l2), l1: L1GPA(l1), length: len, flags: flags) {
            case .failure(let e): return .failure(e)
            case .success(let v):
                if validated.contains(where: { $0.mapping.l2.overlaps(v.mapping.l2) }) { return .failure(.invalid) }
                validated.append(v)
            }
        }
        for v in validated { apply(v) }
        return .success(0)
    }

    /// Removes a range; takes effect (EPT02 cleared, for every L2 vCPU) before returning.
    func hcUnmap(l2: L2GPA, length: UInt64) -> Result<UInt64, HypercallError> {
        guard l2.isPageAligned, length > 0, length % pageSize == 0,
              let r = AddressRange(start: l2, length: length) else { return .failure(.invalid) }
        guard !pv.map.overlapping(r).isEmpty else { return .failure(.invalid) }
        pv.map.remove(r)
        ept02.remove(l2, length: length)
        return .success(0)
    }

    // MARK: MSRs

    func hcSetMSRPolicy(count: UInt64) -> Result<UInt64, HypercallError> {
        guard count <= PVMSRPolicyEntry.maxPerCall else { return .failure(.tooBig) }
        var parsed: [(UInt32, MSRPolicy, UInt64)] = []
        for i in 0..<count {
            let base = i * PVMSRPolicyEntry.size
            guard let head = argument(base + PVMSRPolicyEntry.index), let value = argument(base + PVMSRPolicyEntry.value),
                  let mask = argument(base + PVMSRPolicyEntry.writableMask) else { return .failure(.fault) }
            guard let action = PVMSRAction(rawValue: UInt32(truncatingIfNeeded: head >> 32)) else { return .failure(.invalid) }
            let msr = UInt32(truncatingIfNeeded: head)
            if action == .passthrough && PassthroughMSRs.slot(of: msr) == nil { return .failure(.invalid) }
            parsed.append((msr, MSRPolicy(action: action, writableMask: mask), value))
        }
        for (msr, policy, value) in parsed {
            pv.msrPolicy[msr] = policy
            let direct = policy.action == .passthrough
            setL2Intercept(msr, write: false, !direct)
            setL2Intercept(msr, write: true, !direct)
            switch policy.action {
            case .emulate: l0MSRs[msr] = value
            case .passthrough: setL2PassthroughMSR(msr, value)
            case .passToL1, .injectGP: l0MSRs[msr] = nil
            }
        }
        return .success(0)
    }

    /// kvm_msr_entry[] in the argument page: fills `data` for each MSR L0 emulates, in order,
    /// stopping at the first it does not (KVM_GET_MSRS's convention). Returns how many it filled.
    func hcGetMSRs(count: UInt64) -> Result<UInt64, HypercallError> {
        guard count <= KVMMSREntry.maxPerCall else { return .failure(.tooBig) }
        for i in 0..<count {
            let base = i * KVMMSREntry.size
            guard let head = argument(base + KVMMSREntry.index) else { return .failure(.fault) }
            let msr = UInt32(truncatingIfNeeded: head)
            switch pv.msrPolicy[msr]?.action {
            case .emulate: setArgument(base + KVMMSREntry.data, l0MSRs[msr] ?? 0)
            case .passthrough: setArgument(base + KVMMSREntry.data, l2PassthroughMSR(msr) ?? 0)
            default: return .success(i)
            }
        }
        return .success(count)
    }

    /// The reverse of getMSRs (restoring a migrated vCPU): no writable-mask check, L1 is privileged.
    func hcSetMSRs(count: UInt64) -> Result<UInt64, HypercallError> {
        guard count <= KVMMSREntry.maxPerCall else { return .failure(.tooBig) }
        for i in 0..<count {
            let base = i * KVMMSREntry.size
            guard let head = argument(base + KVMMSREntry.index), let data = argument(base + KVMMSREntry.data) else { return .failure(.fault) }
            let msr = UInt32(truncatingIfNeeded: head)
            switch pv.msrPolicy[msr]?.action {
            case .emulate: l0MSRs[msr] = data
            case .passthrough: setL2PassthroughMSR(msr, data)
            default: return .success(i)
            }
        }
        return .success(count)
    }

    // MARK: ports, vCPU

    func hcRegisterL0Ports(first: UInt64, count: UInt64, device: UInt64) -> Result<UInt64, HypercallError> {
        guard let kind = PVL0Device(rawValue: device), l0Devices.register(first: first, count: count, device: kind) else {
            return .failure(.invalid)
        }
        return .success(0)
    }

    func hcCreateVCPU(exitPage: L1GPA) -> Result<UInt64, HypercallError> {
        do { try vm.checkMayRunPVNestedGuest() } catch {
            pv.refusal = "\(error)"
            return .failure(.permission)
        }
        guard !pv.vcpuCreated else { return .failure(.invalid) }
        guard exitPage.isPageAligned else { return .failure(.invalid) }
        guard (try? l1Memory.memslots.translate(exitPage, length: RunPage.size)) != nil else { return .failure(.fault) }
        pv.exitPageGPA = exitPage
        l2Requested = true
        return .success(UInt64(id))
    }

    /// Loads L2's registers (and any event L1 injects) from the PV exit page.
    func hcEnterL2() -> Result<Void, HypercallError> {
        guard let gpa = pv.exitPageGPA,
              let page = try? l1Memory.host.runPage(at: l1Memory.memslots.translate(gpa, length: RunPage.size))
        else { return .failure(.invalid) }
        for r in Register.allCases { l2Run[register: r] = page[register: r] }
        l2Run[RunPage.eventInjection] = page[RunPage.eventInjection]
        l2Run[RunPage.eventErrorCode] = page[RunPage.eventErrorCode]
        page[RunPage.eventInjection] = 0
        return .success(())
    }
}
