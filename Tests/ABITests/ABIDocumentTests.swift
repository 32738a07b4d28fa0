import ABI
import Foundation
import Testing

/// docs/abi.md is a contract: every number, offset and size it states must be the code's, and
/// everything the code defines must be in it.
@Suite struct ABIDocumentTests {
    /// Rows of every table whose first cell is a `name`, keyed by the nearest heading above.
    static let tables: [String: [String: [String]]] = {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("docs/abi.md")
        let text = (try? String(contentsOf: url, encoding: .utf8)) ?? ""
        var out: [String: [String: [String]]] = [:]
        var heading = ""
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("#") { heading = line.trimmingCharacters(in: CharacterSet(charactersIn: "# ")); continue }
            guard line.hasPrefix("| `") else { continue }
            let cells = line.split(separator: "|").map { $0.trimmingCharacters(in: .whitespaces) }
            let name = cells[0].trimmingCharacters(in: CharacterSet(charactersIn: "`"))
            out[heading, default: [:]][name] = Array(cells.dropFirst())
        }
        return out
    }()

    static func table(_ headingPrefix: String) -> [String: [String]] {
        tables.first { $0.key.hasPrefix(headingPrefix) }?.value ?? [:]
    }

    static func number(_ s: String) -> UInt64? {
        s.hasPrefix("0x") ? UInt64(s.dropFirst(2), radix: 16) : UInt64(s)
    }

    /// Checks a table of `name | value` (or `name | offset | size`) against the code, both ways.
    func expectTable(_ heading: String, _ expected: [(String, [UInt64])], sourceLocation: SourceLocation = #_sourceLocation) {
        let rows = Self.table(heading)
        #expect(!rows.isEmpty, "no table under '\(heading)' in docs/abi.md", sourceLocation: sourceLocation)
        for (name, values) in expected {
            guard let row = rows[name] else {
                Issue.record("docs/abi.md '\(heading)' lacks \(name)", sourceLocation: sourceLocation)
                continue
            }
            let documented = row.prefix(values.count).map(Self.number)
            #expect(documented == values.map(Optional.some), "\(heading) \(name): doc \(row.prefix(values.count)), code \(values)",
                    sourceLocation: sourceLocation)
        }
        let extra = Set(rows.keys).subtracting(expected.map(\.0))
        #expect(extra.isEmpty, "docs/abi.md '\(heading)' documents what the code lacks: \(extra.sorted())", sourceLocation: sourceLocation)
    }

    @Test func versionIsTheCodes() {
        expectTable("Versioning", [("major", [UInt64(PVABIVersion.current.major)]), ("minor", [UInt64(PVABIVersion.current.minor)])])
    }

    @Test func errorCodesAreTheHeadersValues() {
        expectTable("Error codes", HypercallError.all.map { ($0.name, [UInt64($0.code)]) })
    }

    @Test func featureBitsMatch() {
        expectTable("Feature bits", PVFeatures.names.map { ($0.0, [UInt64($0.1.rawValue.trailingZeroBitCount)]) })
        #expect(PVFeatures.names.reduce(PVFeatures()) { $0.union($1.1) } == PVFeatures.known)
    }

    @Test func everyHypercallIsDocumentedWithItsNumber() {
        expectTable("Hypercalls", PVHypercall.allCases.map { ("\($0)", [$0.rawValue]) })
    }

    @Test func flagsActionsAndDeviceKindsMatch() {
        expectTable("`mapGPARange` flags", [("read", [PVMapFlags.read]), ("write", [PVMapFlags.write]),
                                            ("execute", [PVMapFlags.execute]), ("replace", [PVMapFlags.replace])])
        expectTable("MSR actions", [("emulate", [UInt64(PVMSRAction.emulate.rawValue)]), ("passToL1", [UInt64(PVMSRAction.passToL1.rawValue)]),
                                    ("injectGP", [UInt64(PVMSRAction.injectGP.rawValue)]), ("passthrough", [UInt64(PVMSRAction.passthrough.rawValue)])])
        expectTable("L0 device kinds", [("latch", [PVL0Device.latch.rawValue])])
    }

    @Test func exitPageOffsetsAndSizesMatch() {
        expectTable("PV exit page", [
            ("exitReason", [RunPage.exitReason, 8]), ("exitQualification", [RunPage.exitQualification, 8]),
            ("guestPhysicalAddress", [RunPage.guestPhysicalAddress, 8]), ("guestLinearAddress", [RunPage.guestLinearAddress, 8]),
            ("instructionLength", [RunPage.instructionLength, 8]), ("instructionInfo", [RunPage.instructionInfo, 8]),
            ("vmxOperand", [RunPage.vmxOperand, 8]), ("exitInterruptionInfo", [RunPage.exitInterruptionInfo, 8]),
            ("vmxResult", [RunPage.vmxResult, 8]), ("vmInstructionError", [RunPage.vmInstructionError, 8]),
            ("eventInjection", [RunPage.eventInjection, 8]), ("eventErrorCode", [RunPage.eventErrorCode, 8]),
            ("enteredByVMExit", [RunPage.enteredByVMExit, 8]), ("exitInterruptionErrorCode", [RunPage.exitInterruptionErrorCode, 8]),
            ("registers", [RunPage.registers, RunPage.registersEnd - RunPage.registers]),
        ])
    }

    @Test func argumentPageStructuresMatch() {
        expectTable("`PVMapBatchEntry`", [
            ("l2GPA", [PVMapBatchEntry.l2GPA, 8]), ("l1GPA", [PVMapBatchEntry.l1GPA, 8]),
            ("length", [PVMapBatchEntry.length, 8]), ("flags", [PVMapBatchEntry.flags, 8]), ("(entry)", [0, PVMapBatchEntry.size]),
        ])
        expectTable("`PVMSRPolicyEntry`", [
            ("index", [PVMSRPolicyEntry.index, 4]), ("action", [PVMSRPolicyEntry.action, 4]),
            ("value", [PVMSRPolicyEntry.value, 8]), ("writableMask", [PVMSRPolicyEntry.writableMask, 8]),
            ("(entry)", [0, PVMSRPolicyEntry.size]),
        ])
        expectTable("`kvm_msr_entry`", [("index", [KVMMSREntry.index, 4]), ("data", [KVMMSREntry.data, 8]), ("(entry)", [0, KVMMSREntry.size])])
        let names = ["function", "index", "flags", "eax", "ebx", "ecx", "edx"]
        expectTable("`kvm_cpuid_entry2`", zip(names, CPUIDEntry.wordOffsets).map { ($0, [$1, 4]) } + [("(entry)", [0, CPUIDEntry.byteSize])])
        expectTable("Ucall block", [
            ("command", [Ucall.commandOffset, 8]), ("args", [Ucall.argsOffset, UInt64(Ucall.argCount) * 8]),
            ("message", [Ucall.messageOffset, UInt64(Ucall.messageCapacity)]), ("(block)", [0, Ucall.size]),
        ])
    }

    @Test func documentedLimitsAreTheCodes() {
        #expect(PVMapBatchEntry.maxPerCall == 128)
        #expect(PVMSRPolicyEntry.maxPerCall == 170)
        #expect(KVMMSREntry.maxPerCall == 256)
        let text = Self.table("Hypercalls")
        #expect(text["mapGPABatch"]?.last?.contains("> \(PVMapBatchEntry.maxPerCall)") == true)
        #expect(text["setMSRPolicy"]?.last?.contains("> \(PVMSRPolicyEntry.maxPerCall)") == true)
        #expect(text["getMSRs"]?.last?.contains("> \(KVMMSREntry.maxPerCall)") == true)
    }
}
