import ABI

/// The PVM paper's microbenchmarks (SOSP'23, section 6; the lmbench shapes it uses), as tests
/// of the suite: each sets up L2's own page tables and kernel first (`L2Kernel`), then measures
/// one operation. On the two-dimensional paths none of them exits (L2's page faults, page-table
/// writes, INVLPGs, CR3 writes and syscalls stay in L2); on pvm-rfc they are what the switcher
/// and L1's shadow MMU charge.
public enum PagingOperations {
    /// User pages the `fork` address space has (lmbench's fork touches a small process).
    public static let forkPages: UInt64 = 16
    /// The page L2's kernel keeps its "pid" in (direct-mapped kernel data).
    static let kernelData = L2GPA(0x2000)

    public enum Syscall: UInt64 {
        case getpid = 39, fork = 57, exit = 60
    }

    /// The direct map, one address space with `userPages` user pages mapped, CR3 loaded.
    static func boot(_ cpu: GuestCPU, userPages: UInt64) -> (L2Kernel, AddressSpace, [L2GPA]) {
        let kernel = L2Kernel(cpu: cpu)
        let space = kernel.newAddressSpace()
        let frames = (0..<userPages).map { _ in kernel.allocate() }
        for (p, f) in frames.enumerated() {
            kernel.map(space, L2Kernel.userBase + UInt64(p) * pageSize, to: f, writable: true)
        }
        cpu.writeCR(3, space.cr3)
        return (kernel, space, frames)
    }

    public static func user(_ page: UInt64) -> L2GVA { L2Kernel.userBase + page * pageSize }

    /// User pages `tlb_miss` reads in turn: four times the TLB, so every read misses.
    public static let tlbMissPages: UInt64 = 256

    public static let all: [BenchOperation] = [
        BenchOperation(name: "syscall", summary: "a null system call from L2's user mode (getpid: one load in L2's kernel)") { cpu in
            _ = boot(cpu, userPages: 1)
            cpu.write64(kernelData, 4242)
            cpu.setSyscallHandler { cpu, nr, _ in nr == Syscall.getpid.rawValue ? cpu.read64(kernelData) : ~0 }
            cpu.enterUserMode()
            return { _ in _ = cpu.syscall(Syscall.getpid.rawValue) }
        },
        BenchOperation(name: "exception", summary: "INT3 in L2's user mode: #BP to L2's own handler and back") { cpu in
            _ = boot(cpu, userPages: 1)
            cpu.setHandler(.breakpoint) { cpu, _ in cpu.write64(kernelData, cpu.read64(kernelData) &+ 1) }
            cpu.enterUserMode()
            return { _ in cpu.int3() }
        },
        BenchOperation(name: "page_fault", summary: "a user write to a page that is not present: L2's kernel maps it (and unmaps the last one)") { cpu in
            // Two user pages take turns: the handler maps the one that faulted and unmaps the
            // other (PTE clear + INVLPG), so every iteration's write faults again.
            let (kernel, space, _) = boot(cpu, userPages: 2)
            let frames = [kernel.allocate(), kernel.allocate()]
            for p: UInt64 in 0..<2 { kernel.setEntry(space, user(p), 0) }
            cpu.setHandler(.pageFault) { _, f in
                let page = f.address.raw &- L2Kernel.userBase.raw
                cpu.guestAssert(f.errorCode & PageWalk.ErrorCode.protection == 0 && page < 2 * pageSize,
                                "page_fault: unexpected #PF at \(f.address), error code \(f.errorCode)")
                let p = page / pageSize
                kernel.map(space, user(p), to: frames[Int(p)], writable: true)
                kernel.setEntry(space, user(1 - p), 0)
            }
            cpu.enterUserMode()
            return { i in cpu.write64(user(i & 1), i) }
        },
        BenchOperation(name: "cr3_switch", summary: "MOV to CR3 between two address spaces, then a read of a user page") { cpu in
            let (kernel, a, _) = boot(cpu, userPages: 1)
            let b = kernel.newAddressSpace()
            kernel.map(b, user(0), to: kernel.allocate(), writable: true)
            return { i in
                cpu.writeCR(3, (i & 1 == 0 ? b : a).cr3)
                _ = cpu.read64(user(0))
            }
        },
        BenchOperation(name: "tlb_miss", summary: "a user read of the next of \(tlbMissPages) mapped pages: every one misses L2's TLB and is walked (two dimensions through EPT02, or one on the shadow tables)") { cpu in
            _ = boot(cpu, userPages: tlbMissPages)
            for p in 0..<tlbMissPages { _ = cpu.read64(user(p)) }         // every shadow entry filled once
            cpu.enterUserMode()
            return { i in _ = cpu.read64(user(i % tlbMissPages)) }
        },
        BenchOperation(name: "fork", summary: "fork + exit of a \(forkPages)-page process: copy its tables write-protected, the child and then the parent write every page (copy-on-write)") { cpu in
            let (kernel, parent, _) = boot(cpu, userPages: forkPages)
            var child: AddressSpace?
            var childFrames: [L2GPA] = []
            cpu.setSyscallHandler { cpu, nr, _ in
                switch Syscall(rawValue: nr) {
                case .fork:
                    // copy_page_range: the child shares every page read-only, and so does the parent now.
                    let c = kernel.newAddressSpace()
                    for p in 0..<forkPages {
                        let e = kernel.entry(parent, user(p))
                        kernel.map(c, user(p), to: L2GPA(e & PageWalk.Bit.addressMask), writable: false)
                        kernel.setEntry(parent, user(p), e & ~PageWalk.Bit.writable)
                    }
                    child = c
                    cpu.writeCR(3, c.cr3)      // the scheduler runs the child first
                    return 0
                case .exit:
                    cpu.writeCR(3, parent.cr3)
                    if let c = child { kernel.destroy(c) }
                    for f in childFrames { kernel.free(f) }
                    child = nil
                    childFrames = []
                    return 0
                default:
                    return ~0
                }
            }
            cpu.setHandler(.pageFault) { _, f in
                let p = (f.address.raw &- L2Kernel.userBase.raw) / pageSize
                cpu.guestAssert(f.errorCode & PageWalk.ErrorCode.protection != 0 && p < forkPages,
                                "fork: unexpected #PF at \(f.address), error code \(f.errorCode)")
                if let c = child, cpu.readCR(3) == c.cr3 {
                    // Copy-on-write in the child: a page of its own (the copy itself is not modelled).
                    let frame = kernel.allocate()
                    childFrames.append(frame)
                    let old = kernel.entry(c, user(p))
                    kernel.setEntry(c, user(p), (old & ~PageWalk.Bit.addressMask) | frame.raw | PageWalk.Bit.writable)
                } else {
                    // The parent owns the page alone again: write access back.
                    kernel.setEntry(parent, user(p), kernel.entry(parent, user(p)) | PageWalk.Bit.writable)
                }
            }
            cpu.enterUserMode()
            return { i in
                _ = cpu.syscall(Syscall.fork.rawValue)
                for p in 0..<forkPages { cpu.write64(user(p), i) }
                _ = cpu.syscall(Syscall.exit.rawValue)
                for p in 0..<forkPages { cpu.write64(user(p), i) }
            }
        },
    ]
}

extension GuestPrograms {
    /// L2's first stage, checked the same way on every path (the shadow MMU of pvm-rfc must be
    /// invisible to it). One sync per step:
    /// 1. (PTE of a written page) accessed and dirty set; 2. (PTE of a read page) accessed only;
    /// 3. a PTE rewritten + INVLPG: the new frame's value is read; 4. a not-present page: L2's
    /// #PF handler runs once (address, error code 0), maps it, the read completes;
    /// 5. a user write to a read-only user page: #PF error code P|W|U (7), the handler grants it;
    /// 6. a CR3 switch and back: each address space's own page;
    /// 7. a fetch from an execute-disabled page: #PF P|I (0x11), the handler clears XD;
    /// 8. a user read under a supervisor-only directory entry: #PF P|U (5), the handler sets U
    ///    there (and INVLPGs);
    /// 9. the accessed flag cleared (and INVLPG), then a read: the flag is set again.
    public static let pagingProbe = GuestProgram(name: "paging-probe", summary: "L2's page tables: A/D bits, INVLPG, #PF to L2's handler, CR3 switch",
                                                 severalVCPUs: false) { cpu, _ in
        typealias Bit = PageWalk.Bit
        let (kernel, space, frames) = PagingOperations.boot(cpu, userPages: 2)
        let u0 = PagingOperations.user(0), u1 = PagingOperations.user(1)
        cpu.write64(frames[1], 0xF1F1)                          // through the direct map
        cpu.write64(u0, 0x1111)
        cpu.sync(1, kernel.entry(space, u0) & (Bit.accessed | Bit.dirty))
        _ = cpu.read64(u1)
        cpu.sync(2, kernel.entry(space, u1) & (Bit.accessed | Bit.dirty))
        kernel.setEntry(space, u0, frames[1].raw | Bit.present | Bit.writable | Bit.user)
        cpu.sync(3, cpu.read64(u0))
        var faults: [ExceptionFrame] = []
        cpu.setHandler(.pageFault) { _, f in
            faults.append(f)
            if f.address == u1 { kernel.map(space, u1, to: frames[0], writable: true) }
            if f.address == u0 { kernel.setEntry(space, u0, kernel.entry(space, u0) | Bit.writable) }
        }
        kernel.setEntry(space, u1, 0)
        let back = cpu.read64(u1)
        cpu.sync(4, UInt64(faults.count), faults.first?.address.raw ?? 0, UInt64(faults.first?.errorCode ?? 99), back)
        faults = []
        kernel.setEntry(space, u0, frames[1].raw | Bit.present | Bit.user)   // read-only
        cpu.enterUserMode()
        cpu.write64(u0, 0x2222)
        // The rest is kernel work, done in a system call.
        cpu.setSyscallHandler { cpu, _, _ in
            cpu.sync(5, UInt64(faults.count), UInt64(faults.first?.errorCode ?? 99), cpu.read64(frames[1]))
            let other = kernel.newAddressSpace()
            let otherFrame = kernel.allocate()
            cpu.write64(otherFrame, 0x0B0B)
            kernel.map(other, u0, to: otherFrame, writable: true)
            cpu.writeCR(3, other.cr3)
            let a = cpu.read64(u0)
            cpu.writeCR(3, space.cr3)
            cpu.sync(6, a, cpu.read64(u0))

            // 7. Execute-disable.
            faults = []
            cpu.write8(frames[0], 0xC3)
            kernel.setEntry(space, u1, frames[0].raw | Bit.present | Bit.writable | Bit.user | Bit.executeDisable)
            cpu.setHandler(.pageFault) { _, f in
                faults.append(f)
                kernel.setEntry(space, u1, kernel.entry(space, u1) & ~Bit.executeDisable)
            }
            let byte = cpu.fetch(u1)
            cpu.sync(7, UInt64(faults.count), UInt64(faults.first?.errorCode ?? 99), UInt64(byte))

            // 8. A supervisor-only directory entry above a user page.
            faults = []
            let pde = kernel.directoryEntry(space, u0)!
            cpu.write64(pde, cpu.read64(pde) & ~Bit.user)
            cpu.invlpg(u0)
            cpu.setHandler(.pageFault) { cpu, f in
                faults.append(f)
                cpu.write64(pde, cpu.read64(pde) | Bit.user)
                cpu.invlpg(f.address)
            }
            return 0
        }
        _ = cpu.syscall(0)
        let userRead = cpu.read64(u0)                          // back in user mode (SYSRET)
        cpu.setSyscallHandler { cpu, _, _ in
            cpu.sync(8, UInt64(faults.count), UInt64(faults.first?.errorCode ?? 99), userRead)
            // 9. The accessed flag, cleared by the kernel (page aging), comes back on the next access.
            kernel.setEntry(space, u0, kernel.entry(space, u0) & ~Bit.accessed)
            _ = cpu.read64(u0)
            cpu.sync(9, kernel.entry(space, u0) & Bit.accessed)
            return 0
        }
        _ = cpu.syscall(0)
        cpu.done()
    }
}
