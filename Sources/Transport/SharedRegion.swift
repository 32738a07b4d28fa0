import ABI
import Atomics
import CPVMShim
#if canImport(Glibc)
import Glibc
#endif

/// Errors from the shared-memory and process layer, each naming what failed and why.
public enum TransportError: Error, CustomStringConvertible, Equatable {
    case memfdCreateFailed(name: String, errno: Int32)
    case resizeFailed(bytes: UInt64, errno: Int32)
    case mapFailed(bytes: UInt64, errno: Int32)
    case outOfBounds(offset: UInt64, length: UInt64, regionSize: UInt64)
    case spawnFailed(path: String, errno: Int32)
    case sealFailed(name: String, errno: Int32)
    /// A child was handed a memfd without the seals L0 puts on every region it shares.
    case unsealed(name: String, seals: Int32)
    /// The raw ring's echo process stopped answering (`RawRing`).
    case ringEchoGone(status: String)
    /// sched_setaffinity refused a CPU a measurement must run on.
    case cannotRunOnCPU(Int, errno: Int32)
    /// sched_getaffinity failed: the thread's CPUs could not be saved to be given back.
    case cannotReadAffinity(errno: Int32)

    public var description: String {
        switch self {
        case let .memfdCreateFailed(name, e): "memfd_create(\(name)) failed: \(String(cString: strerror(e)))"
        case let .resizeFailed(bytes, e): "ftruncate to \(bytes) bytes failed: \(String(cString: strerror(e)))"
        case let .mapFailed(bytes, e): "mmap of \(bytes) bytes failed: \(String(cString: strerror(e)))"
        case let .outOfBounds(o, l, s): "access [0x\(String(o, radix: 16)), +\(l)) outside a region of \(s) bytes"
        case let .spawnFailed(path, e): "cannot start \(path): \(String(cString: strerror(e)))"
        case let .sealFailed(name, e): "sealing \(name) failed: \(String(cString: strerror(e)))"
        case let .unsealed(name, seals): "\(name) came without L0's seals (F_GET_SEALS 0x\(String(seals, radix: 16)))"
        case let .ringEchoGone(status): "the raw ring's echo process stopped answering (\(status))"
        case let .cannotRunOnCPU(cpu, e): "cannot run on CPU \(cpu): \(String(cString: strerror(e)))"
        case let .cannotReadAffinity(e): "cannot read this thread's CPU affinity: \(String(cString: strerror(e)))"
        }
    }
}

/// A memfd mapped MAP_SHARED: the one kind of memory the tiers share. Created by L0; inherited
/// by L1 and L2 as a file descriptor and mapped again there. Anonymous (memfd), so nothing is
/// left in /dev/shm when the stack ends, however it ends.
///
/// Offsets are bytes from the start of the region. Checked accessors throw on a range outside
/// the region. The `unchecked` ones are Transport's own, for the typed views (`RunPageView`,
/// `VMCSImage`, `ControlMemory`'s tables) that checked their range when they were made; they
/// still `precondition` the bounds, so a bug traps instead of touching another mapping.
public final class SharedRegion: @unchecked Sendable {
    /// The memfd behind the mapping: -1 for anonymous memory, and once a child tier has closed
    /// its descriptors (`TierSandbox.enter`).
    public private(set) var fd: Int32
    public let size: UInt64
    /// False for a read-only mapping (a child's view of L0's tables): a store there faults.
    public let isWritable: Bool
    // The mapping; valid from init to deinit.
    private let base: UnsafeMutableRawPointer

    /// Creates a new memfd of `size` bytes (sparse: pages cost nothing until touched) and maps it.
    public init(create name: String, size: UInt64) throws {
        let fd = pvm_memfd_create(name)
        guard fd >= 0 else { throw TransportError.memfdCreateFailed(name: name, errno: -fd) }
        guard ftruncate(fd, off_t(size)) == 0 else {
            let e = errno
            close(fd)
            throw TransportError.resizeFailed(bytes: size, errno: e)
        }
        do { self.base = try Self.map(fd: fd, size: size, offset: 0, writable: true) } catch { close(fd); throw error }
        self.fd = fd
        self.size = size
        self.isWritable = true
    }

    /// A memfd of `size` bytes with a second memfd mapped over [offset, offset+length) of it,
    /// all one contiguous mapping here: L0's host memory with L1's memslot in a memfd of its
    /// own, so a child can be handed L1's memory and nothing else (`overlayFD`).
    public convenience init(create name: String, size: UInt64, overlay: (name: String, offset: UInt64, length: UInt64)) throws {
        try self.init(create: name, size: size)
        guard overlay.offset % pageSize == 0, overlay.length % pageSize == 0, overlay.offset <= size,
              overlay.length <= size - overlay.offset else {
            throw TransportError.outOfBounds(offset: overlay.offset, length: overlay.length, regionSize: size)
        }
        let fd = pvm_memfd_create(overlay.name)
        guard fd >= 0 else { throw TransportError.memfdCreateFailed(name: overlay.name, errno: -fd) }
        guard ftruncate(fd, off_t(overlay.length)) == 0 else {
            let e = errno
            close(fd)
            throw TransportError.resizeFailed(bytes: overlay.length, errno: e)
        }
        // MAP_FIXED inside this object's own mapping (checked above): the overlay replaces those
        // pages of the first memfd, and deinit's munmap of the whole range unmaps both.
        let p = mmap(base + Int(overlay.offset), Int(overlay.length), PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_NORESERVE | MAP_FIXED, fd, 0)
        guard let p, p != MAP_FAILED else {
            let e = errno
            close(fd)
            throw TransportError.mapFailed(bytes: overlay.length, errno: e)
        }
        overlayFD = fd
    }

    /// The memfd mapped over part of this region (`init(create:size:overlay:)`), or -1.
    public private(set) var overlayFD: Int32 = -1

    /// Private anonymous memory of `size` bytes, no file behind it: for in-process handler tests
    /// and tools that need L0's memory layout without sharing it with another process.
    public init(anonymous size: UInt64) throws {
        // MAP_PRIVATE | MAP_ANONYMOUS: no fd, nothing to clean up but the mapping.
        let p = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != MAP_FAILED else { throw TransportError.mapFailed(bytes: size, errno: errno) }
        self.base = p
        self.fd = -1
        self.size = size
        self.isWritable = true
    }

    /// Maps a memfd this process inherited (a child tier): all of it, or the window
    /// [offset, offset+length) (both page-aligned), read-write or read-only. Takes ownership of
    /// `fd`. The memfd must carry L0's seals (`requireSeals`), so nobody can shrink it under
    /// the mapping.
    public init(adopt fd: Int32, name: String, writable: Bool, window: (offset: UInt64, length: UInt64)? = nil,
                requireFutureWriteSeal: Bool = false) throws {
        // Owned from here: closed on every way out but success.
        var owned = true
        defer { if owned { close(fd) } }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw TransportError.mapFailed(bytes: 0, errno: errno) }
        let fileSize = UInt64(st.st_size)
        let seals = pvm_memfd_seals(fd)
        let needed = pvm_seal_shrink_bit() | (requireFutureWriteSeal ? pvm_seal_future_write_bit() : 0)
        guard seals >= 0, seals & needed == needed else { throw TransportError.unsealed(name: name, seals: seals) }
        let (offset, length) = window ?? (0, fileSize)
        guard offset % pageSize == 0, offset <= fileSize, length <= fileSize - offset else {
            throw TransportError.outOfBounds(offset: offset, length: length, regionSize: fileSize)
        }
        self.base = try Self.map(fd: fd, size: length, offset: offset, writable: writable)
        owned = false
        self.fd = fd
        self.size = length
        self.isWritable = writable
    }

    private static func map(fd: Int32, size: UInt64, offset: UInt64, writable: Bool) throws -> UnsafeMutableRawPointer {
        // MAP_SHARED so every tier sees the same bytes; MAP_NORESERVE keeps a 1 GiB default sparse.
        let prot = writable ? PROT_READ | PROT_WRITE : PROT_READ
        let p = mmap(nil, Int(size), prot, MAP_SHARED | MAP_NORESERVE, fd, off_t(offset))
        guard let p, p != MAP_FAILED else { throw TransportError.mapFailed(bytes: size, errno: errno) }
        return p
    }

    /// Seals the memfd (L0, before it hands the region to a child): no shrinking or growing,
    /// no further seals, and with `futureWrite` no writable mapping from now on. L0's own
    /// mapping, made before, stays writable.
    public func seal(name: String, futureWrite: Bool) throws {
        precondition(fd >= 0, "anonymous memory has no seals")
        for d in [fd, overlayFD] where d >= 0 {
            let r = pvm_memfd_seal(d, futureWrite ? 1 : 0)
            guard r == 0 else { throw TransportError.sealFailed(name: name, errno: -r) }
        }
    }

    /// The descriptor is gone (closed by the sandbox, which closes every one above 2); the
    /// mapping stays.
    func forgetDescriptor() { fd = -1 }

    // MARK: hostile probes (the guest programs that test L0's defences)

    /// Tries to make this mapping writable (mprotect): 0, or the errno the kernel refused with.
    public func probeMakeWritable() -> Int32 {
        // The whole mapping, which this object owns; mprotect only changes its protection.
        -pvm_probe_make_writable(base, Int(size))
    }

    /// Tries to grow this mapping to twice its size (mremap): 0, or the errno the kernel (or
    /// the sandbox, ENOSYS) refused with.
    public func probeGrow() -> Int32 {
        // The whole mapping, which this object owns; a grow that works is undone in the shim.
        -pvm_probe_grow(base, Int(size))
    }

    /// Tries to punch a hole in the file behind this mapping (MADV_REMOVE): 0 or the errno.
    public func probePunch() -> Int32 {
        // The whole mapping, which this object owns; madvise only advises on it.
        -pvm_probe_punch(base, Int(size))
    }

    /// Stores `value` at `offset` with no regard for the mapping's protection: in a read-only
    /// mapping this faults (SIGSEGV), which is what the probe is for. The offset is checked.
    public func probeStore(_ value: UInt64, at offset: UInt64) {
        precondition(offset % 8 == 0 && offset <= size && size - offset >= 8, "probe outside the region")
        // In bounds (checked above); a deliberate store, faulting in a read-only mapping.
        (base + Int(offset)).storeBytes(of: value, as: UInt64.self)
    }

    deinit {
        munmap(base, Int(size))
        if fd >= 0 { close(fd) }
        if overlayFD >= 0 { close(overlayFD) }
    }

    @inline(__always)
    public func check(_ offset: UInt64, _ length: UInt64) throws {
        guard offset <= size, length <= size - offset else {
            throw TransportError.outOfBounds(offset: offset, length: length, regionSize: size)
        }
    }

    // MARK: checked access (offsets that came from a guest or a caller)

    public func load<T: FixedWidthInteger>(_: T.Type = T.self, at offset: UInt64) throws -> T {
        try check(offset, UInt64(MemoryLayout<T>.size))
        return unchecked(load: T.self, at: offset)
    }

    public func store<T: FixedWidthInteger>(_ value: T, at offset: UInt64) throws {
        try check(offset, UInt64(MemoryLayout<T>.size))
        unchecked(store: value, at: offset)
    }

    public func readBytes(at offset: UInt64, count: Int) throws -> [UInt8] {
        try check(offset, UInt64(count))
        // In bounds (checked above); copies out of the shared mapping.
        return [UInt8](UnsafeRawBufferPointer(start: base + Int(offset), count: count))
    }

    public func writeBytes(_ bytes: [UInt8], at offset: UInt64) throws {
        try check(offset, UInt64(bytes.count))
        bytes.withUnsafeBytes { src in
            // In bounds (checked above); copies into the shared mapping.
            (base + Int(offset)).copyMemory(from: src.baseAddress!, byteCount: src.count)
        }
    }

    public func fill(_ byte: UInt8, at offset: UInt64, count: UInt64) throws {
        try check(offset, count)
        // In bounds (checked above).
        memset(base + Int(offset), Int32(byte), Int(count))
    }

    /// Copies `count` bytes inside the region (e.g. vmcs12 <-> shadow VMCS), ranges checked.
    public func copy(from src: UInt64, to dst: UInt64, count: UInt64) throws {
        try check(src, count)
        try check(dst, count)
        // Both ranges in bounds (checked above); memmove tolerates overlap.
        memmove(base + Int(dst), base + Int(src), Int(count))
    }

    // MARK: unchecked access (Transport's views only: ranges checked when the view was made)

    @inline(__always)
    func unchecked<T: FixedWidthInteger>(load: T.Type, at offset: UInt64) -> T {
        precondition(offset <= size && UInt64(MemoryLayout<T>.size) <= size - offset, "load outside the shared region")
        // Little-endian host; unaligned-safe load from the shared mapping.
        return (base + Int(offset)).loadUnaligned(as: T.self)
    }

    @inline(__always)
    func unchecked<T: FixedWidthInteger>(store value: T, at offset: UInt64) {
        precondition(offset <= size && UInt64(MemoryLayout<T>.size) <= size - offset, "store outside the shared region")
        // Unaligned-safe store into the shared mapping.
        (base + Int(offset)).storeBytes(of: value, as: T.self)
    }

    /// An atomic compare-and-exchange of the 8-byte-aligned u64 at `offset` (LOCK CMPXCHG):
    /// true if it held `expected` and now holds `desired`. Offsets from a guest: checked, and a
    /// misaligned one throws (a CPU's LOCK on it would split; the model refuses it).
    public func compareExchange64(at offset: UInt64, expected: UInt64, desired: UInt64) throws -> (exchanged: Bool, original: UInt64) {
        try check(offset, 8)
        guard offset % 8 == 0 else { throw TransportError.outOfBounds(offset: offset, length: 8, regionSize: size) }
        // Aligned and in bounds (checked above); accessed atomically by every party.
        let word = UnsafeAtomic<UInt64>(at: UnsafeMutableRawPointer(base + Int(offset)).assumingMemoryBound(to: UInt64.AtomicRepresentation.self))
        return word.compareExchange(expected: expected, desired: desired, ordering: .sequentiallyConsistent)
    }

    /// An atomic exchange of the 8-byte-aligned u64 at `offset` (XCHG): what it held.
    public func exchange64(at offset: UInt64, _ value: UInt64) throws -> UInt64 {
        try check(offset, 8)
        guard offset % 8 == 0 else { throw TransportError.outOfBounds(offset: offset, length: 8, regionSize: size) }
        // Aligned and in bounds (checked above); accessed atomically by every party.
        let word = UnsafeAtomic<UInt64>(at: UnsafeMutableRawPointer(base + Int(offset)).assumingMemoryBound(to: UInt64.AtomicRepresentation.self))
        return word.exchange(value, ordering: .sequentiallyConsistent)
    }

    /// The address of a 4-byte-aligned u32 used as an atomic/futex word.
    @inline(__always)
    func word32(at offset: UInt64) -> UnsafeMutablePointer<UInt32> {
        precondition(offset % 4 == 0 && offset + 4 <= size)
        // Aligned, in bounds; the word is only accessed atomically through Handoff.
        return (base + Int(offset)).assumingMemoryBound(to: UInt32.self)
    }
}
