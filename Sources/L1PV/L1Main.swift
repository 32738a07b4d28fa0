import ABI
import GuestDevices
import Transport
#if canImport(Glibc)
import Glibc
#endif

/// The L1 process: map the shared memory, wait to be entered, run the personality for the path.
public enum L1Main {
    public static func run(_ launch: TierLaunch) -> Never {
        do {
            let session = try TierSession(.l1, launch)
            let cpu = L1CPU(session: session)
            let memory = L1Memory(slot: launch.l1Slot, host: session.hostMemory, trap: cpu)
            cpu.waitForFirstEntry()
            switch launch.path {
            case .single: throw L1Fault.unexpectedExit(.vmcall, "the one-level path has no L1")
            case .pv: try PVHypervisor(cpu: cpu, memory: memory, features: launch.pvFeatures, mapMode: launch.l2MapMode).run()
            case .pvmRFC: try PVMHypervisor(cpu: cpu, memory: memory, session: session).run()
            case .nvmx, .nvmxNoShadow, .nvmxEVMCS:
                try NestedVMXHypervisor(cpu: cpu, memory: memory, enlightened: launch.path.enlightenedVMCS,
                                        mapMode: launch.l2MapMode).run()
            }
        } catch {
            printError("pvm-l1: \(error)")
            exit(3)
        }
    }
}
