import ABI

/// A VM the host created: what KVM_CREATE_VM's file descriptor stands for. A value: the host keeps
/// the authoritative list, and `L0Host.destroyVM` takes the handle back.
public struct VMHandle: Equatable, Hashable, Sendable, CustomStringConvertible {
    public let id: Int
    public let type: VMType
    /// Set from the type at creation (`VMCapabilities(type:)`), then stored, never re-derived.
    public let hasPrivateMem: Bool
    public let hasProtectedState: Bool

    public init(id: Int, type: VMType) {
        self.id = id
        self.type = type
        let caps = VMCapabilities(type: type)
        self.hasPrivateMem = caps.hasPrivateMem
        self.hasProtectedState = caps.hasProtectedState
    }

    public var capabilities: VMCapabilities {
        VMCapabilities(hasPrivateMem: hasPrivateMem, hasProtectedState: hasProtectedState)
    }

    public var description: String {
        "VM \(id) (\(type.name), private mem: \(hasPrivateMem), protected state: \(hasProtectedState))"
    }
}
