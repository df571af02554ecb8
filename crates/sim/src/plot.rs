//! Line charts as SVG text (no dependency, no I/O): the caller writes the file.

use std::fmt::Write;

/// One line of a chart.
pub struct Series<'a> {
    /// Legend.
    pub label: &'a str,
    /// Colour (any SVG colour).
    pub colour: &'a str,
    /// One value per step.
    pub values: &'a [f64],
}

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 360.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 40.0;
/// Most points drawn per line: longer series are cut into buckets, each drawn as its maximum
/// (a peak must stay visible).
const MAX_POINTS: usize = 1600;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" step for about five grid lines up to `max`.
fn grid_step(max: f64) -> f64 {
    let raw = (max / 5.0).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

/// A chart of `series` over steps of `step_s` seconds, x axis in days.
pub fn line_chart(title: &str, y_label: &str, step_s: f64, series: &[Series]) -> String {
    let steps = series
        .iter()
        .map(|s| s.values.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let y_max = series
        .iter()
        .flat_map(|s| s.values.iter())
        .fold(0.0f64, |a, b| a.max(*b))
        .max(1e-9);
    let grid = grid_step(y_max);
    let top_value = (y_max / grid).ceil() * grid;
    let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let x = |step: f64| LEFT + pw * step / steps as f64;
    let y = |v: f64| TOP + ph * (1.0 - v / top_value);
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{LEFT}" y="20" font-size="14" font-weight="bold">{}</text>
"#,
        escape(title)
    );
    // Horizontal grid with values.
    let mut v = 0.0;
    while v <= top_value + 1e-9 {
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            y(v) + 4.0,
            if grid < 1.0 {
                format!("{v:.1}")
            } else {
                format!("{v:.0}")
            },
            yy = y(v),
        );
        v += grid;
    }
    // Day ticks.
    let days = steps as f64 * step_s / 86400.0;
    let every = if days > 20.0 { 7.0 } else { 1.0 };
    let mut d = 0.0;
    while d <= days + 1e-9 {
        let xx = x(d * 86400.0 / step_s);
        let _ = writeln!(
            out,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{TOP}" y2="{}" stroke="#eee"/><text x="{xx:.1}" y="{}" text-anchor="middle">{d:.0}</text>"##,
            HEIGHT - BOTTOM,
            HEIGHT - BOTTOM + 16.0
        );
        d += every;
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">days</text><text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        HEIGHT - 6.0,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        escape(y_label)
    );
    let bucket = steps.div_ceil(MAX_POINTS).max(1);
    for (n, s) in series.iter().enumerate() {
        let mut points = String::new();
        for (k, chunk) in s.values.chunks(bucket).enumerate() {
            let v = chunk.iter().fold(0.0f64, |a, b| a.max(*b));
            let _ = write!(points, "{:.1},{:.1} ", x((k * bucket) as f64), y(v));
        }
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.2" points="{}"/>"#,
            s.colour,
            points.trim_end()
        );
        let lx = LEFT + 10.0 + 170.0 * n as f64;
        let _ = writeln!(
            out,
            r#"<rect x="{lx}" y="{}" width="14" height="3" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            TOP + 6.0,
            s.colour,
            lx + 18.0,
            TOP + 11.0,
            escape(s.label)
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_holds_every_series_and_keeps_peaks_when_bucketing() {
        let mut long = vec![1.0; 10_000];
        long[5_001] = 50.0;
        let svg = line_chart(
            "demand <vs> capacity",
            "req/s",
            60.0,
            &[
                Series {
                    label: "demand",
                    colour: "black",
                    values: &long,
                },
                Series {
                    label: "capacity",
                    colour: "red",
                    values: &[2.0; 100],
                },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("demand &lt;vs&gt; capacity"));
        // The peak at 50 is the chart's top: some point sits on the top edge.
        assert!(svg.contains(&format!(",{TOP:.1}")), "peak drawn");
        let first = svg.split("points=\"").nth(1).unwrap_or("");
        let n = first.split('"').next().unwrap_or("").split(' ').count();
        assert!(n <= MAX_POINTS, "{n} points");
    }
}
