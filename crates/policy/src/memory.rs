//! What a service's demand did, remembered between ticks: the one forecast (the demand of one
//! season ago, a little ahead of now) and the spike history that sizes warm standbys. Pure
//! data: the caller records samples with their time and reads the figures it puts into the
//! snapshot; the controller and the simulator keep one [`Memory`] per service alike.

use crate::settings::Settings;

/// Slots the spike window is kept in (the largest rise of each).
const SPIKE_SLOTS: usize = 24;

/// One service's demand memory, in buckets of [`Settings::bucket_s`] holding the maximum of
/// each (`NaN`: unknown). A week at one-minute buckets is 40 KiB.
#[derive(Debug, Clone)]
pub struct Memory {
    bucket_s: f64,
    /// Seasons in buckets, longest last.
    seasons: Vec<i64>,
    ahead: i64,
    headroom: f64,
    ring: Vec<f32>,
    first: Option<i64>,
    current: i64,
    slot_buckets: i64,
    /// (slot index, largest rise in it), a ring of [`SPIKE_SLOTS`].
    slots: Vec<(i64, f32)>,
}

impl Memory {
    /// An empty memory for `settings`.
    pub fn new(settings: &Settings) -> Self {
        let bucket_s = settings.bucket_s.max(1e-3);
        let buckets = |s: f64| (s / bucket_s).round().max(1.0) as i64;
        let mut seasons: Vec<i64> = settings.seasons_s.iter().map(|s| buckets(*s)).collect();
        seasons.sort_unstable();
        seasons.dedup();
        let longest = seasons.last().copied().unwrap_or(0);
        let ahead = (settings.forecast_ahead_s / bucket_s).ceil().max(0.0) as i64;
        Self {
            bucket_s,
            seasons,
            ahead,
            headroom: settings.headroom,
            ring: vec![f32::NAN; (longest + 2).max(2) as usize],
            first: None,
            current: 0,
            slot_buckets: (buckets(settings.spike_window_s) / SPIKE_SLOTS as i64).max(1),
            slots: vec![(i64::MIN, 0.0); SPIKE_SLOTS],
        }
    }

    fn bucket(&self, t_s: f64) -> i64 {
        (t_s / self.bucket_s).floor() as i64
    }

    fn at(&self, b: i64) -> f32 {
        let n = self.ring.len() as i64;
        match self.first {
            Some(f) if b >= f && b <= self.current && self.current - b < n => {
                self.ring[b.rem_euclid(n) as usize]
            }
            _ => f32::NAN,
        }
    }

    /// Records the demand measured at `t_s` seconds (`None`: unknown, the report was missing).
    /// Samples must come in time order; an older one counts as now.
    pub fn record(&mut self, t_s: f64, rps: Option<f64>) {
        let b = self.bucket(t_s);
        let n = self.ring.len() as i64;
        match self.first {
            None => {
                self.first = Some(b);
                self.current = b;
                self.ring[b.rem_euclid(n) as usize] = f32::NAN;
            }
            Some(_) if b > self.current => {
                let from = (self.current + 1).max(b - n + 1);
                for k in from..=b {
                    self.ring[k.rem_euclid(n) as usize] = f32::NAN;
                }
                self.current = b;
            }
            Some(_) => {}
        }
        let Some(rps) = rps.filter(|r| r.is_finite()) else {
            return;
        };
        let b = self.current;
        let cell = &mut self.ring[b.rem_euclid(n) as usize];
        *cell = if cell.is_nan() {
            rps as f32
        } else {
            cell.max(rps as f32)
        };
        // A rise above what the policy provisioned for this bucket: the previous bucket's
        // demand with headroom, or the forecast if that was more.
        let prev = self.at(b - 1);
        if !prev.is_nan() {
            let provisioned = (f64::from(prev) * self.headroom).max(self.forecast(t_s));
            let rise = (rps - provisioned).max(0.0) as f32;
            let slot = b.div_euclid(self.slot_buckets);
            let cell = &mut self.slots[slot.rem_euclid(SPIKE_SLOTS as i64) as usize];
            if cell.0 != slot {
                *cell = (slot, 0.0);
            }
            cell.1 = cell.1.max(rise);
        }
    }

    /// The demand one season before `t_s`, from then to the forecast's look-ahead (the most of
    /// it), for the longest season the memory covers; 0 while none is covered.
    pub fn forecast(&self, t_s: f64) -> f64 {
        let Some(first) = self.first else {
            return 0.0;
        };
        let b = self.bucket(t_s);
        let Some(&season) = self.seasons.iter().rev().find(|&&p| b - p >= first) else {
            return 0.0;
        };
        let from = b - season;
        (from..=from + self.ahead)
            .map(|k| self.at(k))
            .filter(|v| !v.is_nan())
            .fold(0.0f64, |a, v| a.max(f64::from(v)))
    }

    /// The largest rise of demand above what the policy provisioned (the previous bucket's
    /// demand with headroom, or the forecast), over the spike window, requests/s: what warm
    /// standbys must cover.
    pub fn spike(&self) -> f64 {
        let now = self.current.div_euclid(self.slot_buckets);
        self.slots
            .iter()
            .filter(|(slot, _)| *slot > now - SPIKE_SLOTS as i64)
            .fold(0.0f64, |a, (_, r)| a.max(f64::from(*r)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            seasons_s: vec![600.0],
            forecast_ahead_s: 120.0,
            bucket_s: 60.0,
            spike_window_s: 2400.0,
            headroom: 1.0,
            ..Settings::default()
        }
    }

    #[test]
    fn the_forecast_is_the_demand_one_season_ago_a_little_ahead() {
        let mut m = Memory::new(&settings());
        assert_eq!(m.forecast(0.0), 0.0);
        for minute in 0..15 {
            let rps = if minute == 6 { 90.0 } else { 10.0 };
            m.record(minute as f64 * 60.0 + 5.0, Some(rps));
        }
        // At minute 14: one season (10 min) ago is minute 4; minutes 4..=6 hold the 90.
        assert_eq!(m.forecast(14.0 * 60.0), 90.0);
        assert_eq!(m.forecast(17.0 * 60.0), 10.0, "minutes 7..=9");
        assert_eq!(Memory::new(&settings()).forecast(1e6), 0.0);
    }

    #[test]
    fn spikes_are_rises_above_the_previous_bucket_and_age_out() {
        let mut m = Memory::new(&settings());
        m.record(0.0, Some(10.0));
        m.record(60.0, Some(70.0));
        assert_eq!(m.spike(), 60.0);
        m.record(120.0, Some(75.0));
        assert_eq!(m.spike(), 60.0, "a small rise keeps the largest");
        // The window is 40 minutes in 24 slots (1 minute each, rounded down): an hour later
        // the spike has aged out.
        for minute in 3..70 {
            m.record(minute as f64 * 60.0, Some(75.0));
        }
        assert_eq!(m.spike(), 0.0);
    }

    #[test]
    fn unknown_samples_are_neither_demand_nor_rises() {
        let mut m = Memory::new(&settings());
        m.record(0.0, Some(10.0));
        m.record(60.0, None);
        m.record(120.0, Some(50.0));
        assert_eq!(m.spike(), 0.0, "no known previous bucket: no rise");
        m.record(180.0, Some(f64::NAN));
        assert!(m.at(3).is_nan(), "a NaN sample is unknown");
        assert_eq!(m.at(2), 50.0);
    }
}
