/// The one median the suites report: the middle value of the sorted samples, or the mean of the
/// two middle values for an even count; 0 for no samples.
enum Median {
    static func of(_ xs: [Double]) -> Double {
        let s = xs.sorted()
        guard !s.isEmpty else { return 0 }
        return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
    }

    static func of(_ xs: [UInt64]) -> UInt64 {
        let s = xs.sorted()
        guard !s.isEmpty else { return 0 }
        // Halves first: the sum of two large samples could overflow.
        return s.count % 2 == 1 ? s[s.count / 2] : s[s.count / 2 - 1] / 2 + s[s.count / 2] / 2 + (s[s.count / 2 - 1] % 2 + s[s.count / 2] % 2) / 2
    }
}
