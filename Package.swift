// swift-tools-version: 6.0
import PackageDescription

// One target, one job:
//   CPVMShim   the C view of linux-libc-dev (<linux/kvm.h>, <asm/vmx.h>, <linux/kvm_para.h>), futex, memfd, spawn
//   ABI        definitions only: address types, exit reasons, VMCS encodings, the PV ABI, page layouts
//   Transport  every raw pointer and shared-memory access: memfd regions, run pages, the handoff word, processes
//   L0         the host hypervisor: memslots, EPT02, exit handlers for L2 and L1, the vCPU state machine
//   GuestDevices  the device model under the guest program (serial, latches, MSRs), shared by
//                 both L1 personalities and by L0 on the one-level path
//   L1PV       the guest hypervisor: a PV personality and a KVM-like nested-VMX personality
//   L2Guest    the nested guest: a guest CPU and selftest-style guest programs
//   Bench      runs stacks and turns their counters and latencies into tables and JSON
//   pvm        the command-line front end
let package = Package(
    name: "pvm",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "pvm", targets: ["pvm"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.3.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
        .package(url: "https://github.com/x-sheep/swift-property-based", from: "2.0.1"),
    ],
    targets: [
        .target(name: "CPVMShim"),
        .target(name: "ABI", dependencies: ["CPVMShim"]),
        .target(name: "Transport", dependencies: [
            "ABI", "CPVMShim",
            .product(name: "Atomics", package: "swift-atomics"),
        ]),
        .target(name: "GuestDevices", dependencies: ["ABI", "Transport"]),
        .target(name: "L0", dependencies: ["ABI", "Transport", "GuestDevices"]),
        .target(name: "L1PV", dependencies: [
            "ABI", "Transport", "GuestDevices",
            .product(name: "Atomics", package: "swift-atomics"),
        ]),
        .target(name: "L2Guest", dependencies: [
            "ABI", "Transport",
            .product(name: "Histogram", package: "hdrhistogram-swift"),
        ]),
        .target(name: "Bench", dependencies: ["ABI", "L0", "L2Guest"], resources: [.copy("Profiles")]),
        .executableTarget(name: "pvm", dependencies: [
            "ABI", "Transport", "L0", "L1PV", "L2Guest", "Bench",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        // Seeded random inputs for the property tests, shared by the test targets that need them.
        .target(name: "TestSupport", path: "Tests/TestSupport"),
        .testTarget(name: "ABITests", dependencies: [
            "ABI", "Transport", "TestSupport", .product(name: "PropertyBased", package: "swift-property-based"),
        ]),
        .testTarget(name: "TransportTests", dependencies: ["ABI", "Transport"]),
        .testTarget(name: "L2GuestTests", dependencies: ["ABI", "L2Guest", "TestSupport"]),
        .testTarget(name: "L0Tests", dependencies: [
            "ABI", "Transport", "GuestDevices", "L0", "L1PV", "TestSupport",
            .product(name: "PropertyBased", package: "swift-property-based"),
        ]),
        // Launches the three real processes: depends on the executable so `swift test` builds it.
        .testTarget(name: "StackTests", dependencies: ["ABI", "Transport", "L0", "L1PV", "Bench", "pvm"],
                    exclude: ["Golden"]),   // read through #filePath, so a fresh clone compares against the committed file
    ]
)
