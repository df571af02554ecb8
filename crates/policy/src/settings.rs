//! The one policy configuration: what an operator writes (`policy.toml`, durations in seconds),
//! read alike by the controller (`vmatrix up`, `vmatrix controller`) and the simulator
//! (`vmatrix sim`), and turned into ticks for the caller's tick length.

use serde::{Deserialize, Serialize};

use crate::model::{Config, Sharing};

/// The policy's settings. `Settings::default()` is the configuration chosen on the tuning part
/// of the traces (docs/benchmarks.md; how they were chosen: docs/measurements.md): the default of `vmatrix up` and of `vmatrix sim` alike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Capacity kept above the recent demand (1.1 = 10% headroom).
    pub headroom: f64,
    /// Seconds of recent demand whose maximum sizes a scale-out.
    pub scale_out_s: f64,
    /// Seconds the demand must have stayed low before a scale-in.
    pub scale_in_s: f64,
    /// A scale-in must shed more than this fraction of the instances (0: exactly).
    pub scale_in_tolerance: f64,
    /// Suspended instances a service keeps in the repository, per instance it runs.
    pub dormant_ratio: f64,
    /// Most live migrations per tick (consolidation and relief).
    pub max_moves: usize,
    /// Consolidate only while the pool's memory use is below this fraction.
    pub consolidate_below: f64,
    /// Seasons, seconds (e.g. a day and a week): the demand of one season ago, a little ahead of
    /// now, is provisioned before it comes back. The longest season the history covers is used.
    /// Empty: react only.
    pub seasons_s: Vec<f64>,
    /// How far past "one season ago" the forecast looks, seconds.
    pub forecast_ahead_s: f64,
    /// The forecast's and the spike history's resolution, seconds (the maximum of each bucket).
    pub bucket_s: f64,
    /// Standbys are sized from the largest rise of demand over this many seconds.
    pub spike_window_s: f64,
    /// How a pool too small for every wish is shared.
    pub sharing: Sharing,
    /// A machine whose measured CPU load is above this fraction is relieved by a migration.
    pub hot_above: f64,
    /// How long an operator's explicit placement holds, seconds, unless unpinned.
    pub pin_s: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            headroom: 1.1,
            scale_out_s: 120.0,
            scale_in_s: 420.0,
            scale_in_tolerance: 0.1,
            dormant_ratio: 1.0,
            max_moves: 8,
            consolidate_below: 0.95,
            seasons_s: Vec::new(),
            forecast_ahead_s: 300.0,
            bucket_s: 60.0,
            spike_window_s: 86_400.0,
            sharing: Sharing::StrictPriority,
            hot_above: 0.9,
            pin_s: 1800.0,
        }
    }
}

impl Settings {
    /// What is wrong with these settings, if anything: one message per bad field.
    pub fn validate(&self) -> Result<(), String> {
        let mut bad = Vec::new();
        let finite = |v: f64| v.is_finite();
        if !(finite(self.headroom) && (1.0..=10.0).contains(&self.headroom)) {
            bad.push(format!(
                "headroom {}: use 1 (none) to 10, e.g. 1.2 for 20%",
                self.headroom
            ));
        }
        for (name, v) in [
            ("scale_out_s", self.scale_out_s),
            ("scale_in_s", self.scale_in_s),
            ("forecast_ahead_s", self.forecast_ahead_s),
            ("spike_window_s", self.spike_window_s),
            ("pin_s", self.pin_s),
        ] {
            if !(finite(v) && v >= 0.0) {
                bad.push(format!("{name} {v}: use seconds ≥ 0"));
            }
        }
        if !(finite(self.bucket_s) && self.bucket_s > 0.0) {
            bad.push(format!("bucket_s {}: use seconds > 0", self.bucket_s));
        }
        for (name, v) in [
            ("scale_in_tolerance", self.scale_in_tolerance),
            ("consolidate_below", self.consolidate_below),
            ("hot_above", self.hot_above),
        ] {
            if !(finite(v) && (0.0..=1.0).contains(&v)) {
                bad.push(format!("{name} {v}: use a fraction from 0 to 1"));
            }
        }
        if !(finite(self.dormant_ratio) && self.dormant_ratio >= 0.0) {
            bad.push(format!("dormant_ratio {}: use ≥ 0", self.dormant_ratio));
        }
        for s in &self.seasons_s {
            if !(finite(*s) && *s >= self.bucket_s && *s <= 366.0 * 86_400.0) {
                bad.push(format!(
                    "seasons_s {s}: use seconds from bucket_s ({}) to a year",
                    self.bucket_s
                ));
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join("; "))
        }
    }

    /// The tick-based configuration `decide` runs, for ticks of `step_s` seconds.
    pub fn config(&self, step_s: f64) -> Config {
        let ticks = |s: f64| (s / step_s.max(1e-9)).ceil().max(1.0) as usize;
        Config {
            headroom: self.headroom,
            scale_out_window: ticks(self.scale_out_s),
            scale_in_window: ticks(self.scale_in_s),
            scale_in_tolerance: self.scale_in_tolerance,
            dormant_ratio: self.dormant_ratio,
            max_moves: self.max_moves,
            consolidate_below: self.consolidate_below,
            sharing: self.sharing,
            hot_above: self.hot_above,
        }
    }

    /// Samples of demand history `decide` needs, for ticks of `step_s` seconds.
    pub fn history_ticks(&self, step_s: f64) -> usize {
        let c = self.config(step_s);
        c.scale_in_window.max(c.scale_out_window) + 1
    }
}
