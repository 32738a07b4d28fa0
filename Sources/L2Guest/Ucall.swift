import ABI

/// GUEST_SYNC / GUEST_ASSERT / GUEST_DONE, as KVM selftests spell them: the guest writes a ucall
/// block in its own memory and points the ucall port at it (RDI holds the block's GPA).
extension GuestCPU {
    func ucall(_ cmd: UcallCommand, _ args: [UInt64], message: String = "") {
        inHarness = true
        defer { inHarness = false }
        asKernel { kernelUcall(cmd, args, message: message) }
    }

    private func kernelUcall(_ cmd: UcallCommand, _ args: [UInt64], message: String) {
        write64(ucallBlock, cmd.rawValue)
        for i in 0..<Ucall.argCount {
            write64(ucallBlock + Ucall.argsOffset + UInt64(i) * 8, i < args.count ? args[i] : 0)
        }
        if cmd == .abort || cmd == .printf {
            var bytes = Array(message.utf8.prefix(Ucall.messageCapacity - 1))
            bytes.append(0)
            while bytes.count % 8 != 0 { bytes.append(0) }
            for chunk in stride(from: 0, to: bytes.count, by: 8) {
                var word: UInt64 = 0
                for j in 0..<8 { word |= UInt64(bytes[chunk + j]) << (8 * UInt64(j)) }
                write64(ucallBlock + Ucall.messageOffset + UInt64(chunk), word)
            }
        }
        repeat { run[register: .rdi] = ucallBlock.raw } while vmexit(.ioInstruction, length: 1,
            qualification: IOQualification.make(port: Ucall.port, size: 1, isIn: true)) == .retry
    }

    /// GUEST_SYNC(args...): the harness records the arguments and L2 continues.
    public func sync(_ args: UInt64...) { ucall(.sync, args) }

    /// GUEST_ASSERT: on failure the stack stops with this message (and where it came from).
    public func guestAssert(_ condition: Bool, _ message: @autoclosure () -> String = "",
                            file: StaticString = #fileID, line: UInt = #line) {
        guard !condition else { return }
        ucall(.abort, [UInt64(line)], message: "\(file):\(line): \(message())")
    }

    public func guestPrint(_ message: String) { ucall(.printf, [], message: message) }

    /// GUEST_DONE: the program finished; the harness stops the stack.
    public func done() { ucall(.done, []) }

    /// Hands the harness a latency measurement.
    public func report(samples: UInt64, min: UInt64, median: UInt64, p99: UInt64, max: UInt64, total: UInt64) {
        ucall(.report, [samples, min, median, p99, max, total])
    }
}
