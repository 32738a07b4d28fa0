import ABI
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

    public var description: String {
        switch self {
        case let .memfdCreateFailed(name, e): "memfd_create(\(name)) failed: \(String(cString: strerror(e)))"
        case let .resizeFailed(bytes, e): "ftruncate to \(bytes) bytes failed: \(String(cString: strerror(e)))"
        case let .mapFailed(bytes, e): "mmap of \(bytes) bytes failed: \(String(cString: strerror(e)))"
        case let .outOfBounds(o, l, s): "access [0x\(String(o, radix: 16)), +\(l)) outside a region of \(s) bytes"
        case let .spawnFailed(path, e): "cannot start \(path): \(String(cString: strerror(e)))"
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
    public let fd: Int32
    public let size: UInt64
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
        do { self.base = try Self.map(fd: fd, size: size) } catch { close(fd); throw error }
        self.fd = fd
        self.size = size
    }

    /// Private anonymous memory of `size` bytes, no file behind it: for in-process handler tests
    /// and tools that need L0's memory layout without sharing it with another process.
    public init(anonymous size: UInt64) throws {
        // MAP_PRIVATE | MAP_ANONYMOUS: no fd, nothing to clean up but the mapping.
        let p = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != MAP_FAILED else { throw TransportError.mapFailed(bytes: size, errno: errno) }
        self.base = p
        self.fd = -1
        self.size = size
    }

    /// Maps a memfd this process inherited (a child tier). Takes ownership of `fd`.
    public init(adopt fd: Int32) throws {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw TransportError.mapFailed(bytes: 0, errno: errno) }
        let size = UInt64(st.st_size)
        self.base = try Self.map(fd: fd, size: size)
        self.fd = fd
        self.size = size
    }

    private static func map(fd: Int32, size: UInt64) throws -> UnsafeMutableRawPointer {
        // MAP_SHARED so every tier sees the same bytes; MAP_NORESERVE keeps a 1 GiB default sparse.
        let p = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0)
        guard let p, p != MAP_FAILED else { throw TransportError.mapFailed(bytes: size, errno: errno) }
        return p
    }

    deinit {
        munmap(base, Int(size))
        if fd >= 0 { close(fd) }
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

    /// The address of a 4-byte-aligned u32 used as an atomic/futex word.
    @inline(__always)
    func word32(at offset: UInt64) -> UnsafeMutablePointer<UInt32> {
        precondition(offset % 4 == 0 && offset + 4 <= size)
        // Aligned, in bounds; the word is only accessed atomically through Handoff.
        return (base + Int(offset)).assumingMemoryBound(to: UInt32.self)
    }
}
