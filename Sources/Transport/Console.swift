#if canImport(Glibc)
import Glibc
#endif

/// Writes a line to standard error (unbuffered: tiers may be killed at any moment).
public func printError(_ line: String) {
    var s = line
    if !s.hasSuffix("\n") { s += "\n" }
    s.withCString { p in _ = write(2, p, strlen(p)) }
}

/// Writes text to standard output unbuffered (the serial console L1 emulates).
public func writeOut(_ text: String) {
    text.withCString { p in _ = write(1, p, strlen(p)) }
}
