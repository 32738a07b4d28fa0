import ABI
import Foundation
import L0

/// `pvm bench --svg FILE`: two panels a person reads at a glance.
///
/// 1. **What each path costs** (log scale): per test, one bar per path (or variant), its length
///    the modelled cycles per operation, its colour the path's (fixed, so `nvmx` is the same
///    colour in every chart); the modelled total and the measured median are printed beside it.
/// 2. **Where the cycles go** (linear scale, one scale per test): the same bars split into world
///    switches, L0 work and L1 work. A split is only drawn on a linear axis: on a log axis a
///    segment's length does not say its share.
///
/// Every bar carries `class`, `data-test`, `data-variant` (and `data-part` for a segment) so a
/// test, or a user's script, can read the chart's structure back.
public enum SVGChart {
    /// Where a priced line's cycles go in the second panel (the model says whose work it is).
    typealias Part = CostModel.Part

    /// Each path's colour (colour-blind-safe, Okabe-Ito), the same in every chart.
    public static func color(of path: NestingPath) -> String {
        switch path {
        case .single: "#555555"
        case .pv: "#009e73"
        case .nvmx: "#0072b2"
        case .nvmxNoShadow: "#cc79a7"
        case .nvmxEVMCS: "#e69f00"
        case .pvmRFC: "#d55e00"
        }
    }

    static func esc(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&quot;")
    }

    static func f(_ v: Double) -> String { String(format: "%.1f", v) }

    /// 1, 10, 100, 1k, 10k...
    static func decadeLabel(_ d: Int) -> String {
        switch d {
        case 0..<3: String(Int(pow(10, Double(d))))
        case 3..<6: "\(Int(pow(10, Double(d - 3))))k"
        default: "\(Int(pow(10, Double(d - 6))))M"
        }
    }

    // Geometry, in px: the bar area, one bar's height, a test header's, the margin. The label and
    // value columns are as wide as their longest text (about 7 px a character at 12 px).
    static let barWidth = 520.0, rowHeight = 20.0, headerHeight = 22.0, margin = 12.0
    static func textWidth(_ s: String, px: Double = 12) -> Double { Double(s.count) * px * 0.6 }

    /// The part of each result's modelled cycles that goes to each part of the second panel.
    static func split(_ r: BenchResult, _ profile: CostProfile) -> [(Part, Double)] {
        let lines = CostModel.lines(r, profile)
        return Part.allCases.map { p in (p, lines.filter { $0.part == p }.reduce(0) { $0 + $1.subtotal }) }
    }

    static func splitText(_ parts: [(Part, Double)]) -> String {
        let shown = parts.filter { $0.1 > 0 }.map { "\($0.0.label) \(Report.fmt($0.1, 0))" }
        return shown.isEmpty ? "no priced events" : shown.joined(separator: ", ")
    }

    public static func render(_ results: [BenchResult], profile: CostProfile) -> String {
        // Profiles cap their prices (CostProfile.maxCycles), so totals are finite; a non-finite
        // one is drawn as no bar rather than trusted.
        let totals = results.map { r -> Double in let t = CostModel.cyclesPerOp(r, profile); return t.isFinite ? max(0, t) : 0 }
        let splits = results.map { split($0, profile) }
        let labelWidth = max(150, (results.map { textWidth($0.variant.label) + 12 } + results.map { textWidth($0.test) }).max() ?? 0) + 16
        let valueTexts = results.indices.map { "\(Report.fmt(totals[$0], 0)) cyc, \(results[$0].latency.medianNanos) ns measured" }
        let valueWidth = max(200, (valueTexts.map { textWidth($0) } + splits.map { textWidth(splitText($0), px: 11) }).max() ?? 0) + 16
        // Groups in the order tests first appear; rows in run order within a test.
        var tests: [String] = []
        for r in results where !tests.contains(r.test) { tests.append(r.test) }
        let groups = tests.map { t in results.indices.filter { results[$0].test == t } }
        let rows = Double(results.count), heads = Double(groups.count)
        let panelHeight = 34 + heads * headerHeight + rows * rowHeight + 40
        let legendHeight = 40.0
        let width = margin * 2 + labelWidth + barWidth + valueWidth
        let height = 36 + panelHeight * 2 + legendHeight + 20
        var s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(width))\" height=\"\(Int(height))\" "
            + "viewBox=\"0 0 \(Int(width)) \(Int(height))\" font-family=\"sans-serif\" font-size=\"12\">\n"
        s += "<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n"
        s += "<text x=\"\(margin)\" y=\"22\" font-size=\"15\" font-weight=\"bold\">pvm bench: modelled cycles per operation "
            + "(profile \(esc(profile.name))) and measured time</text>\n"

        // Panel 1: log scale, one colour per path.
        var y = 36.0
        let maxTotal = max(10, totals.max() ?? 10)
        let decades = max(1, Int(log10(maxTotal).rounded(.up)))
        func logX(_ v: Double) -> Double { v <= 1 ? 0 : barWidth * min(1, log10(v) / Double(decades)) }
        s += "<g id=\"log-panel\">\n"
        s += "<text x=\"\(margin)\" y=\"\(f(y + 14))\" font-size=\"13\" font-weight=\"bold\">What each path costs "
            + "(modelled cycles per operation, log scale; modelled and measured at right)</text>\n"
        y += 34
        let x0 = margin + labelWidth
        let plotTop = y
        for (gi, group) in groups.enumerated() {
            s += "<text class=\"test-label\" x=\"\(margin)\" y=\"\(f(y + 15))\" font-weight=\"bold\">\(esc(tests[gi]))</text>\n"
            y += headerHeight
            for i in group {
                let r = results[i]
                s += "<text x=\"\(margin + 12)\" y=\"\(f(y + 14))\">\(esc(r.variant.label))</text>"
                s += "<rect class=\"bar\" data-test=\"\(esc(r.test))\" data-variant=\"\(esc(r.variant.label))\" "
                    + "data-cycles=\"\(f(totals[i]))\" x=\"\(f(x0))\" y=\"\(f(y + 3))\" width=\"\(f(logX(totals[i])))\" "
                    + "height=\"\(f(rowHeight - 6))\" fill=\"\(color(of: r.path))\"/>"
                s += "<text class=\"value\" x=\"\(f(x0 + barWidth + 8))\" y=\"\(f(y + 14))\">\(valueTexts[i])</text>\n"
                y += rowHeight
            }
        }
        // The axis: a grid line and a label per decade, and what it measures.
        for d in 0...decades {
            let gx = x0 + barWidth * Double(d) / Double(decades)
            s += "<line x1=\"\(f(gx))\" y1=\"\(f(plotTop))\" x2=\"\(f(gx))\" y2=\"\(f(y + 4))\" stroke=\"#d0d0d0\"/>"
            s += "<text class=\"tick\" x=\"\(f(gx))\" y=\"\(f(y + 18))\" text-anchor=\"middle\">\(decadeLabel(d))</text>\n"
        }
        s += "<text class=\"axis-label\" x=\"\(f(x0 + barWidth / 2))\" y=\"\(f(y + 34))\" text-anchor=\"middle\">"
            + "modelled cycles per operation (log scale)</text>\n"
        s += "</g>\n"
        y += 46

        // Panel 2: linear, one scale per test, split by where the work happens.
        s += "<g id=\"linear-panel\">\n"
        s += "<text x=\"\(margin)\" y=\"\(f(y + 14))\" font-size=\"13\" font-weight=\"bold\">Where the cycles go "
            + "(linear scale, one per test: the test's largest bar is full width)</text>\n"
        y += 34
        for (gi, group) in groups.enumerated() {
            let scale = max(1, group.map { totals[$0] }.max() ?? 1)
            s += "<text class=\"test-label\" x=\"\(margin)\" y=\"\(f(y + 15))\" font-weight=\"bold\">\(esc(tests[gi]))</text>"
            s += "<text class=\"axis-label\" x=\"\(f(x0 + barWidth))\" y=\"\(f(y + 15))\" text-anchor=\"end\" fill=\"#555\">"
                + "0 to \(Int(scale.rounded())) cycles</text>\n"
            y += headerHeight
            for i in group {
                let r = results[i]
                s += "<text x=\"\(margin + 12)\" y=\"\(f(y + 14))\">\(esc(r.variant.label))</text>"
                var cursor = x0
                for (p, cycles) in splits[i] where cycles > 0 && cycles.isFinite {
                    let w = barWidth * cycles / scale
                    s += "<rect class=\"segment\" data-test=\"\(esc(r.test))\" data-variant=\"\(esc(r.variant.label))\" "
                        + "data-part=\"\(p.rawValue)\" data-cycles=\"\(f(cycles))\" x=\"\(f(cursor))\" y=\"\(f(y + 3))\" "
                        + "width=\"\(f(w))\" height=\"\(f(rowHeight - 6))\" fill=\"\(p.color)\"/>"
                    cursor += w
                }
                s += "<text class=\"value\" x=\"\(f(x0 + barWidth + 8))\" y=\"\(f(y + 14))\" font-size=\"11\">"
                    + "\(esc(splitText(splits[i])))</text>\n"
                y += rowHeight
            }
        }
        s += "</g>\n"
        y += 16

        // Legends: the paths present, then the parts.
        s += "<g id=\"legend\">\n"
        var lx = margin
        var paths: [NestingPath] = []
        for r in results where !paths.contains(r.path) { paths.append(r.path) }
        for p in paths {
            s += "<rect class=\"legend-path\" data-path=\"\(p.rawValue)\" x=\"\(f(lx))\" y=\"\(f(y))\" width=\"12\" height=\"12\" fill=\"\(color(of: p))\"/>"
            s += "<text x=\"\(f(lx + 16))\" y=\"\(f(y + 10))\">\(p.rawValue)</text>"
            lx += 24 + Double(p.rawValue.count) * 7.5
        }
        lx = margin
        for p in Part.allCases {
            s += "<rect class=\"legend-part\" data-part=\"\(p.rawValue)\" x=\"\(f(lx))\" y=\"\(f(y + 20))\" width=\"12\" height=\"12\" fill=\"\(p.color)\"/>"
            s += "<text x=\"\(f(lx + 16))\" y=\"\(f(y + 30))\">\(p.label)</text>"
            lx += 140
        }
        s += "\n</g>\n</svg>\n"
        return s
    }
}

extension CostModel.Part {
    var color: String {
        switch self { case .worldSwitch: "#8d99a6"; case .l0: "#2f6fb3"; case .l1: "#d9822b"; case .l2: "#6a9f58" }
    }
    var label: String {
        switch self { case .worldSwitch: "world switches"; case .l0: "L0 work"; case .l1: "L1 work"; case .l2: "L2's own work" }
    }
}
