import ABI
import Transport
#if canImport(Glibc)
import Glibc
#endif

/// The L1 process: map the shared memory, wait to be entered, run the personality for the path.
public enum L1Main {
    public static func run(_ launch: TierLaunch) -> Never {
        TierProcess.setName(.l1)
        guard TierProcess.dieWithParent(expectedParent: launch.parent) else { exit(1) }
        let placement = CPUPlacement(l0CPU: nil, guestCPU: launch.cpu)
        placement.apply(as: .l1)
        do {
            let control = try SharedRegion(adopt: TierLaunch.controlFD)
            var memory = L1Memory(slot: launch.l1Slot, host: HostMemory(region: try SharedRegion(adopt: TierLaunch.hostMemoryFD)))
            let cpu = try L1CPU(control: control, layout: launch.layout, vcpu: launch.vcpu,
                                policy: placement.waitPolicy(for: .l1))
            memory.trap = cpu
            cpu.waitForFirstEntry()
            switch launch.path {
            case .pv: try PVHypervisor(cpu: cpu, memory: memory, features: launch.pvFeatures, mapMode: launch.l2MapMode).run()
            case .nvmx, .nvmxNoShadow, .nvmxEVMCS: try NestedVMXHypervisor(cpu: cpu, memory: memory, enlightened: launch.path.enlightenedVMCS, mapMode: launch.l2MapMode).run()
            }
        } catch {
            printError("pvm-l1: \(error)")
            exit(3)
        }
    }
}
