import ABI
import Foundation
import L0

/// `pvm bench --svg FILE`: one horizontal bar per test and path, its length the modelled cycles
/// per operation on a log scale, split by where the work happens (world switches, L0, L1); the
/// measured median is printed beside it. On a log axis the split is drawn in proportion within
/// the bar (the legend says so).
public enum SVGChart {
    enum Part: CaseIterable {
        case worldSwitch, l0, l1
        var color: String { switch self { case .worldSwitch: "#9aa5b1"; case .l0: "#2f6fb3"; case .l1: "#d9822b" } }
        var label: String { switch self { case .worldSwitch: "world switches"; case .l0: "L0 work"; case .l1: "L1 work" } }
    }

    static func part(_ e: CostProfile.Event) -> Part {
        switch e {
        case .exitRoundTrip: .worldSwitch
        case .l1ExitHandling: .l1
        default: .l0
        }
    }

    static func esc(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }

    public static func render(_ results: [BenchResult], profile: CostProfile) -> String {
        let rowH = 18.0, left = 260.0, width = 560.0, top = 40.0
        let totals = results.map { CostModel.cyclesPerOp($0, profile) }
        let maxV = max(10, totals.max() ?? 10)
        let decades = Int((log10(maxV)).rounded(.up))
        func x(_ v: Double) -> Double { v <= 1 ? 0 : width * log10(v) / Double(decades) }
        let height = top + Double(results.count) * rowH + 60
        var s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(left + width + 160))\" height=\"\(Int(height))\" font-family=\"sans-serif\" font-size=\"11\">\n"
        s += "<text x=\"10\" y=\"18\" font-size=\"14\">Modelled cycles per operation (log scale), profile \(esc(profile.name)); measured median at right</text>\n"
        for d in 0...decades {
            let gx = left + width * Double(d) / Double(decades)
            s += "<line x1=\"\(gx)\" y1=\"\(top - 6)\" x2=\"\(gx)\" y2=\"\(top + Double(results.count) * rowH)\" stroke=\"#ddd\"/>"
            s += "<text x=\"\(gx - 8)\" y=\"\(top - 10)\">1e\(d)</text>\n"
        }
        for (i, r) in results.enumerated() {
            let y = top + Double(i) * rowH
            s += "<text x=\"10\" y=\"\(y + 12)\">\(esc(r.test)) \(esc(r.variant.label))</text>"
            let total = totals[i], length = x(total)
            var cursor = left
            let lines = CostModel.lines(r, profile)
            for p in Part.allCases {
                let share = total == 0 ? 0 : lines.filter { part($0.event) == p }.reduce(0) { $0 + $1.subtotal } / total
                let w = length * share
                if w > 0 { s += "<rect x=\"\(cursor)\" y=\"\(y + 2)\" width=\"\(w)\" height=\"\(rowH - 4)\" fill=\"\(p.color)\"/>" }
                cursor += w
            }
            s += "<text x=\"\(left + width + 8)\" y=\"\(y + 12)\">\(Int(total)) cyc, \(r.latency.medianNanos) ns</text>\n"
        }
        let ly = top + Double(results.count) * rowH + 24
        for (i, p) in Part.allCases.enumerated() {
            let lx = left + Double(i) * 150
            s += "<rect x=\"\(lx)\" y=\"\(ly)\" width=\"12\" height=\"12\" fill=\"\(p.color)\"/><text x=\"\(lx + 16)\" y=\"\(ly + 10)\">\(p.label)</text>"
        }
        s += "<text x=\"10\" y=\"\(ly + 30)\" fill=\"#666\">segments are drawn in proportion within each bar</text>\n</svg>\n"
        return s
    }
}
