import ABI
import Foundation
import Testing
import Transport
#if canImport(Glibc)
import Glibc
#endif

/// The seals L0 puts on what it shares, checked from this process as a child would meet them:
/// a tables region L0 sealed cannot be mapped writable, made writable or written with write(2),
/// and no shared region can be shrunk under L0, while L0's own mapping keeps writing.
@Suite struct SealTests {
    /// A sealed region as L0 makes one, and a second descriptor for it as a child holds.
    func sealed(futureWrite: Bool) throws -> (SharedRegion, Int32) {
        let region = try SharedRegion(create: "pvm-seal-test", size: 4 * pageSize)
        try region.store(UInt64(0x1234), at: 0)
        try region.seal(name: "pvm-seal-test", futureWrite: futureWrite)
        return (region, dup(region.fd))
    }

    @Test func aSealedTablesRegionCannotBeWrittenByAnyoneButTheMappingL0MadeBefore() throws {
        let (region, fd) = try sealed(futureWrite: true)
        defer { close(fd) }
        // A writable shared mapping is refused outright.
        let p = mmap(nil, Int(pageSize), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        #expect(p == MAP_FAILED && errno == EPERM)
        // write(2) too.
        var byte: UInt8 = 0xFF
        #expect(pwrite(fd, &byte, 1, 0) == -1 && errno == EPERM)
        // A read-only mapping is what a child gets; it cannot be made writable.
        let child = try SharedRegion(adopt: dup(fd), name: "pvm-seal-test", writable: false, requireFutureWriteSeal: true)
        #expect(!child.isWritable)
        #expect(child.probeMakeWritable() == EACCES)
        #expect(try child.load(UInt64.self, at: 0) == 0x1234)
        // L0's mapping, made before the seal, still writes, and the child sees it.
        try region.store(UInt64(0x5678), at: 0)
        #expect(try child.load(UInt64.self, at: 0) == 0x5678)
    }

    @Test func noSharedRegionCanBeShrunkOrGrownOrUnsealed() throws {
        for futureWrite in [false, true] {
            let (region, fd) = try sealed(futureWrite: futureWrite)
            defer { close(fd) }
            #expect(ftruncate(fd, 0) == -1 && errno == EPERM)
            #expect(ftruncate(fd, off_t(8 * pageSize)) == -1 && errno == EPERM)
            // F_SEAL_SEAL: the seals are final; a child can add none.
            #expect(throws: TransportError.sealFailed(name: "again", errno: EPERM)) {
                try region.seal(name: "again", futureWrite: true)
            }
        }
    }

    @Test func aChildRefusesMemoryWithoutL0sSeals() throws {
        let unsealed = try SharedRegion(create: "pvm-unsealed", size: pageSize)
        #expect(throws: TransportError.self) {
            try SharedRegion(adopt: dup(unsealed.fd), name: "pvm-unsealed", writable: true)
        }
        // Sealed against shrinking but still writable by anyone: not good enough for tables.
        let exchange = try SharedRegion(create: "pvm-exchange", size: pageSize)
        try exchange.seal(name: "pvm-exchange", futureWrite: false)
        _ = try SharedRegion(adopt: dup(exchange.fd), name: "pvm-exchange", writable: true)
        #expect(throws: TransportError.self) {
            try SharedRegion(adopt: dup(exchange.fd), name: "pvm-exchange", writable: false, requireFutureWriteSeal: true)
        }
    }

    @Test func aChildMapsOnlyTheWindowOfHostMemoryItWasGiven() throws {
        let host = try SharedRegion(create: "pvm-host-test", size: 16 * pageSize)
        try host.seal(name: "pvm-host-test", futureWrite: false)
        try host.store(UInt64(0xAB), at: 4 * pageSize)
        let window = try SharedRegion(adopt: dup(host.fd), name: "pvm-host-test", writable: true, window: (4 * pageSize, 8 * pageSize))
        let memory = HostMemory(region: window, base: HostOffset(4 * pageSize))
        #expect(try memory.load(UInt64.self, at: HostOffset(4 * pageSize)) == 0xAB)
        // Below and above the window: refused, not wrapped.
        #expect(throws: TransportError.self) { try memory.load(UInt64.self, at: HostOffset(0)) }
        #expect(throws: TransportError.self) { try memory.load(UInt64.self, at: HostOffset(12 * pageSize)) }
        #expect(throws: TransportError.self) { try memory.load(UInt64.self, at: HostOffset(UInt64.max - 3)) }
        // A window past the end of the memfd is refused.
        #expect(throws: TransportError.self) {
            try SharedRegion(adopt: dup(host.fd), name: "pvm-host-test", writable: true, window: (8 * pageSize, 16 * pageSize))
        }
    }

    @Test func hostMemoryWithL1sMemslotOverlaidIsOneMappingForL0AndTheOverlayHoldsExactlyTheSlot() throws {
        let host = try SharedRegion(create: "pvm-host-test", size: 16 * pageSize,
                                    overlay: ("pvm-slot-test", 4 * pageSize, 8 * pageSize))
        try host.seal(name: "pvm-host-test", futureWrite: false)
        try host.store(UInt64(0x11), at: 0)
        try host.store(UInt64(0x22), at: 4 * pageSize)
        try host.store(UInt64(0x33), at: 12 * pageSize - 8)
        try host.store(UInt64(0x44), at: 12 * pageSize)
        // The child's view: the overlay memfd alone, which is the slot and nothing around it.
        let slot = try SharedRegion(adopt: dup(host.overlayFD), name: "pvm-slot-test", writable: true)
        #expect(slot.size == 8 * pageSize)
        #expect(try slot.load(UInt64.self, at: 0) == 0x22 && slot.load(UInt64.self, at: 8 * pageSize - 8) == 0x33)
        // Written by the child, seen by L0 at the slot's host offset.
        try slot.store(UInt64(0x55), at: 8)
        #expect(try host.load(UInt64.self, at: 4 * pageSize + 8) == 0x55)
        // Sealed too: the child cannot shrink it under L0.
        #expect(ftruncate(slot.fd, 0) == -1 && errno == EPERM)
        // An overlay outside the region is refused.
        #expect(throws: TransportError.self) {
            try SharedRegion(create: "pvm-host-test", size: 4 * pageSize, overlay: ("x", 2 * pageSize, 4 * pageSize))
        }
    }

    @Test func theSandboxAllowsNothingThatOpensSpawnsOrReachesAnotherProcess() {
        let allowed = Set(TierSandbox.allowedSystemCalls)
        #expect(allowed.contains("futex") && allowed.contains("exit_group"))
        for forbidden in ["open", "openat", "execve", "fork", "clone", "clone3", "vfork", "socket", "connect", "ptrace",
                          "process_vm_writev", "process_vm_readv", "memfd_create", "ftruncate", "pwrite64", "mount", "mremap",
                          "newfstatat", "statx", "fstat",
                          "pidfd_open", "pidfd_send_signal", "tkill", "rt_sigqueueinfo", "seccomp", "prctl", "ioctl"] {
            #expect(!allowed.contains(forbidden), "\(forbidden)")
        }
    }
}

/// docs/architecture.md lists the sandbox's allow-list by name: it must be the shim's list.
@Suite struct SandboxDocsTests {
    @Test func theArchitectureDocListsExactlyTheSystemCallsTheSandboxAllows() throws {
        let docs = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("docs/architecture.md")
        let text = try String(contentsOf: docs, encoding: .utf8)
        guard let start = text.range(of: "that allows only: "), let end = text.range(of: " own pid.", range: start.upperBound..<text.endIndex) else {
            Issue.record("docs/architecture.md no longer lists the allow-list")
            return
        }
        let listed = Set(text[start.upperBound..<end.lowerBound].split(separator: "`", omittingEmptySubsequences: false).enumerated()
            .filter { $0.offset % 2 == 1 }.map { String($0.element) })
        #expect(listed == Set(TierSandbox.allowedSystemCalls), "docs: \(listed.sorted()) shim: \(TierSandbox.allowedSystemCalls.sorted())")
    }
}
