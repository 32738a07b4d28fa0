import ABI
import Testing

@Suite struct CPUIDTableTests {
    let table = CPUIDTable([
        CPUIDEntry(function: 0, eax: 7, ebx: 1, ecx: 2, edx: 3),
        CPUIDEntry(function: 7, index: 0, flags: CPUIDEntry.significantIndex, eax: 70, ebx: 0, ecx: 0, edx: 0),
        CPUIDEntry(function: 7, index: 1, flags: CPUIDEntry.significantIndex, eax: 71, ebx: 0, ecx: 0, edx: 0),
        CPUIDEntry(function: 1, eax: 10, ebx: 11, ecx: 12, edx: 13),
    ])

    @Test func indexMattersOnlyWhenTheEntrySaysSo() {
        #expect(table.lookup(function: 7, index: 1).0 == 71)
        #expect(table.lookup(function: 1, index: 5) == (10, 11, 12, 13))
        #expect(table.lookup(function: 7, index: 2) == (0, 0, 0, 0))
    }

    @Test func basicLeafAboveTheMaximumAnswersLikeTheMaximumLeaf() {
        #expect(table.lookup(function: 9, index: 0).0 == 70)
        // No extended class at all: out of range too (KVM's get_out_of_range_cpuid_entry).
        #expect(table.lookup(function: 0x8000_0005, index: 0).0 == 70)
    }

    @Test func aMissingLeafInsideItsClassReadsZeros() {
        let t = CPUIDTable(table.entries + [CPUIDEntry(function: 0x8000_0000, eax: 0x8000_0008, ebx: 0, ecx: 0, edx: 0)])
        #expect(t.lookup(function: 0x8000_0005, index: 0) == (0, 0, 0, 0))
        #expect(t.lookup(function: 0x8000_0009, index: 0).0 == 70)
        #expect(table.lookup(function: 3, index: 0) == (0, 0, 0, 0))       // basic, within max 7
    }

    @Test func amdVendorsReadZerosOutOfRange() {
        let amd = CPUIDTable([CPUIDEntry(function: 0, eax: 1, ebx: 0x6874_7541, ecx: 0x444D_4163, edx: 0x6974_6E65),
                              CPUIDEntry(function: 1, eax: 5, ebx: 0, ecx: 0, edx: 0)])
        #expect(amd.lookup(function: 9, index: 0) == (0, 0, 0, 0))
    }
}
