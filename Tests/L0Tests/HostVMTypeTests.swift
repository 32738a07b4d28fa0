import ABI
import Testing
@testable import L0

extension HostTests {
    @Suite struct VMTypes {
        @Test func typeNumbersAreTheUpstreamUAPIs() {
            #expect(VMType.allCases.map(\.rawValue) == [0, 1, 2, 3, 4, 5])
            #expect(VMType.default.uapiName == "KVM_X86_DEFAULT_VM")
            #expect(VMType.swProtected.uapiName == "KVM_X86_SW_PROTECTED_VM")
            #expect(VMType.sevES.uapiName == "KVM_X86_SEV_ES_VM")
            #expect(VMType.tdx.uapiName == "KVM_X86_TDX_VM" && VMType.tdx.rawValue == 5)
            #expect(KVMCapability.vmTypes == 235)
        }

        @Test func supportedTypesAreOneBitPerType() throws {
            let host = try HostTests.host(atLoad: true, setup: .atLoad)
            #expect(host.supportedVMTypes.rawValue == 0b10_0011)   // default, sw-protected, tdx
            #expect(host.checkExtension(KVMCapability.vmTypes) == 0b10_0011)
            #expect(host.checkExtension(1) == 0)
            #expect(host.supportedVMTypes.types == [.default, .swProtected, .tdx])
            #expect(!VMTypeMask(rawValue: .max).contains(rawType: 32))
        }

        @Test func capabilitiesAreBooleansSetFromTheTypeAsKVMDoes() throws {
            let all = VMTypeMask(VMType.allCases)
            let host = try HostTests.host(atLoad: true, setup: .onFirstProtectedVM, types: all)
            let expected: [(VMType, Bool, Bool)] = [
                (.default, false, false), (.swProtected, true, false), (.sev, false, false),
                (.sevES, false, true), (.snp, true, true), (.tdx, true, true),
            ]
            for (type, privateMem, protectedState) in expected {
                let vm = try host.createVM(type: type)
                #expect(vm.type == type)
                #expect(vm.hasPrivateMem == privateMem, "\(type)")
                #expect(vm.hasProtectedState == protectedState, "\(type)")
            }
        }

        @Test(arguments: [UInt32(2), 6, 31, 32, .max])
        func aTypeTheHostDoesNotSupportIsRefusedAndChangesNothing(raw: UInt32) throws {
            let host = try HostTests.host(atLoad: false, setup: .atLoad)
            let supported = host.supportedVMTypes
            #expect(throws: HostError.unsupportedVMType(rawType: raw, supported: supported)) {
                try host.createVM(rawType: raw)
            }
            #expect(host.usageCount == 0 && host.enabledCPUs.isEmpty && host.vms.isEmpty)
        }

        @Test func theRefusalNamesTheTypeAndWhatIsSupported() {
            let e = HostError.unsupportedVMType(rawType: 2, supported: L0Host.defaultHardwareVMTypes)
            #expect(e.description.contains("KVM_X86_SEV_VM") && e.description.contains("tdx"))
        }
    }

    @Suite struct PVNesting {
        @Test func ordinaryAndSoftwareProtectedVMsMayRunAPVNestedL2() throws {
            let host = try HostTests.host(atLoad: true)
            for type in [VMType.default, .swProtected] {
                let vm = try host.createVM(type: type)
                #expect(vm.mayRunPVNestedGuest)
                try vm.checkMayRunPVNestedGuest()
            }
        }

        @Test(arguments: [VMType.sevES, .snp, .tdx])
        func aProtectedStateVMIsRefusedWithTheReason(type: VMType) throws {
            let host = try HostTests.host(atLoad: true, setup: .atLoad, types: VMTypeMask(VMType.allCases))
            let vm = try host.createVM(type: type)
            #expect(!vm.mayRunPVNestedGuest)
            #expect(throws: HostError.pvNestingRefused(vm: vm.id, type: type)) { try vm.checkMayRunPVNestedGuest() }
            let why = HostError.pvNestingRefused(vm: vm.id, type: type).description
            #expect(why.contains("protected state") && why.contains("TCB"))
        }
    }
}
