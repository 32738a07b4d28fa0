import ABI
import Transport

/// The PV ABI v1 hypercalls (docs/abi.md). Each validates everything before it changes anything,
/// so a refused call leaves every mapping, policy and table as it was.
extension PVBackend {
    /// VMCALL from L1: number in RAX, arguments in RBX, RCX, RDX, RSI; the result in RAX.
    func hypercall(_ nr: UInt64, _ args: HypercallArguments, _ exit: L1Exit, _ regs: inout RegisterFile, _ vcpu: L0VCPU) -> NextStep {
        vcpu.counters.hypercalls.record(nr)
        regs.skipInstruction(length: exit.info.instructionLength)
        guard let call = PVHypercall(rawValue: nr) else {
            regs[.rax] = HypercallError.noSys.returnValue
            return .resume(.l1)
        }
        let (a0, a1, a2, a3) = (args.a0, args.a1, args.a2, args.a3)
        let result: Result<UInt64, HypercallError>
        if !negotiated && !call.allowedBeforeNegotiation {
            result = .failure(.permission)
        } else if let f = call.feature, !enabled.contains(f) {
            result = .failure(.notSupported)
        } else {
            switch call {
            case .getVersion: result = .success(PVABIVersion.current.packed)
            case .getFeatures: result = .success(offered.rawValue)
            case .negotiate: result = hcNegotiate(version: PVABIVersion(packed: a0), features: a1, argumentPage: L1GPA(a2), vcpu)
            case .setCPUID: result = hcSetCPUID(gpa: L1GPA(a0), count: a1, vcpu)
            case .mapGPARange: result = hcMap(l2: L2GPA(a0), l1: L1GPA(a1), length: a2, flags: a3, vcpu)
            case .unmapGPARange: result = hcUnmap(l2: L2GPA(a0), length: a1, vcpu)
            case .mapGPABatch: result = hcMapBatch(count: a0, vcpu)
            case .setMSRPolicy: result = hcSetMSRPolicy(count: a0, vcpu)
            case .getMSRs: result = hcGetMSRs(count: a0, vcpu)
            case .setMSRs: result = hcSetMSRs(count: a0, vcpu)
            case .registerL0Ports: result = hcRegisterL0Ports(first: a0, count: a1, device: a2, vcpu)
            case .createVCPU: result = hcCreateVCPU(exitPage: L1GPA(a0), vcpu)
            case .enterL2:
                if case .failure(let e) = hcEnterL2(vcpu) {
                    regs[.rax] = e.returnValue
                    return .resume(.l1)
                }
                vcpu.counters.pvEntries += 1
                return .enterL2
            }
        }
        switch result {
        case .success(let v): regs[.rax] = v
        case .failure(let e): regs[.rax] = e.returnValue
        }
        return .resume(.l1)
    }

    // MARK: discovery

    func hcNegotiate(version: PVABIVersion, features: UInt64, argumentPage: L1GPA, _ vcpu: L0VCPU) -> Result<UInt64, HypercallError> {
        guard !negotiated else { return .failure(.invalid) }
        guard version.major == PVABIVersion.current.major else {
            refusal = .majorVersion(l1: version, l0: .current)
            return .failure(.notSupported)
        }
        let wanted = PVFeatures(rawValue: features)
        guard wanted.isSubset(of: .known) else {
            refusal = .unknownFeatures(features & ~PVFeatures.known.rawValue)
            return .failure(.invalid)
        }
        guard wanted.isSubset(of: offered) else {
            refusal = .notOffered(wanted.subtracting(offered))
            return .failure(.notSupported)
        }
        guard argumentPage.isPageAligned else { return .failure(.invalid) }
        guard (try? vcpu.l1Memory.memslots.translate(argumentPage, length: PVArgumentPage.size)) != nil else { return .failure(.fault) }
        negotiated = true
        enabled = wanted
        self.argumentPage = argumentPage
        return .success(0)
    }

    /// u64 at `offset` in the argument page (nil beyond the page or outside L1's memory).
    func argument(_ offset: UInt64, _ vcpu: L0VCPU) -> UInt64? {
        guard let page = argumentPage, offset <= PVArgumentPage.size - 8 else { return nil }
        return try? vcpu.l1Memory.load64(page + offset)
    }
    func setArgument(_ offset: UInt64, _ v: UInt64, _ vcpu: L0VCPU) {
        guard let page = argumentPage, offset <= PVArgumentPage.size - 8 else { return }
        try? vcpu.l1Memory.store64(v, page + offset)
    }

    // MARK: CPUID

    func hcSetCPUID(gpa: L1GPA, count: UInt64, _ vcpu: L0VCPU) -> Result<UInt64, HypercallError> {
        guard count <= Self.maxCPUIDEntries else { return .failure(.tooBig) }
        var entries: [CPUIDEntry] = []
        for i in 0..<count {
            guard let base = gpa.adding(i * CPUIDEntry.byteSize),
                  let host = try? vcpu.l1Memory.memslots.translate(base, length: CPUIDEntry.byteSize),
                  let bytes = try? vcpu.l1Memory.host.readBytes(at: host, count: Int(CPUIDEntry.byteSize))
            else { return .failure(.fault) }
            let words = CPUIDEntry.wordOffsets.map { o in
                UInt32(bytes[Int(o)]) | UInt32(bytes[Int(o) + 1]) << 8 | UInt32(bytes[Int(o) + 2]) << 16 | UInt32(bytes[Int(o) + 3]) << 24
            }
            entries.append(CPUIDEntry(words: words))
        }
        cpuid = CPUIDTable(entries)
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
    func validateMapping(l2: L2GPA, l1: L1GPA, length: UInt64, flags: UInt64, _ vcpu: L0VCPU) -> Result<ValidatedMapping, HypercallError> {
        guard flags & ~PVMapFlags.known == 0, flags & PVMapFlags.rwx != 0 else { return .failure(.invalid) }
        // Write without read is an EPT misconfiguration (SDM 28.3.3.1): refuse it.
        guard flags & PVMapFlags.write == 0 || flags & PVMapFlags.read != 0 else { return .failure(.invalid) }
        guard l2.isPageAligned, l1.isPageAligned, length > 0, length % pageSize == 0 else { return .failure(.invalid) }
        guard let l2Range = AddressRange(start: l2, length: length), let l1Range = AddressRange(start: l1, length: length)
        else { return .failure(.invalid) }
        guard l2Range.end <= vcpu.ept02.addressLimit else { return .failure(.invalid) }
        let replace = flags & PVMapFlags.replace != 0
        guard replace || map.overlapping(l2Range).isEmpty else { return .failure(.invalid) }
        // Translate every page first: the range may span memslots, and must lie inside them.
        var hosts: [(host: HostOffset, memslot: UInt32)] = []
        // `length` is L1's: reserve for what could really be mapped, not for what it claims.
        hosts.reserveCapacity(Int(min(length / pageSize, 1 << 16)))
        for gpa in l1Range.pages {
            guard let h = try? vcpu.l1Memory.memslots.translate(gpa, length: pageSize),
                  let slot = vcpu.l1Memory.memslots.slot(containing: gpa) else { return .failure(.fault) }
            // Writable L2 mappings of read-only L1 memory are refused (KVM_MEM_READONLY).
            if flags & PVMapFlags.write != 0, slot.flags & MemorySlot.readOnlyFlag != 0 { return .failure(.permission) }
            hosts.append((h, slot.slot))
        }
        return .success(ValidatedMapping(mapping: PVMapping(l2: l2Range, l1: l1, permissions: flags & PVMapFlags.rwx),
                                         hosts: hosts, replace: replace))
    }

    /// The most ranges a validated mapping can add to the PV map: itself, plus what a replace
    /// does to the ranges it clears (a split +1, each range covered whole -1).
    func growth(_ v: ValidatedMapping) -> Int { 1 + (v.replace ? map.change(clearing: v.mapping.l2) : 0) }

    func apply(_ v: ValidatedMapping, _ vcpu: L0VCPU) {
        if v.replace { map.remove(v.mapping.l2) }
        for (page, h) in zip(v.mapping.l2.pages, v.hosts) {
            vcpu.ept02.install(page, host: h.host, permissions: v.mapping.permissions, memslot: h.memslot)
        }
        vcpu.counters.ept02Fills += UInt64(v.hosts.count)
        map.insert(v.mapping)
    }

    func hcMap(l2: L2GPA, l1: L1GPA, length: UInt64, flags: UInt64, _ vcpu: L0VCPU) -> Result<UInt64, HypercallError> {
        return validateMapping(l2: l2, l1: l1, length: length, flags: flags, vcpu).flatMap { v in
            guard map.hasRoom(for: growth(v)) else { return .failure(.tooBig) }
            apply(v, vcpu)
            return .success(0)
        }
    }

    /// Many ranges from the argument page, all or nothing: ranges may not overlap each other.
    func hcMapBatch(count: UInt64, _ vcpu: L0VCPU) -> Result<UInt64, HypercallError> {
        guard count > 0 else { return .failure(.invalid) }
        guard count <= PVMapBatchEntry.maxPerCall else { return .failure(.tooBig) }
        var validated: [ValidatedMapping] = []
        for i in 0..<count {
            let base = i * PVMapBatchEntry.size
            guard let l2 = argument(base + PVMapBatchEntry.l2GPA, vcpu), let l1 = argument(base + PVMapBatchEntry.l1GPA, vcpu),
                  let len = argument(base + PVMapBatchEntry.length, vcpu), let flags = argument(base + PVMapBatchEntry.flags, vcpu)
            else { return .failure(.fault) }
            switch validateMapping(l2: L2GPA(l2), l1: L1GPA(l1), length: len, flags: flags, vcpu) {
            case .failure(let e): return .failure(e)
            case .success(let v):
                if validated.contains(where: { $0.mapping.l2.overlaps(v.mapping.l2) }) { return .failure(.invalid) }
                validated.append(v)
            }
        }
        guard map.hasRoom(for: validated.reduce(0) { $0 + growth($1) }) else { return .failure(.tooBig) }
        for v in validated { apply(v, vcpu) }
        return .success(0)
    }

    /// Removes a range; takes effect (EPT02 cleared, for every L2 vCPU) before returning.
    func hcUnmap(l2: L2GPA, length: UInt64, _ vcpu: L0VCPU) -> Result<UInt64, HypercallError> {
        guard l2.isPageAligned, length > 0, length % pageSize == 0,
              let r = AddressRange(start: l2, length: length) else { return .failure(.invalid) }
        guard !map.overlapping(r).isEmpty else { return .failure(.invalid) }
        guard map.hasRoom(for: map.change(clearing: r)) else { return .failure(.tooBig) }
        map.remove(r)
        vcpu.ept02.remove(r)
        return .success(0)
    }

    // MARK: MSRs

    func hcSetMSRPolicy(count: UInt64, _ vcpu: L0VCPU) -> Result<UInt64, HypercallError> {
        guard count <= PVMSRPolicyEntry.maxPerCall else { return .failure(.tooBig) }
        var parsed: [(UInt32, MSRPolicy, UInt64)] = []
        for i in 0..<count {
            let base = i * PVMSRPolicyEntry.size
            guard let head = argument(base + PVMSRPolicyEntry.index, vcpu), let value = argument(base + PVMSRPolicyEntry.value, vcpu),
                  let mask = argument(base + PVMSRPolicyEntry.writableMask, vcpu) else { return .failure(.fault) }
            guard let action = PVMSRAction(rawValue: UInt32(truncatingIfNeeded: head >> 32)) else { return .failure(.invalid) }
            let msr = UInt32(truncatingIfNeeded: head)
            if action == .passthrough && !PassthroughMSRs.contains(msr) { return .failure(.invalid) }
            parsed.append((msr, MSRPolicy(action: action, writableMask: mask), value))
        }
        // L1 picks the MSR numbers: the table holds at most `maxMSRPolicies` of them.
        let added = Set(parsed.map(\.0)).subtracting(msrPolicy.keys).count
        guard msrPolicy.count + added <= PVMSRPolicyEntry.maxPolicies else { return .failure(.tooBig) }
        for (msr, policy, value) in parsed {
            msrPolicy[msr] = policy
            vcpu.setL2Intercept(msr, policy.action != .passthrough)
            switch policy.action {
            case .emulate: vcpu.l0MSRs[msr] = value
            case .passthrough: vcpu.l2PassthroughMSRs[msr] = value
            case .passToL1, .injectGP: vcpu.l0MSRs[msr] = nil
            }
        }
        return .success(0)
    }

    /// kvm_msr_entry[] in the argument page: fills `data` for each MSR L0 emulates, in order,
    /// stopping at the first it does not (KVM_GET_MSRS's convention). Returns how many it filled.
    func hcGetMSRs(count: UInt64, _ vcpu: L0VCPU) -> Result<UInt64, HypercallError> {
        guard count <= KVMMSREntry.maxPerCall else { return .failure(.tooBig) }
        for i in 0..<count {
            let base = i * KVMMSREntry.size
            guard let head = argument(base + KVMMSREntry.index, vcpu) else { return .failure(.fault) }
            let msr = UInt32(truncatingIfNeeded: head)
            switch msrPolicy[msr]?.action {
            case .emulate: setArgument(base + KVMMSREntry.data, vcpu.l0MSRs[msr] ?? 0, vcpu)
            case .passthrough: setArgument(base + KVMMSREntry.data, vcpu.l2PassthroughMSRs[msr] ?? 0, vcpu)
            default: return .success(i)
            }
        }
        return .success(count)
    }

    /// The reverse of getMSRs (restoring a migrated vCPU): no writable-mask check, L1 is privileged.
    func hcSetMSRs(count: UInt64, _ vcpu: L0VCPU) -> Result<UInt64, HypercallError> {
        guard count <= KVMMSREntry.maxPerCall else { return .failure(.tooBig) }
        for i in 0..<count {
            let base = i * KVMMSREntry.size
            guard let head = argument(base + KVMMSREntry.index, vcpu), let data = argument(base + KVMMSREntry.data, vcpu) else { return .failure(.fault) }
            let msr = UInt32(truncatingIfNeeded: head)
            switch msrPolicy[msr]?.action {
            case .emulate: vcpu.l0MSRs[msr] = data
            case .passthrough: vcpu.l2PassthroughMSRs[msr] = data
            default: return .success(i)
            }
        }
        return .success(count)
    }

    // MARK: ports, vCPU

    func hcRegisterL0Ports(first: UInt64, count: UInt64, device: UInt64, _ vcpu: L0VCPU) -> Result<UInt64, HypercallError> {
        guard let kind = PVL0Device(rawValue: device), vcpu.l0Devices.register(first: first, count: count, device: kind) else {
            return .failure(.invalid)
        }
        return .success(0)
    }

    func hcCreateVCPU(exitPage: L1GPA, _ vcpu: L0VCPU) -> Result<UInt64, HypercallError> {
        do { try vcpu.vm.checkMayRunPVNestedGuest() } catch {
            refusal = .host(error)
            return .failure(.permission)
        }
        guard !vcpuCreated else { return .failure(.invalid) }
        guard exitPage.isPageAligned else { return .failure(.invalid) }
        guard (try? vcpu.l1Memory.memslots.translate(exitPage, length: RunPage.size)) != nil else { return .failure(.fault) }
        exitPageGPA = exitPage
        if enabled.contains(.directAPIC) { vcpu.enableLocalAPICs(count: vcpu.control.layout.vcpuCount) }
        return .success(UInt64(vcpu.id))
    }

    /// Loads L2's registers (and any event L1 injects) from the PV exit page.
    func hcEnterL2(_ vcpu: L0VCPU) -> Result<Void, HypercallError> {
        guard let page = exitPage(vcpu) else { return .failure(.invalid) }
        vcpu.l2Run.registers = page.registers
        vcpu.l2Run[RunPage.eventInjection] = page[RunPage.eventInjection]
        vcpu.l2Run[RunPage.eventErrorCode] = page[RunPage.eventErrorCode]
        page[RunPage.eventInjection] = 0
        return .success(())
    }
}
