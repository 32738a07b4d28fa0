import ABI
import Transport

extension L0VCPU {
    /// L2 exits on the PV path: L0 emulates the hot ones from what L1 registered and delivers
    /// the rest to L1 through the PV exit page.
    func handlePVL2Exit(_ exit: GuestExit) -> L2ExitOutcome {
        switch exit.reason {
        case .cpuid:
            guard let table = pv.cpuid else { return deliverPVExit(exit) }
            emulateCPUID(table)
            skipL2Instruction(exit)
            return .resumeL2
        case .ioInstruction where IOQualification.port(exit.qualification) == Ucall.port:
            return handleL0PortIO(exit)
        default:
            return deliverPVExit(exit)
        }
    }

    @inline(__always)
    func emulateCPUID(_ table: CPUIDTable) {
        let (a, b, c, d) = table.lookup(function: UInt32(truncatingIfNeeded: l2Run[register: .rax]),
                                        index: UInt32(truncatingIfNeeded: l2Run[register: .rcx]))
        l2Run[register: .rax] = UInt64(a)
        l2Run[register: .rbx] = UInt64(b)
        l2Run[register: .rcx] = UInt64(c)
        l2Run[register: .rdx] = UInt64(d)
    }

    /// Completes L1's pending enter-L2 hypercall with this exit in its PV exit page.
    func deliverPVExit(_ exit: GuestExit) -> L2ExitOutcome {
        guard let gpa = pv.exitPageGPA,
              let page = try? l1Memory.host.runPage(at: l1Memory.memslots.translate(gpa, length: RunPage.size))
        else { return .stop(.fatal("L2 exit \(exit.reason) with no PV exit page registered")) }
        l2Run.copy(to: page)
        counters.countDelivery(exit.reason)
        l1Run[register: .rax] = 0
        return .deliverToL1
    }

    // MARK: hypercalls

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
        switch call {
        case .setCPUID: result = hcSetCPUID(gpa: L1GPA(a0), count: a1)
        case .mapGPARange: result = hcMap(l2: L2GPA(a0), l1: L1GPA(a1), length: a2, flags: a3)
        case .unmapGPARange: result = hcUnmap(l2: L2GPA(a0), length: a1)
        case .createVCPU: result = hcCreateVCPU(exitPage: L1GPA(a0))
        case .enterL2:
            if case .failure(let e) = hcEnterL2() {
                l1Run[register: .rax] = e.returnValue
                return .resumeL1
            }
            return .enterL2
        }
        switch result {
        case .success(let v): l1Run[register: .rax] = v
        case .failure(let e): l1Run[register: .rax] = e.returnValue
        }
        return .resumeL1
    }

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

    /// Validates and installs one L2 -> L1 range. Nothing changes unless everything is valid.
    func hcMap(l2: L2GPA, l1: L1GPA, length: UInt64, flags: UInt64) -> Result<UInt64, HypercallError> {
        guard flags & ~PVMapFlags.known == 0, flags & PVMapFlags.rwx != 0 else { return .failure(.invalid) }
        guard l2.isPageAligned, l1.isPageAligned, length > 0, length % pageSize == 0 else { return .failure(.invalid) }
        guard let l2Range = AddressRange(start: l2, length: length), AddressRange(start: l1, length: length) != nil
        else { return .failure(.invalid) }
        guard l2Range.end.raw <= ept02.addressLimit else { return .failure(.invalid) }
        guard pv.map.overlapping(l2Range).isEmpty else { return .failure(.invalid) }
        // Translate every page first: the range may span memslots, and must lie inside them.
        var hosts: [HostOffset] = []
        hosts.reserveCapacity(Int(length / pageSize))
        var off: UInt64 = 0
        while off < length {
            guard let h = try? l1Memory.memslots.translate(L1GPA(l1.raw + off), length: pageSize) else {
                return .failure(.fault)
            }
            hosts.append(h)
            off += pageSize
        }
        for (i, h) in hosts.enumerated() {
            ept02.install(L2GPA(l2.raw + UInt64(i) * pageSize), host: h, permissions: flags & PVMapFlags.rwx)
        }
        counters.ept02Fills += UInt64(hosts.count)
        pv.map.insert(PVMapping(l2: l2Range, l1: l1, permissions: flags & PVMapFlags.rwx))
        return .success(0)
    }

    /// Removes a range; takes effect (EPT02 cleared, L2's TLB generation bumped) before returning.
    func hcUnmap(l2: L2GPA, length: UInt64) -> Result<UInt64, HypercallError> {
        guard l2.isPageAligned, length > 0, length % pageSize == 0,
              let r = AddressRange(start: l2, length: length) else { return .failure(.invalid) }
        guard !pv.map.overlapping(r).isEmpty else { return .failure(.invalid) }
        pv.map.remove(r)
        ept02.remove(l2, length: length)
        return .success(0)
    }

    func hcCreateVCPU(exitPage: L1GPA) -> Result<UInt64, HypercallError> {
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
