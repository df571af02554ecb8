//! Service specs: what `vmatrix apply -f services.toml` declares, validated with errors that
//! name the line.

use serde::{Deserialize, Serialize};

use crate::{ImageRef, ServiceName};

/// One service: a named workload with an image, a priority and bounds on its instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// `[a-z0-9-]`, unique.
    pub name: ServiceName,
    /// `NAME:TAG` in the repository.
    pub image: ImageRef,
    /// Higher wins when the pool is short.
    #[serde(default)]
    pub priority: i32,
    /// Instances kept running whatever the load.
    #[serde(default = "one")]
    pub min: u32,
    /// Most instances ever run.
    #[serde(default = "one")]
    pub max: u32,
    /// Requests per second one instance serves well.
    #[serde(default = "default_capacity")]
    pub capacity_rps: f64,
    /// vCPUs per instance.
    #[serde(default = "one")]
    pub vcpus: u32,
    /// Memory per instance, MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// The guest's service port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// The guest's health path.
    #[serde(default = "default_health")]
    pub health: String,
}

fn one() -> u32 {
    1
}
fn default_capacity() -> f64 {
    50.0
}
fn default_memory() -> u32 {
    256
}
fn default_port() -> u16 {
    80
}
fn default_health() -> String {
    "/health".into()
}

/// A services file: `[[service]]` tables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServicesFile {
    #[serde(default)]
    service: Vec<toml::Spanned<ServiceSpec>>,
}

/// What is wrong with a services file, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct SpecError {
    /// The file name, for the message.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Parses and validates a services file.
pub fn parse_services(file: &str, text: &str) -> Result<Vec<ServiceSpec>, SpecError> {
    let err = |line, message: String| SpecError {
        file: file.to_owned(),
        line,
        message,
    };
    let parsed: ServicesFile = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |s| line_of(text, s.start));
        err(line, e.message().trim().to_owned())
    })?;
    if parsed.service.is_empty() {
        return Err(err(
            1,
            "no [[service]] tables: declare at least one service".into(),
        ));
    }
    let mut seen = std::collections::BTreeMap::new();
    let mut out = Vec::new();
    for spanned in parsed.service {
        let line = line_of(text, spanned.span().start);
        let s = spanned.into_inner();
        if let Some(first) = seen.insert(s.name.clone(), line) {
            return Err(err(
                line,
                format!(
                    "service {} is declared twice (first on line {first})",
                    s.name
                ),
            ));
        }
        let checks: [(bool, String); 6] = [
            (
                s.min > s.max,
                format!(
                    "service {}: min ({}) is above max ({})",
                    s.name, s.min, s.max
                ),
            ),
            (
                s.max == 0,
                format!("service {}: max must be at least 1", s.name),
            ),
            (
                s.vcpus == 0 || s.vcpus > 64,
                format!("service {}: vcpus must be 1-64", s.name),
            ),
            (
                s.memory_mib < 64,
                format!("service {}: memory_mib must be at least 64", s.name),
            ),
            (
                !(s.capacity_rps > 0.0 && s.capacity_rps.is_finite()),
                format!("service {}: capacity_rps must be a positive number", s.name),
            ),
            (
                !s.health.starts_with('/') || s.health.contains(char::is_whitespace),
                format!(
                    "service {}: health must be a path such as \"/health\"",
                    s.name
                ),
            ),
        ];
        if let Some((_, message)) = checks.into_iter().find(|(bad, _)| *bad) {
            return Err(err(line, message));
        }
        if s.port == 0 {
            return Err(err(
                line,
                format!("service {}: port must be 1-65535", s.name),
            ));
        }
        out.push(s);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[service]]
name = "finance"
image = "guest:v1"
priority = 10
min = 1
max = 4
capacity_rps = 50
vcpus = 1
memory_mib = 256
port = 80
health = "/health"

[[service]]
name = "sports"
image = "guest:v1"
"#;

    #[test]
    fn parses_the_example_with_defaults() {
        let s = parse_services("services.toml", GOOD).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].priority, 10);
        assert_eq!(s[1].min, 1);
        assert_eq!(s[1].memory_mib, 256);
    }

    #[test]
    fn errors_name_the_line() {
        let unknown = GOOD.replace("vcpus = 1", "vcpu = 1");
        let e = parse_services("s.toml", &unknown).unwrap_err();
        assert_eq!(e.line, 9, "{e}");
        assert!(e.message.contains("vcpu"), "{e}");

        let bad_name = GOOD.replace("name = \"sports\"", "name = \"Sports\"");
        let e = parse_services("s.toml", &bad_name).unwrap_err();
        assert_eq!(e.line, 15, "{e}");

        let inverted = GOOD.replace("min = 1\nmax = 4", "min = 5\nmax = 4");
        let e = parse_services("s.toml", &inverted).unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e
            .to_string()
            .starts_with("s.toml:2: service finance: min (5) is above max (4)"));

        let twice = format!("{GOOD}\n[[service]]\nname = \"finance\"\nimage = \"guest:v1\"\n");
        let e = parse_services("s.toml", &twice).unwrap_err();
        assert!(e.message.contains("declared twice"), "{e}");

        let syntax = "[[service]\nname = 1";
        assert_eq!(parse_services("s.toml", syntax).unwrap_err().line, 1);
    }
}
