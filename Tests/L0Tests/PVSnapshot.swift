import ABI
@testable import L0
import Testing
import Transport

/// Everything a PV hypercall may change, for "a refused call changes nothing": the PV map, EPT02
/// (present frames, their raw entries, the generation, the fill counter), the MSR policies and
/// L0's MSR values, L2's MSR bitmap and pass-through values, L0's port devices, the CPUID table,
/// the negotiation and the vCPU. (Not `refusal`: a refused negotiate says why there, by design.)
struct PVSnapshot: Equatable {
    var map: PVMap
    var present: Set<UInt64>
    var entries: [UInt64: UInt64]
    var generation: UInt64
    var ept02Fills: UInt64
    var msrPolicy: [UInt32: MSRPolicy]
    var l0MSRs: [UInt32: UInt64]
    var msrBitmap: [UInt8]
    var passthroughValues: [UInt64?]
    var devices: L0Devices
    var cpuid: CPUIDTable?
    var negotiated: Bool
    var enabled: PVFeatures
    var argumentPage: L1GPA?
    var exitPage: L1GPA?
    var hasL2VCPU: Bool

    init(_ f: Fixture) {
        let v = f.vcpu
        let pv = f.pv
        map = pv.map
        present = v.ept02.present
        entries = Dictionary(uniqueKeysWithValues: v.ept02.present.map { ($0, v.ept02.entry(L2GPA($0 * pageSize))) })
        generation = v.ept02.generation
        ept02Fills = v.counters.ept02Fills
        msrPolicy = pv.msrPolicy
        l0MSRs = v.l0MSRs
        msrBitmap = (try? f.control.l2Tables.readBytes(at: f.layout.l2MSRBitmap(0).raw, count: 4096)) ?? []
        passthroughValues = PassthroughMSRs.all.map { v.l2PassthroughMSRs[$0] }
        devices = v.l0Devices
        cpuid = pv.cpuid
        negotiated = pv.negotiated
        enabled = pv.enabled
        argumentPage = pv.argumentPage
        exitPage = pv.exitPageGPA
        hasL2VCPU = pv.hasL2VCPU
    }

    /// The names of the parts that differ (for a readable failure).
    func differences(_ o: PVSnapshot) -> [String] {
        var d: [String] = []
        if map != o.map { d.append("PV map \(map.mappings.map(\.l2)) -> \(o.map.mappings.map(\.l2))") }
        if present != o.present { d.append("EPT02 present frames (\(present.count) -> \(o.present.count))") }
        if entries != o.entries { d.append("EPT02 entries") }
        if generation != o.generation { d.append("EPT02 generation") }
        if ept02Fills != o.ept02Fills { d.append("ept02Fills \(ept02Fills) -> \(o.ept02Fills)") }
        if msrPolicy != o.msrPolicy { d.append("MSR policy") }
        if l0MSRs != o.l0MSRs { d.append("L0 MSR values") }
        if msrBitmap != o.msrBitmap { d.append("L2 MSR bitmap") }
        if passthroughValues != o.passthroughValues { d.append("pass-through MSR values") }
        if devices != o.devices { d.append("L0 port devices") }
        if cpuid != o.cpuid { d.append("CPUID table") }
        if negotiated != o.negotiated || enabled != o.enabled || argumentPage != o.argumentPage { d.append("negotiation") }
        if exitPage != o.exitPage || hasL2VCPU != o.hasL2VCPU { d.append("vCPU creation") }
        return d
    }
}
