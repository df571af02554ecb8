//! The demo's demand: the shipped FINANCE weekday profile and one World Cup 98 match day
//! (1998-06-15, the SPORTS trace's day 45: matches in the afternoon and evening), from 07:00,
//! compressed, as requests/s per real second. Both traces are embedded, so the demo runs from
//! the release binary anywhere (examples/traces/README.md gives their sources and terms; the
//! World Cup logs' notice, WorldCup98_COPYRIGHT.txt, goes with them).
//!
//! Each trace is smoothed by a centred one-hour mean: the profile's single-minute spikes (the
//! 16:00 close) would otherwise last a fraction of a real second at this compression, shorter
//! than a boot. Each is then scaled so its peak over the replayed span is the peak rate asked.

/// The replay starts at 07:00 of the trace day.
pub const DAY_START_MIN: usize = 7 * 60;
/// The match day in the SPORTS trace (days from 1998-05-01).
const SPORTS_DAY: usize = 45;
/// Minutes in the centred mean.
const SMOOTH_MIN: usize = 60;

const FINANCE: &str = include_str!("../../../examples/traces/finance_weekday_profile_per_min.csv");
const SPORTS: &str =
    include_str!("../../../examples/traces/sports_worldcup98_0501-0624_per_min.csv");

/// Requests/s per real second, per service.
#[derive(Debug, Clone)]
pub struct Demand {
    /// Trace seconds per real second.
    pub speed: f64,
    /// finance, one value per real second.
    pub finance: Vec<f64>,
    /// sports, one value per real second.
    pub sports: Vec<f64>,
}

fn values(csv: &str) -> Vec<f64> {
    csv.lines()
        .skip(1)
        .filter_map(|l| l.split(',').nth(1)?.trim().parse().ok())
        .collect()
}

/// The centred mean of `SMOOTH_MIN` minutes around each minute of `v`.
fn smooth(v: &[f64]) -> Vec<f64> {
    let half = SMOOTH_MIN / 2;
    (0..v.len())
        .map(|i| {
            let lo = i.saturating_sub(half);
            let hi = (i + half).min(v.len());
            v[lo..hi].iter().sum::<f64>() / (hi - lo).max(1) as f64
        })
        .collect()
}

impl Demand {
    /// `seconds` real seconds at `speed`, each trace scaled to `peak_rps` at its peak.
    pub fn new(speed: f64, seconds: usize, peak_rps: f64) -> Self {
        // Finance repeats its weekday; sports runs on into the days after its match day.
        let day = values(FINANCE);
        let minutes = DAY_START_MIN + (seconds as f64 * speed / 60.0).ceil() as usize + 1;
        let finance: Vec<f64> = (0..minutes + SMOOTH_MIN)
            .map(|m| day.get(m % day.len().max(1)).copied().unwrap_or(0.0))
            .collect();
        let all = values(SPORTS);
        let from = (SPORTS_DAY * 1440).min(all.len());
        let sports: Vec<f64> = (0..minutes + SMOOTH_MIN)
            .map(|m| all.get(from + m).copied().unwrap_or(0.0))
            .collect();
        let per_second = |per_min: &[f64]| -> Vec<f64> {
            let smooth = smooth(per_min);
            let raw: Vec<f64> = (0..seconds)
                .map(|k| {
                    let m = DAY_START_MIN as f64 + k as f64 * speed / 60.0;
                    smooth.get(m as usize).copied().unwrap_or(0.0)
                })
                .collect();
            let peak = raw.iter().cloned().fold(0.0, f64::max);
            let scale = if peak > 0.0 { peak_rps / peak } else { 0.0 };
            raw.iter().map(|v| v * scale).collect()
        };
        Self {
            speed,
            finance: per_second(&finance),
            sports: per_second(&sports),
        }
    }

    /// The trace time (seconds from midnight of the first day) at real second `k`.
    pub fn trace_s(&self, k: f64) -> f64 {
        DAY_START_MIN as f64 * 60.0 + k * self.speed
    }

    /// The load generator's schedule for one service: `(real seconds, rate)` steps.
    pub fn schedule(v: &[f64]) -> Vec<(f64, f64)> {
        v.iter().enumerate().map(|(k, r)| (k as f64, *r)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_peak_in_the_afternoon_and_are_scaled_to_the_peak_asked() {
        let d = Demand::new(168.0, 300, 30.0);
        assert_eq!(d.finance.len(), 300);
        let peak_at = |v: &[f64]| {
            let (k, p) = v
                .iter()
                .enumerate()
                .fold((0, 0.0), |a, (k, x)| if *x > a.1 { (k, *x) } else { a });
            assert!((p - 30.0).abs() < 1e-9, "{p}");
            d.trace_s(k as f64) / 3600.0
        };
        // The close (16:00) and the afternoon matches: both between 14:00 and 18:00.
        let (f, s) = (peak_at(&d.finance), peak_at(&d.sports));
        assert!((14.0..18.0).contains(&f), "finance peaks at {f} h");
        assert!((14.0..18.0).contains(&s), "sports peaks at {s} h");
        // Before the open, finance asks for next to nothing.
        assert!(d.finance[10] < 1.0, "{}", d.finance[10]);
        assert!(d.sports[10] > 1.0, "{}", d.sports[10]);
    }
}
