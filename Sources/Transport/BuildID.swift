import CPVMShim

/// The GNU build ID the linker put in the executable: how L0 and a child tier know they are the
/// same build (a child started from a rebuilt binary is not).
public enum BuildID {
    /// This program's, as hex; nil if it was linked without one.
    public static let current: String? = {
        var bytes = [UInt8](repeating: 0, count: 64)
        let n = pvm_self_build_id(&bytes, Int32(bytes.count))
        return n > 0 ? hex(bytes.prefix(Int(n))) : nil
    }()

    /// The build ID of the ELF file at `path`; nil if it cannot be read or has none.
    public static func of(file path: String) -> String? {
        var bytes = [UInt8](repeating: 0, count: 64)
        let n = pvm_file_build_id(path, &bytes, Int32(bytes.count))
        return n > 0 ? hex(bytes.prefix(Int(n))) : nil
    }

    static func hex(_ b: ArraySlice<UInt8>) -> String {
        b.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }
}
