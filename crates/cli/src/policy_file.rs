//! The policy's settings as an operator gives them: a TOML file with a `[policy]` table (every
//! field optional, the built-in default for the rest) and a few flags that override single
//! settings. `vmatrix up`, `vmatrix controller` and `vmatrix sim` read them the same way, so
//! the simulator runs exactly what the controller runs.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use vmatrix_policy::Settings;

/// Flags that override single settings.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PolicyFlags {
    /// Policy: capacity kept above the recent demand (e.g. 1.2 for 20%).
    #[arg(long)]
    pub headroom: Option<f64>,
    /// Policy: the recent demand a scale-out looks at (e.g. 2m).
    #[arg(long)]
    pub scale_out: Option<String>,
    /// Policy: how long demand must stay low before a scale-in (e.g. 7m).
    #[arg(long)]
    pub scale_in: Option<String>,
    /// Policy: how far past "one season ago" the forecast looks (e.g. 5m); "off": no forecast.
    #[arg(long)]
    pub forecast: Option<String>,
}

impl PolicyFlags {
    /// The same flags as arguments (to pass them on to a child process).
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(h) = self.headroom {
            out.extend(["--headroom".into(), h.to_string()]);
        }
        for (flag, v) in [
            ("--scale-out", &self.scale_out),
            ("--scale-in", &self.scale_in),
            ("--forecast", &self.forecast),
        ] {
            if let Some(v) = v {
                out.extend([flag.to_string(), v.clone()]);
            }
        }
        out
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    policy: Settings,
}

/// The settings: `file`'s `[policy]` table over the defaults, then `flags`; validated.
pub fn load(file: Option<&Path>, flags: &PolicyFlags) -> Result<Settings> {
    let mut s = match file {
        None => Settings::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the policy file {}", path.display()))?;
            toml::from_str::<File>(&text)
                .map_err(|e| anyhow!("{}: {}", path.display(), e.message().trim()))?
                .policy
        }
    };
    let secs = |flag: &str, v: &str| -> Result<f64> {
        let x = crate::sim::seconds(v).with_context(|| format!("{flag} {v}"))?;
        if !(x >= 0.0 && x.is_finite()) {
            bail!("{flag} {v}: use a duration ≥ 0, e.g. 10m");
        }
        Ok(x)
    };
    if let Some(h) = flags.headroom {
        s.headroom = h;
    }
    if let Some(v) = &flags.scale_out {
        s.scale_out_s = secs("--scale-out", v)?;
    }
    if let Some(v) = &flags.scale_in {
        s.scale_in_s = secs("--scale-in", v)?;
    }
    match flags.forecast.as_deref() {
        None => {}
        Some("off") => s.seasons_s.clear(),
        Some(v) => s.forecast_ahead_s = secs("--forecast", v)?,
    }
    s.validate().map_err(|e| {
        anyhow!(
            "policy settings{}: {e}",
            file.map(|p| format!(" ({})", p.display()))
                .unwrap_or_default()
        )
    })?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_overrides_the_defaults_and_flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, "[policy]\nheadroom = 1.3\nscale_in_s = 600\n").unwrap();
        let s = load(Some(&path), &PolicyFlags::default()).unwrap();
        assert_eq!(s.headroom, 1.3);
        assert_eq!(s.scale_in_s, 600.0);
        assert_eq!(s.scale_out_s, Settings::default().scale_out_s);
        let flags = PolicyFlags {
            headroom: Some(1.5),
            forecast: Some("off".into()),
            ..PolicyFlags::default()
        };
        let s = load(Some(&path), &flags).unwrap();
        assert_eq!(s.headroom, 1.5);
        assert!(s.seasons_s.is_empty());
        std::fs::write(&path, "[policy]\nheadrom = 1.3\n").unwrap();
        let e = load(Some(&path), &PolicyFlags::default()).unwrap_err();
        assert!(e.to_string().contains("headrom"), "{e}");
        std::fs::write(&path, "[policy]\nheadroom = 0.5\n").unwrap();
        let e = load(Some(&path), &PolicyFlags::default()).unwrap_err();
        assert!(e.to_string().contains("headroom 0.5"), "{e}");
        assert_eq!(
            load(None, &PolicyFlags::default()).unwrap(),
            Settings::default()
        );
    }
}
