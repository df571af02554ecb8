//! Health checks: how an agent tells that an instance serves.
//!
//! In a services file, either a path (`health = "/health"`, an HTTP check with the defaults) or
//! a table: `health = { http = "/health", grace = "120s", interval = "2s", failures = 5 }` or
//! `health = { tcp = 22 }`. The same shape travels in plans and API replies.

use std::fmt;
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest health path, bytes.
pub const MAX_HEALTH_LEN: usize = 256;
/// Defaults: a first success within 180 s of activation (a Debian guest boots in ~40 s under
/// TCG), a probe every 2 s while running, failed after 5 misses in a row.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(180);
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_FAILURES: u32 = 5;

/// What is probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `GET PATH` on the service's HTTP port answers 200.
    Http(String),
    /// A TCP connection to this guest port is accepted.
    Tcp(u16),
}

/// An instance's health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: Probe,
    /// Time allowed for the first success after activation.
    pub grace: Duration,
    /// Time between probes of a running instance.
    pub interval: Duration,
    /// Failed probes in a row after which a running instance is failed (and replaced).
    pub failures: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self::http("/health")
    }
}

impl HealthCheck {
    /// An HTTP check of `path` with the default timings.
    pub fn http(path: impl Into<String>) -> Self {
        Self {
            probe: Probe::Http(path.into()),
            grace: DEFAULT_GRACE,
            interval: DEFAULT_INTERVAL,
            failures: DEFAULT_FAILURES,
        }
    }

    /// What is wrong with it, if anything: a message naming the bad part and what to write.
    pub fn problem(&self) -> Option<String> {
        match &self.probe {
            Probe::Http(h) => {
                if !h.starts_with('/')
                    || h.len() > MAX_HEALTH_LEN
                    || !h.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Some(format!(
                        "health must be a path such as \"/health\": a '/' then printable ASCII without spaces or control characters, at most {MAX_HEALTH_LEN} bytes (got {})",
                        crate::spec::quoted(h)
                    ));
                }
            }
            Probe::Tcp(0) => return Some("health tcp port must be 1 to 65535 (got 0)".into()),
            Probe::Tcp(_) => {}
        }
        if self.grace < Duration::from_secs(1) || self.grace > Duration::from_secs(3600) {
            return Some(format!(
                "health grace must be 1s to 1h (got {})",
                show(self.grace)
            ));
        }
        if self.interval < Duration::from_millis(500) || self.interval > Duration::from_secs(300) {
            return Some(format!(
                "health interval must be 500ms to 5m (got {})",
                show(self.interval)
            ));
        }
        if !(1..=100).contains(&self.failures) {
            return Some(format!(
                "health failures must be 1 to 100 (got {})",
                self.failures
            ));
        }
        None
    }
}

fn show(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.probe {
            Probe::Http(p) => write!(f, "http {p}")?,
            Probe::Tcp(port) => write!(f, "tcp {port}")?,
        }
        write!(
            f,
            " (grace {}, every {}, {} failures)",
            show(self.grace),
            show(self.interval),
            self.failures
        )
    }
}

impl Serialize for HealthCheck {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(4))?;
        match &self.probe {
            Probe::Http(p) => m.serialize_entry("http", p)?,
            Probe::Tcp(port) => m.serialize_entry("tcp", port)?,
        }
        m.serialize_entry("grace", &show(self.grace))?;
        m.serialize_entry("interval", &show(self.interval))?;
        m.serialize_entry("failures", &self.failures)?;
        m.end()
    }
}

/// The table form, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    http: Option<String>,
    tcp: Option<u16>,
    grace: Option<String>,
    interval: Option<String>,
    failures: Option<u32>,
}

fn duration<E: de::Error>(
    field: &str,
    v: Option<String>,
    default: Duration,
) -> Result<Duration, E> {
    match v {
        None => Ok(default),
        Some(s) => humantime::parse_duration(s.trim()).map_err(|e| {
            E::custom(format!(
                "health {field} {s:?}: {e}; write a duration such as \"30s\", \"2m\" or \"500ms\""
            ))
        }),
    }
}

impl<'de> Deserialize<'de> for HealthCheck {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = HealthCheck;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a health path such as \"/health\", or a table such as { http = \"/health\", grace = \"120s\" } or { tcp = 22 }",
                )
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<HealthCheck, E> {
                Ok(HealthCheck::http(v))
            }

            fn visit_map<M: MapAccess<'de>>(self, m: M) -> Result<HealthCheck, M::Error> {
                let t = Table::deserialize(de::value::MapAccessDeserializer::new(m))?;
                let probe = match (t.http, t.tcp) {
                    (Some(p), None) => Probe::Http(p),
                    (None, Some(port)) => Probe::Tcp(port),
                    _ => {
                        return Err(de::Error::custom(
                            "health needs exactly one of http = \"/path\" or tcp = PORT",
                        ))
                    }
                };
                Ok(HealthCheck {
                    probe,
                    grace: duration("grace", t.grace, DEFAULT_GRACE)?,
                    interval: duration("interval", t.interval, DEFAULT_INTERVAL)?,
                    failures: t.failures.unwrap_or(DEFAULT_FAILURES),
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct S {
        health: HealthCheck,
    }

    fn parse(s: &str) -> Result<HealthCheck, String> {
        toml::from_str::<S>(s)
            .map(|s| s.health)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_path_or_a_table_with_defaults() {
        assert_eq!(parse("health = \"/up\"").unwrap(), HealthCheck::http("/up"));
        let h = parse("health = { tcp = 22, grace = \"2m\", interval = \"500ms\", failures = 3 }")
            .unwrap();
        assert_eq!(h.probe, Probe::Tcp(22));
        assert_eq!(h.grace, Duration::from_secs(120));
        assert_eq!(h.interval, Duration::from_millis(500));
        assert_eq!(h.failures, 3);
        let h = parse("health = { http = \"/h\" }").unwrap();
        assert_eq!(h, HealthCheck::http("/h"));
        // JSON round trip, as in plans.
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<HealthCheck>(&json).unwrap(), h);
        assert_eq!(
            serde_json::from_str::<HealthCheck>("\"/health\"").unwrap(),
            HealthCheck::default()
        );
    }

    #[test]
    fn mistakes_say_what_to_write() {
        let e = parse("health = { http = \"/h\", tcp = 22 }").unwrap_err();
        assert!(e.contains("exactly one of"), "{e}");
        let e = parse("health = { grace = \"1m\" }").unwrap_err();
        assert!(e.contains("exactly one of"), "{e}");
        let e = parse("health = { http = \"/h\", grace = \"soon\" }").unwrap_err();
        assert!(e.contains("grace") && e.contains("\"30s\""), "{e}");
        let e = parse("health = { http = \"/h\", timeout = \"1s\" }").unwrap_err();
        assert!(e.contains("timeout"), "{e}");
        let mut h = HealthCheck::http("/h");
        h.interval = Duration::from_millis(10);
        assert!(h.problem().unwrap().contains("interval"));
        h.interval = DEFAULT_INTERVAL;
        h.failures = 0;
        assert!(h.problem().unwrap().contains("failures"));
        h.failures = 1;
        h.grace = Duration::ZERO;
        assert!(h.problem().unwrap().contains("grace"));
        assert!(HealthCheck::http("health")
            .problem()
            .unwrap()
            .contains("path"));
        let mut t = HealthCheck::http("/h");
        t.probe = Probe::Tcp(0);
        assert!(t.problem().unwrap().contains("tcp port"));
    }
}
