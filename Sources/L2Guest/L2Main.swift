import ABI
import Transport
#if canImport(Glibc)
import Glibc
#endif

/// The L2 process: map the shared memory, wait to be entered, run the guest program.
public enum L2Main {
    public static func run(_ launch: TierLaunch) -> Never {
        TierProcess.setName(.l2)
        guard TierProcess.dieWithParent(expectedParent: launch.parent) else { exit(1) }
        let placement = CPUPlacement(l0CPU: nil, guestCPU: launch.cpu)
        placement.apply(as: .l2)
        guard let program = GuestPrograms.named(launch.program) else {
            printError("pvm-l2: unknown guest program '\(launch.program)'")
            exit(2)
        }
        do {
            let control = try SharedRegion(adopt: TierLaunch.controlFD)
            let memory = HostMemory(region: try SharedRegion(adopt: TierLaunch.hostMemoryFD))
            let cpu = GuestCPU(run: try RunPageView(region: control, base: launch.layout.l2RunPage(launch.vcpu)),
                               handoff: Handoff(region: control, base: launch.layout.handoff(launch.vcpu)),
                               policy: placement.waitPolicy(for: .l2), memory: memory,
                               control: control, layout: launch.layout, vcpu: launch.vcpu)
            cpu.waitForFirstEntry()
            program.body(cpu, launch.programArguments)
            cpu.done()
            cpu.waitForTurn()   // L0 answers `done` with stop: exits 0 inside
            exit(0)
        } catch {
            printError("pvm-l2: \(error)")
            exit(3)
        }
    }
}
