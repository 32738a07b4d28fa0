import ABI
import Transport
#if canImport(Glibc)
import Glibc
#endif

/// The L2 process: map the shared memory, wait to be entered, run the guest program.
public enum L2Main {
    public static func run(_ launch: TierLaunch) -> Never {
        guard let program = GuestPrograms.named(launch.program) else {
            printError("pvm-l2: unknown guest program '\(launch.program)'")
            exit(2)
        }
        if let problem = program.problem(with: launch.programArguments) {
            printError("pvm-l2: \(problem)")
            exit(2)
        }
        do {
            // vCPUs past the first run on threads of their own, started before the sandbox.
            let threads = TierThreads()
            let session = try TierSession(.l2, launch) { session in
                threads.start(1..<launch.layout.vcpuCount) { i in runVCPU(session.vcpu(i), program, launch) }
            }
            threads.open()
            runVCPU(session, program, launch)
        } catch {
            printError("pvm-l2: \(error)")
            exit(3)
        }
    }

    /// One vCPU: wait to be entered, run the program, say done, wait for L0's stop.
    static func runVCPU(_ session: TierSession, _ program: GuestProgram, _ launch: TierLaunch) -> Never {
        do {
            let cpu = try GuestCPU(session: session)
            cpu.waitForFirstEntry()
            program.body(cpu, launch.programArguments)
            cpu.done()
            session.waitForTurn()   // L0 answers the last `done` with stop: exits 0 inside
            exit(0)
        } catch {
            printError("pvm-l2: vCPU \(session.vcpu): \(error)")
            exit(3)
        }
    }
}
