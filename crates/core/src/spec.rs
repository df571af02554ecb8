//! Service specs: what `vmatrix apply -f services.toml` declares. One set of rules
//! ([`ServiceSpec::validate`], [`validate_services`]) is checked by the CLI, whose errors name
//! the line, and by the controller's API, which refuses an invalid set with a 400.

use serde::{Deserialize, Serialize};

use crate::health::HealthCheck;
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
    /// How its instances' health is checked: a path (`"/health"`) or a table
    /// (`{ http = "/health", grace = "120s", interval = "2s", failures = 5 }`, `{ tcp = 22 }`).
    #[serde(default)]
    pub health: HealthCheck,
    /// Most warm standbys (instances kept paused in memory, serving again in milliseconds when
    /// demand rises); the policy sizes them from the service's spike history. 0: none.
    #[serde(default)]
    pub standby_max: u32,
    /// Instances on different machines where the pool allows, so that one machine failure
    /// never takes the service down (false: pack them).
    #[serde(default = "yes")]
    pub spread: bool,
    /// Services whose instances may open connections to this one's (bridged networking);
    /// instances of one service always reach each other, other services never unless listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_from: Vec<ServiceName>,
    /// Whether its instances may reach addresses outside the service network (NAT through
    /// their host). Off by default.
    #[serde(default)]
    pub egress: bool,
    /// The ports it serves besides HTTP on `port`: `tcp` ones are proxied by the switch on
    /// their own `listen` port (bridged networking). An `http` entry names the HTTP port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    /// The chipset: `pc` (default) or `q35`.
    #[serde(default)]
    pub machine: crate::hardware::Machine,
    /// The firmware: `bios` (default) or `uefi` (OVMF).
    #[serde(default)]
    pub firmware: crate::hardware::Firmware,
    /// The disk bus: `virtio` (default), `sata` or `ide`.
    #[serde(default)]
    pub disk_bus: crate::hardware::DiskBus,
    /// The network card: `virtio` (default) or `e1000`.
    #[serde(default)]
    pub nic: crate::hardware::Nic,
    /// The CPU model under KVM: `baseline` (default, migratable between CPU generations) or
    /// `host` (every host feature; moves only between like machines).
    #[serde(default)]
    pub cpu: crate::hardware::CpuModel,
    /// SSH public keys cloud-init installs for the image's default user, in each instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// cloud-init user-data for each instance. In a services file, the path of a file (relative
    /// to the services file) that `vmatrix apply` reads and sends as its content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// Persistent volumes of each instance slot (`[[service.volume]]`): data disks that
    /// survive discard, recovery, suspend and scale-in.
    #[serde(default, rename = "volume", skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::VolumeSpec>,
}

/// The largest user-data accepted (cloud-init's own seeds are small; 64 KiB is generous).
pub const MAX_USER_DATA: usize = 64 * 1024;
/// The most SSH keys per service.
const MAX_SSH_KEYS: usize = 64;

/// What user-data may start with: the formats cloud-init recognizes.
const USER_DATA_STARTS: &[&str] = &[
    "#cloud-config",
    "#!",
    "#include",
    "#cloud-boothook",
    "#part-handler",
    "Content-Type:",
    "MIME-Version:",
];

/// One port a service serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// `[a-z0-9-]`, unique within the service.
    pub name: String,
    /// The guest's port.
    pub port: u16,
    /// How the switch carries it.
    #[serde(default)]
    pub protocol: Protocol,
    /// For `tcp`: the switch's port for it (unique across services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<u16>,
}

/// How the switch carries a port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 and HTTP/2, routed by `Host` or `/s/NAME/`, with retries, holds and drops.
    #[default]
    Http,
    /// Bytes both ways on a port of its own, least connections.
    Tcp,
}

impl ServiceSpec {
    /// The guest's HTTP port: an `http` entry of `ports` if there is one, else `port`.
    pub fn http_port(&self) -> u16 {
        self.ports
            .iter()
            .find(|p| p.protocol == Protocol::Http)
            .map_or(self.port, |p| p.port)
    }

    /// The `tcp` ports: (name, guest port, switch port).
    pub fn tcp_ports(&self) -> impl Iterator<Item = (&str, u16, u16)> {
        self.ports
            .iter()
            .filter_map(|p| match (p.protocol, p.listen) {
                (Protocol::Tcp, Some(l)) => Some((p.name.as_str(), p.port, l)),
                _ => None,
            })
    }
}

fn yes() -> bool {
    true
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

/// The most instances one service may ask for.
const MAX_INSTANCES: u32 = 1000;
/// The most vCPUs one instance may have.
const MAX_VCPUS: u32 = 64;
/// The least memory one instance may have, MiB.
const MIN_MEMORY_MIB: u32 = 64;
/// The most memory one instance may have, MiB (1 TiB).
const MAX_MEMORY_MIB: u32 = 1_048_576;
/// The most requests per second one instance may claim to serve.
const MAX_CAPACITY_RPS: f64 = 1_000_000.0;
/// The lowest and highest priority.
const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -1000..=1000;

/// What is wrong with one field of one service spec. The CLI and the controller's API both
/// check specs with [`ServiceSpec::validate`] and [`validate_services`], so they agree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("service {service}: {message}")]
pub struct FieldError {
    /// The service whose spec is wrong.
    pub service: ServiceName,
    /// The field that is wrong, as spelled in the spec (`memory_mib`, `health`, …).
    pub field: &'static str,
    /// What is wrong and what is allowed; starts with the field's name.
    pub message: String,
}

/// A value quoted for an error message: escaped, and cut short when long.
pub(crate) fn quoted(value: &str) -> String {
    const SHOWN: usize = 64;
    let mut out: String = value.chars().take(SHOWN).collect();
    if out.len() < value.len() {
        out.push('…');
    }
    format!("\"{}\"", out.escape_debug())
}

impl ServiceSpec {
    /// Checks every field against the bounds the controller can honour: instances 1-1000 and
    /// `min <= max`, vCPUs 1-64, memory 64 MiB-1 TiB, a finite capacity above 0 and at most
    /// 1 000 000 req/s, port 1-65535, priority -1000..=1000, and a health path that starts with
    /// `/` and is at most 256 bytes of printable ASCII without spaces. The first wrong field is
    /// reported.
    pub fn validate(&self) -> Result<(), FieldError> {
        let s = self;
        let fail = |field: &'static str, message: String| {
            Err(FieldError {
                service: s.name.clone(),
                field,
                message,
            })
        };
        if !(1..=MAX_INSTANCES).contains(&s.max) {
            return fail(
                "max",
                format!("max must be 1-{MAX_INSTANCES} (got {})", s.max),
            );
        }
        if s.min > s.max {
            return fail("min", format!("min ({}) is above max ({})", s.min, s.max));
        }
        if s.standby_max > s.max {
            return fail(
                "standby_max",
                format!(
                    "standby_max ({}) is above max ({}): standbys are instances too",
                    s.standby_max, s.max
                ),
            );
        }
        if !(1..=MAX_VCPUS).contains(&s.vcpus) {
            return fail(
                "vcpus",
                format!("vcpus must be 1-{MAX_VCPUS} (got {})", s.vcpus),
            );
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&s.memory_mib) {
            return fail(
                "memory_mib",
                format!(
                    "memory_mib must be {MIN_MEMORY_MIB}-{MAX_MEMORY_MIB} (got {})",
                    s.memory_mib
                ),
            );
        }
        if !(s.capacity_rps.is_finite()
            && s.capacity_rps > 0.0
            && s.capacity_rps <= MAX_CAPACITY_RPS)
        {
            return fail(
                "capacity_rps",
                format!(
                    "capacity_rps must be a number above 0 and at most {MAX_CAPACITY_RPS} (got {})",
                    s.capacity_rps
                ),
            );
        }
        if s.port == 0 {
            return fail("port", format!("port must be 1-65535 (got {})", s.port));
        }
        let mut names = std::collections::HashSet::new();
        for p in &s.ports {
            if p.name.is_empty()
                || p.name.len() > 32
                || !p
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return fail(
                    "ports",
                    format!(
                        "port name {} must be 1-32 characters from a-z 0-9 -",
                        quoted(&p.name)
                    ),
                );
            }
            if !names.insert(p.name.as_str()) {
                return fail("ports", format!("port name {} is declared twice", p.name));
            }
            if p.port == 0 {
                return fail("ports", format!("port {}: port must be 1-65535", p.name));
            }
            match (p.protocol, p.listen) {
                (Protocol::Tcp, None) | (Protocol::Tcp, Some(0)) => {
                    return fail(
                        "ports",
                        format!(
                            "port {}: a tcp port needs `listen = PORT`, the switch's port for it (1-65535)",
                            p.name
                        ),
                    )
                }
                (Protocol::Http, Some(_)) => {
                    return fail(
                        "ports",
                        format!(
                            "port {}: an http port is reached through the switch's HTTP listener; remove `listen`",
                            p.name
                        ),
                    )
                }
                _ => {}
            }
        }
        if s.ports
            .iter()
            .filter(|p| p.protocol == Protocol::Http)
            .count()
            > 1
        {
            return fail("ports", "at most one http port per service".into());
        }
        if !PRIORITY_RANGE.contains(&s.priority) {
            return fail(
                "priority",
                format!(
                    "priority must be {} to {} (got {})",
                    PRIORITY_RANGE.start(),
                    PRIORITY_RANGE.end(),
                    s.priority
                ),
            );
        }
        if let Some(problem) = s.health.problem() {
            return fail("health", problem);
        }
        if let Some(problem) = s.hardware().problem() {
            return fail("disk_bus", problem);
        }
        if s.ssh_authorized_keys.len() > MAX_SSH_KEYS {
            return fail(
                "ssh_authorized_keys",
                format!(
                    "ssh_authorized_keys holds {} keys; at most {MAX_SSH_KEYS} are accepted",
                    s.ssh_authorized_keys.len()
                ),
            );
        }
        for key in &s.ssh_authorized_keys {
            let mut words = key.split_whitespace();
            let kind = words.next().unwrap_or_default();
            let body = words.next().unwrap_or_default();
            if !(kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-"))
                || body.len() < 16
                || key.len() > 16 * 1024
                || key.contains(['\n', '\r'])
            {
                return fail(
                    "ssh_authorized_keys",
                    format!(
                        "ssh_authorized_keys holds {}, which is not an SSH public key line (like \"ssh-ed25519 AAAA… user@host\", as in a .pub file)",
                        quoted(&key.chars().take(40).collect::<String>())
                    ),
                );
            }
        }
        if let Some(problem) = crate::volume::volumes_problem(s.name.as_str(), &s.volumes) {
            return fail("volume", problem);
        }
        if let Some(data) = &s.user_data {
            if data.len() > MAX_USER_DATA {
                return fail(
                    "user_data",
                    format!(
                        "user_data is {} bytes; at most {MAX_USER_DATA} are accepted",
                        data.len()
                    ),
                );
            }
            if !USER_DATA_STARTS.iter().any(|p| data.starts_with(p)) {
                return fail(
                    "user_data",
                    "user_data must be the content of a cloud-init user-data file, starting with \
                     #cloud-config or #! (a services file names the file: user_data = \"file.yaml\", \
                     which `vmatrix apply` reads)"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// The virtual hardware of its instances.
    pub fn hardware(&self) -> crate::Hardware {
        crate::Hardware {
            machine: self.machine,
            firmware: self.firmware,
            disk_bus: self.disk_bus,
            nic: self.nic,
            cpu: self.cpu,
        }
    }
}

/// Why a list of specs is invalid: which spec (by index) and, for a name declared twice, where
/// it was first declared.
struct Invalid {
    index: usize,
    first: Option<usize>,
    error: FieldError,
}

/// The one definition of a valid list, shared by [`validate_services`] and [`parse_services`].
fn check_services(specs: &[ServiceSpec]) -> Result<(), Invalid> {
    let mut seen = std::collections::HashMap::new();
    for (index, s) in specs.iter().enumerate() {
        if let Some(&first) = seen.get(&s.name) {
            return Err(Invalid {
                index,
                first: Some(first),
                error: FieldError {
                    service: s.name.clone(),
                    field: "name",
                    message: format!(
                        "name must be unique: {} is declared twice (services #{} and #{})",
                        s.name,
                        first + 1,
                        index + 1
                    ),
                },
            });
        }
        seen.insert(&s.name, index);
        s.validate().map_err(|error| Invalid {
            index,
            first: None,
            error,
        })?;
    }
    let mut listens: std::collections::HashMap<u16, &ServiceName> =
        std::collections::HashMap::new();
    for (index, s) in specs.iter().enumerate() {
        for (name, _, listen) in s.tcp_ports() {
            if let Some(other) = listens.insert(listen, &s.name) {
                return Err(Invalid {
                    index,
                    first: None,
                    error: FieldError {
                        service: s.name.clone(),
                        field: "ports",
                        message: format!(
                            "port {name}: the switch's port {listen} is taken by service {other}; \
                             each tcp port needs a listen port of its own"
                        ),
                    },
                });
            }
        }
        if let Some(unknown) = s.allow_from.iter().find(|a| !seen.contains_key(a)) {
            return Err(Invalid {
                index,
                first: None,
                error: FieldError {
                    service: s.name.clone(),
                    field: "allow_from",
                    message: format!(
                        "allow_from names {unknown}, which is not a service in this file; \
                         declare it or remove it from the list"
                    ),
                },
            });
        }
    }
    Ok(())
}

/// Checks a whole desired set: every spec with [`ServiceSpec::validate`], and that no name is
/// declared twice. An empty set is valid (it removes every service).
pub fn validate_services(specs: &[ServiceSpec]) -> Result<(), FieldError> {
    check_services(specs).map_err(|i| i.error)
}

/// Parses and validates a services file. `read` gives the content of a file the services file
/// names (`user_data = "file.yaml"`), relative to it; its error is shown with the line.
pub fn parse_services(
    file: &str,
    text: &str,
    read: &dyn Fn(&str) -> Result<String, String>,
) -> Result<Vec<ServiceSpec>, SpecError> {
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
    let lines: Vec<usize> = parsed
        .service
        .iter()
        .map(|s| line_of(text, s.span().start))
        .collect();
    let mut specs: Vec<ServiceSpec> = parsed
        .service
        .into_iter()
        .map(toml::Spanned::into_inner)
        .collect();
    for (spec, line) in specs.iter_mut().zip(&lines) {
        if let Some(name) = spec.user_data.take() {
            let content = read(&name).map_err(|e| {
                err(
                    *line,
                    format!("service {}: user_data = {name:?}: {e}", spec.name),
                )
            })?;
            spec.user_data = Some(content);
        }
    }
    check_services(&specs).map_err(|i| {
        let line = lines[i.index];
        match i.first {
            Some(first) => err(
                line,
                format!(
                    "service {} is declared twice (first on line {})",
                    i.error.service, lines[first]
                ),
            ),
            None => err(line, i.error.to_string()),
        }
    })?;
    Ok(specs)
}

#[cfg(test)]
mod tests;
