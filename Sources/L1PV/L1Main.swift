import ABI
import Atomics
import GuestDevices
import Transport
#if canImport(Glibc)
import Glibc
#endif

/// The L1 process: map the shared memory, wait to be entered, run the personality for the path.
public enum L1Main {
    public static func run(_ launch: TierLaunch) -> Never {
        do {
            // vCPUs past the first run on threads of their own, started before the sandbox;
            // each waits until vCPU 0 has made the VM's state (`shared`).
            let threads = TierThreads()
            let shared = Shared()
            let session = try TierSession(.l1, launch) { session in
                threads.start(1..<launch.layout.vcpuCount) { i in runVCPU(session.vcpu(i), shared) }
            }
            let cpu = L1CPU(session: session)
            let memory = L1Memory(slot: launch.l1Slot, host: session.hostMemory, trap: cpu)
            switch launch.path {
            case .pv: shared.pv = PVL1VM(features: launch.pvFeatures, mapMode: launch.l2MapMode)
            case .nvmx, .nvmxNoShadow, .nvmxEVMCS: shared.nestedVMX = try NestedL1VM(memory: memory, vcpus: launch.layout.vcpuCount)
            case .single, .pvmRFC: break
            }
            shared.made.store(true, ordering: .releasing)
            threads.open()
            run(session, cpu, memory, shared)
        } catch {
            printError("pvm-l1: \(error)")
            exit(3)
        }
    }

    /// The VM state L1's vCPU threads share, made by vCPU 0 before any runs.
    final class Shared: @unchecked Sendable {
        var pv: PVL1VM?
        var nestedVMX: NestedL1VM?
        let made = ManagedAtomic<Bool>(false)
    }

    static func runVCPU(_ session: TierSession, _ shared: Shared) -> Never {
        while !shared.made.load(ordering: .acquiring) { sched_yield() }
        let cpu = L1CPU(session: session)
        run(session, cpu, L1Memory(slot: session.launch.l1Slot, host: session.hostMemory, trap: cpu), shared)
    }

    /// One vCPU: wait to be entered, run the personality for the path.
    static func run(_ session: TierSession, _ cpu: L1CPU, _ memory: L1Memory, _ shared: Shared) -> Never {
        let launch = session.launch
        do {
            cpu.waitForFirstEntry()
            switch launch.path {
            case .single: throw L1Fault.unexpectedExit(.vmcall, "the one-level path has no L1")
            case .pv: try PVHypervisor(cpu: cpu, memory: memory, vm: shared.pv!, vcpu: session.vcpu).run()
            case .pvmRFC: try PVMHypervisor(cpu: cpu, memory: memory, session: session).run()
            case .nvmx, .nvmxNoShadow, .nvmxEVMCS:
                try NestedVMXHypervisor(cpu: cpu, memory: memory, vm: shared.nestedVMX!, vcpu: session.vcpu,
                                        enlightened: launch.path.enlightenedVMCS, mapMode: launch.l2MapMode).run()
            }
        } catch {
            printError("pvm-l1: vCPU \(session.vcpu): \(error)")
            exit(3)
        }
    }
}
