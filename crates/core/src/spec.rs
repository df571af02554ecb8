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
mod tests {
    use super::*;

    fn no_files(name: &str) -> Result<String, String> {
        Err(format!("no file {name} in tests"))
    }

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
        let s = parse_services("services.toml", GOOD, &no_files).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].priority, 10);
        assert_eq!(s[1].min, 1);
        assert_eq!(s[1].memory_mib, 256);
    }

    #[test]
    fn errors_name_the_line() {
        let unknown = GOOD.replace("vcpus = 1", "vcpu = 1");
        let e = parse_services("s.toml", &unknown, &no_files).unwrap_err();
        assert_eq!(e.line, 9, "{e}");
        assert!(e.message.contains("vcpu"), "{e}");

        let bad_name = GOOD.replace("name = \"sports\"", "name = \"Sports\"");
        let e = parse_services("s.toml", &bad_name, &no_files).unwrap_err();
        assert_eq!(e.line, 15, "{e}");

        let inverted = GOOD.replace("min = 1\nmax = 4", "min = 5\nmax = 4");
        let e = parse_services("s.toml", &inverted, &no_files).unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e
            .to_string()
            .starts_with("s.toml:2: service finance: min (5) is above max (4)"));

        let twice = format!("{GOOD}\n[[service]]\nname = \"finance\"\nimage = \"guest:v1\"\n");
        let e = parse_services("s.toml", &twice, &no_files).unwrap_err();
        assert!(e.message.contains("declared twice"), "{e}");

        let syntax = "[[service]\nname = 1";
        assert_eq!(
            parse_services("s.toml", syntax, &no_files)
                .unwrap_err()
                .line,
            1
        );
    }

    #[test]
    fn ports_and_reach_are_checked_across_the_file() {
        let file = |a: &str, b: &str| {
            format!(
                "[[service]]\nname = \"web\"\nimage = \"guest:v1\"\n{a}\n\n\
                 [[service]]\nname = \"db\"\nimage = \"guest:v1\"\n{b}\n"
            )
        };
        let ok = parse_services(
            "s.toml",
            &file(
                "ports = [{ name = \"http\", port = 8080, protocol = \"http\" }]",
                "ports = [{ name = \"pg\", port = 5432, protocol = \"tcp\", listen = 15432 }]\nallow_from = [\"web\"]",
            ),
            &no_files,
        )
        .unwrap();
        assert_eq!(ok[0].http_port(), 8080);
        assert_eq!(ok[1].tcp_ports().collect::<Vec<_>>(), [("pg", 5432, 15432)]);
        let cases = [
            (
                file(
                    "",
                    "ports = [{ name = \"pg\", port = 5432, protocol = \"tcp\" }]",
                ),
                "needs `listen = PORT`",
            ),
            (
                file(
                    "ports = [{ name = \"a\", port = 7, protocol = \"tcp\", listen = 9000 }]",
                    "ports = [{ name = \"b\", port = 7, protocol = \"tcp\", listen = 9000 }]",
                ),
                "taken by service web",
            ),
            (file("", "allow_from = [\"shop\"]"), "allow_from names shop"),
            (
                file("ports = [{ name = \"Web\", port = 80 }]", ""),
                "must be 1-32 characters",
            ),
        ];
        for (text, want) in cases {
            let e = parse_services("s.toml", &text, &no_files).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
    }

    fn spec(name: &str) -> ServiceSpec {
        ServiceSpec {
            name: ServiceName::new(name).unwrap(),
            image: "guest:v1".parse().unwrap(),
            priority: 0,
            min: 1,
            max: 1,
            capacity_rps: 50.0,
            vcpus: 1,
            memory_mib: 256,
            port: 80,
            health: HealthCheck::default(),
            standby_max: 0,
            spread: true,
            allow_from: Vec::new(),
            egress: false,
            ports: Vec::new(),
            machine: Default::default(),
            firmware: Default::default(),
            disk_bus: Default::default(),
            nic: Default::default(),
            cpu: Default::default(),
            ssh_authorized_keys: Vec::new(),
            user_data: None,
        }
    }

    /// Asserts `change` makes the spec invalid in `field`, with `text` in the message.
    fn rejects(change: impl FnOnce(&mut ServiceSpec), field: &str, text: &str) {
        let mut s = spec("web");
        change(&mut s);
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, field, "{e}");
        assert_eq!(e.service.as_str(), "web");
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("service web: {field} ")),
            "{shown}"
        );
        assert!(shown.contains(text), "{shown}");
        assert_eq!(validate_services(&[spec("ok"), s]), Err(e));
    }

    #[test]
    fn a_plain_spec_and_the_bounds_themselves_are_valid() {
        assert_eq!(spec("web").validate(), Ok(()));
        let mut s = spec("web");
        s.min = 1000;
        s.max = 1000;
        s.vcpus = 64;
        s.memory_mib = 1_048_576;
        s.capacity_rps = 1_000_000.0;
        s.port = 65535;
        s.priority = 1000;
        s.health = HealthCheck::http(format!("/{}", "a".repeat(255)));
        assert_eq!(s.validate(), Ok(()));
        s.min = 0;
        s.vcpus = 1;
        s.memory_mib = 64;
        s.capacity_rps = 0.001;
        s.port = 1;
        s.priority = -1000;
        s.health = HealthCheck::http("/h?x=1&y=%20~");
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(validate_services(&[]), Ok(()));
    }

    #[test]
    fn hardware_keys_and_user_data_are_checked_on_the_server_side() {
        let text = "[[service]]\nname = \"old\"\nimage = \"win:xp\"\nmachine = \"pc\"\n\
                    firmware = \"uefi\"\ndisk_bus = \"ide\"\nnic = \"e1000\"\ncpu = \"host\"\n\
                    ssh_authorized_keys = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO admin@x\"]\n";
        let s = &parse_services("s.toml", text, &no_files).unwrap()[0];
        assert_eq!(s.hardware().nic, crate::hardware::Nic::E1000);
        assert_eq!(s.hardware().firmware, crate::hardware::Firmware::Uefi);
        let e =
            parse_services("s.toml", &text.replace("\"pc\"", "\"q35\""), &no_files).unwrap_err();
        assert!(e.to_string().contains("q35 has no IDE"), "{e}");
        let e = parse_services("s.toml", &text.replace("e1000", "rtl8139"), &no_files).unwrap_err();
        assert!(e.to_string().contains("rtl8139"), "{e}");
        rejects(
            |s| s.ssh_authorized_keys = vec!["hunter2".into()],
            "ssh_authorized_keys",
            "not an SSH public key line",
        );
        rejects(
            |s| s.user_data = Some("cloud.yaml".into()),
            "user_data",
            "starting with #cloud-config",
        );
        rejects(
            |s| s.user_data = Some(format!("#cloud-config\n{}", "x".repeat(MAX_USER_DATA))),
            "user_data",
            "at most 65536",
        );
        let mut ok = spec("web");
        ok.user_data = Some("#cloud-config\npackages: []\n".into());
        assert_eq!(ok.validate(), Ok(()));
        // A services file names the file; its content is what the spec carries.
        let with = |data: &str| format!("{text}user_data = \"{data}\"\n");
        let read = |name: &str| match name {
            "ok.yaml" => Ok("#cloud-config\n{}\n".to_owned()),
            "notes.txt" => Ok("remember the milk".to_owned()),
            other => Err(format!("no such file {other}")),
        };
        let s = parse_services("s.toml", &with("ok.yaml"), &read).unwrap();
        assert_eq!(s[0].user_data.as_deref(), Some("#cloud-config\n{}\n"));
        let e = parse_services("s.toml", &with("gone.yaml"), &read).unwrap_err();
        assert!(e.to_string().contains("no such file gone.yaml"), "{e}");
        let e = parse_services("s.toml", &with("notes.txt"), &read).unwrap_err();
        assert!(e.to_string().contains("#cloud-config"), "{e}");
    }

    #[test]
    fn instance_bounds() {
        rejects(|s| s.max = 0, "max", "max must be 1-1000 (got 0)");
        rejects(|s| s.max = 1001, "max", "(got 1001)");
        rejects(|s| s.max = u32::MAX, "max", "(got 4294967295)");
        rejects(
            |s| {
                s.min = 5;
                s.max = 4;
            },
            "min",
            "min (5) is above max (4)",
        );
    }

    #[test]
    fn vcpus_1_to_64() {
        rejects(|s| s.vcpus = 0, "vcpus", "vcpus must be 1-64 (got 0)");
        rejects(|s| s.vcpus = 65, "vcpus", "(got 65)");
    }

    #[test]
    fn memory_64_mib_to_1_tib() {
        rejects(|s| s.memory_mib = 0, "memory_mib", "(got 0)");
        rejects(|s| s.memory_mib = 63, "memory_mib", "(got 63)");
        rejects(|s| s.memory_mib = 1_048_577, "memory_mib", "(got 1048577)");
        rejects(
            |s| s.memory_mib = u32::MAX,
            "memory_mib",
            "memory_mib must be 64-1048576 (got 4294967295)",
        );
    }

    #[test]
    fn capacity_finite_positive_and_bounded() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1_000_000.5] {
            rejects(
                |s| s.capacity_rps = bad,
                "capacity_rps",
                "capacity_rps must be",
            );
        }
    }

    #[test]
    fn port_not_zero() {
        rejects(|s| s.port = 0, "port", "port must be 1-65535 (got 0)");
    }

    #[test]
    fn priority_within_a_thousand() {
        rejects(
            |s| s.priority = 1001,
            "priority",
            "-1000 to 1000 (got 1001)",
        );
        rejects(|s| s.priority = i32::MIN, "priority", "(got -2147483648)");
    }

    #[test]
    fn health_is_a_short_printable_path() {
        rejects(
            |s| s.health = HealthCheck::http("/h\r\nX: y"),
            "health",
            r#"(got "/h\r\nX: y")"#,
        );
        for (path, says) in [
            ("/h\n", r#"\n"#),
            ("/h\0", "health must be"),
            ("/a b", "without spaces"),
            ("/a\tb", "health must be"),
            ("/é", "health must be"),
            ("/\u{7f}", "health must be"),
            ("health", "health must be"),
            ("", "health must be"),
        ] {
            rejects(|s| s.health = HealthCheck::http(path), "health", says);
        }
        // Too long, and the message quotes only the start of it.
        let long = format!("/{}", "a".repeat(256));
        let mut s = spec("web");
        s.health = HealthCheck::http(long.clone());
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "health");
        assert!(e.message.contains("at most 256 bytes"), "{e}");
        assert!(e.message.len() < 300, "{e}");
    }

    #[test]
    fn a_name_declared_twice_is_refused() {
        let e = validate_services(&[spec("web"), spec("db"), spec("web")]).unwrap_err();
        assert_eq!(e.field, "name");
        assert_eq!(e.service.as_str(), "web");
        assert!(
            e.to_string()
                .starts_with("service web: name must be unique"),
            "{e}"
        );
        assert!(e.message.contains("#1 and #3"), "{e}");
    }

    #[test]
    fn the_file_and_the_api_share_the_rules() {
        let cases = [
            ("memory_mib = 256", "memory_mib = 4294967295", "memory_mib"),
            ("vcpus = 1", "vcpus = 0", "vcpus"),
            ("port = 80", "port = 0", "port"),
            ("priority = 10", "priority = 5000", "priority"),
            ("max = 4", "max = 1001", "max"),
            ("capacity_rps = 50", "capacity_rps = nan", "capacity_rps"),
            (
                "health = \"/health\"",
                "health = \"/h\\r\\nX: y\"",
                "health",
            ),
        ];
        for (from, to, field) in cases {
            let text = GOOD.replace(from, to);
            let e = parse_services("s.toml", &text, &no_files).unwrap_err();
            assert_eq!(e.line, 2, "{e}");
            assert!(
                e.message.starts_with(&format!("service finance: {field} ")),
                "{e}"
            );
        }
    }
}
