import ABI
import PropertyBased
import Testing
import Transport
@testable import L0

/// Whatever L1 puts in vmcs12 or EPT12, L0 answers with VMfail, an entry failure, a reflected
/// exit or an EPT misconfig; it never crashes and never lets EPT02 point outside L1 memory.
@Suite struct GarbageInputTests {
    @Test func randomVMCS12ContentsNeverCrashAVMEntry() async {
        let word = Gen.int(in: 0...Int.max).map { UInt64($0) | (UInt64.random(in: 0...1) << 63) }
        await propertyCheck(count: 200, input: word.array(of: 1...40), Gen.int(in: 0...1)) { words, launch in
            guard let f = try? Fixture(.nvmx) else { Issue.record("fixture"); return }
            guard (try? f.loadValidVMCS12()) != nil else { Issue.record("vmcs12"); return }
            // Overwrite random fields of vmcs12 (through L0's view of L1 memory) with garbage.
            guard let v = f.nested.vmcs12 else { return }
            for (i, w) in words.enumerated() {
                let (field, _) = VMCSField.supported[(Int(w % 1000) + i * 7) % VMCSField.supported.count]
                v.write(field, w)
            }
            let outcome = f.vmx(launch == 0 ? .vmlaunch : .vmresume)
            switch outcome {
            case .enterL2:
                // Entered: EPT02 starts empty and the entry is one a real CPU could make.
                #expect(f.vcpu.ept02.present.isEmpty)
            case .resume(.l1):
                #expect([0, 1, 2].contains(f.l1Run[RunPage.vmxResult]) || f.l1Run[RunPage.enteredByVMExit] == 1)
            case .stop(let r):
                Issue.record("garbage vmcs12 stopped the stack: \(r)")
            case .resume:
                Issue.record("a VM entry must enter L2 or return to L1, not \(outcome)")
            }
        }
    }

    @Test func randomEPT12TablesNeverPutEPT02OutsideL1Memory() async {
        let entry = Gen.int(in: 0...Int.max).map { UInt64($0) }
        await propertyCheck(count: 200, input: entry.array(of: 4...4), Gen.int(in: 0...511)) { entries, page in
            guard let f = try? Fixture(.nvmx), (try? f.launchL2()) != nil else { Issue.record("fixture"); return }
            // A random entry at each level of the path of one L2 GPA; tables chained where they point.
            let gpa = UInt64(page) << 12
            for (i, e) in entries.enumerated() {
                let level = 4 - i
                let table = Plan.ept12Tables[i]
                // Half the time keep the chain intact so deeper levels are reached.
                let value = (i < 3 && e & 1 == 0) ? (Plan.ept12Tables[i + 1].raw | (e & 0x7) | 1) : e
                try? f.store64(value, L1GPA(table.raw + Fixture.eptIndex(gpa, level: level) * 8))
            }
            let outcome = f.l2Exit(L2ExitInfo(reason: .eptViolation, qualification: EPTViolationQualification.dataRead,
                                             guestPhysicalAddress: L2GPA(gpa), instructionLength: 3))
            switch outcome {
            case .resume(.l2):
                let e = f.vcpu.ept02.entry(L2GPA(gpa))
                if EPT02Entry.isPresent(e, generation: f.vcpu.ept02.generation) {
                    let host = EPT02Entry.host(e).raw
                    #expect(host >= Plan.slotHost.raw && host + pageSize <= Plan.slotHost.raw + Plan.slotSize)
                } else {
                    #expect(f.vcpu.counters.unbackedAccesses == 1)     // completed as unassigned, nothing mapped
                }
            case .resume(.l1):
                let reason = f.nested.vmcs12?[.vmExitReason]
                #expect(reason == UInt64(ExitReason.eptViolation.rawValue) || reason == UInt64(ExitReason.eptMisconfig.rawValue))
            case .stop(let r):
                Issue.record("garbage EPT12 stopped the stack: \(r)")
            case .enterL2, .resume(.l0):
                Issue.record("an EPT violation must resume L2 or reach L1, not \(outcome)")
            }
        }
    }
}
