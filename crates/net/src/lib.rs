//! The service network on one host: a Linux bridge that the VMs' TAP devices join, the gateway
//! address every host answers for (the same address and MAC everywhere, so an instance keeps
//! its gateway wherever it moves), and a VXLAN device that joins this bridge to the other
//! hosts' over their underlay addresses (one flooding entry per peer; MACs are learnt, and a
//! moved instance's self-announcement re-teaches them at once).
//!
//! It is driven through iproute2's `ip` and `bridge` commands — the same commands an operator
//! types to look at it — rather than raw netlink: every change is a handful of calls at start
//! or when the set of hosts changes, never on a request's path.
//!
//! It must never touch an interface it did not create (its names are its own), never address a
//! packet anywhere but the service network and the underlay it is given, and remove everything
//! it made in [`HostNet::remove`].
#![forbid(unsafe_code)]

pub mod firewall;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

pub use ipnet::Ipv4Net;

/// The UDP port of the service network's VXLAN (IANA's).
pub const VXLAN_PORT: u16 = 4789;
/// The MAC of the gateway address: the same on every host (locally administered).
pub const GATEWAY_MAC: &str = "02:76:6d:78:00:01";

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A command failed.
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
    /// A command could not run.
    #[error("cannot run {tool} ({source}); install iproute2 (Debian package iproute2)")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    /// Bad settings.
    #[error("{0}")]
    Invalid(String),
    /// A file could not be written.
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, NetError>;

/// Runs `tool args…`, failing with its stderr.
pub fn run(tool: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|source| NetError::Spawn {
            tool: tool.into(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetError::Command {
            command: format!("{tool} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The interfaces of this process's network namespace.
///
/// Read from `/proc/self/net/dev`, which follows the namespace the process is in; `/sys/class/net`
/// shows the namespace whoever mounted `/sys` was in, so in a namespace entered with `unshare` or
/// `nsenter` (an agent of `vmatrix up`) it lists the host's interfaces, not its own.
pub fn links() -> Vec<String> {
    std::fs::read_to_string("/proc/self/net/dev")
        .map(|text| parse_links(&text))
        .unwrap_or_default()
}

/// The interface names in the text of `/proc/net/dev` (two header lines, then `name: counters`).
fn parse_links(text: &str) -> Vec<String> {
    text.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .map(|(name, _)| name.trim().to_owned())
        .filter(|n| !n.is_empty())
        .collect()
}

/// Whether interface `name` exists in this process's network namespace (see [`links`]).
pub fn link_exists(name: &str) -> bool {
    links().iter().any(|l| l == name)
}

/// Deletes interface `name` if it exists.
pub fn delete_link(name: &str) -> Result<()> {
    if link_exists(name) {
        run("ip", &["link", "del", name])?;
    }
    Ok(())
}

/// The service network's addresses: `.1` is the gateway on every host; the highest addresses
/// are kept for hosts that join without being machines (the switch's host takes the last).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceNet {
    /// The network, e.g. `10.77.0.0/16`.
    pub net: Ipv4Net,
}

/// Addresses at the top of the network kept for front hosts (switches).
pub const FRONT_ADDRESSES: u32 = 16;

impl ServiceNet {
    /// Parses `A.B.C.D/N` (a network of at least 64 addresses, /26 or larger).
    pub fn parse(s: &str) -> Result<Self> {
        let net: Ipv4Net = s.parse().map_err(|e| {
            NetError::Invalid(format!(
                "service network {s:?}: {e}; use an IPv4 network such as 10.77.0.0/16"
            ))
        })?;
        if net.prefix_len() > 26 {
            return Err(NetError::Invalid(format!(
                "service network {s}: /{} is too small; use /26 or larger (e.g. 10.77.0.0/16)",
                net.prefix_len()
            )));
        }
        Ok(Self { net: net.trunc() })
    }

    /// The gateway every host answers for (`.1`).
    pub fn gateway(&self) -> Ipv4Addr {
        self.nth(1)
    }

    /// The address of front host `i` (0: the last usable address).
    pub fn front(&self, i: u32) -> Ipv4Addr {
        self.nth(self.size() - 2 - i)
    }

    /// The addresses instances may have, lowest first.
    pub fn instance_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        (2..self.size() - 1 - FRONT_ADDRESSES).map(|i| self.nth(i))
    }

    /// The addresses of hosts on it: the gateway and every front address.
    pub fn host_addresses(&self) -> Vec<Ipv4Addr> {
        std::iter::once(self.gateway())
            .chain((0..FRONT_ADDRESSES).map(|i| self.front(i)))
            .collect()
    }

    /// Whether `a` is an instance address of this network.
    pub fn is_instance_address(&self, a: Ipv4Addr) -> bool {
        let off = u32::from(a).wrapping_sub(u32::from(self.net.network()));
        self.net.contains(&a) && (2..self.size() - 1 - FRONT_ADDRESSES).contains(&off)
    }

    fn size(&self) -> u32 {
        1u32 << (32 - self.net.prefix_len())
    }

    fn nth(&self, i: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net.network()) + i)
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.net.prefix_len()
    }
}

impl std::fmt::Display for ServiceNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.net.fmt(f)
    }
}

/// One host's attachment to the service network.
#[derive(Debug, Clone)]
pub struct HostNetConfig {
    /// The bridge the VMs' TAPs join (at most 15 bytes).
    pub bridge: String,
    /// The VXLAN device (at most 15 bytes).
    pub vxlan: String,
    /// The service network.
    pub net: ServiceNet,
    /// This host's address on it: the gateway (a machine) or a front address (the switch's
    /// host), with the gateway's shared MAC only for the gateway.
    pub address: Ipv4Addr,
    /// This host's underlay address (its VXLAN tunnel endpoint); `None`: a host alone.
    pub vtep: Option<Ipv4Addr>,
    /// The VXLAN network identifier.
    pub vni: u32,
    /// The nftables table of this host's rules (vMatrix's own; at most one per host).
    pub table: String,
}

/// The service network on this host, as set up by [`HostNet::setup`].
#[derive(Debug)]
pub struct HostNet {
    /// How it was set up.
    pub config: HostNetConfig,
    peers: std::sync::Mutex<BTreeSet<Ipv4Addr>>,
    /// The rules last applied (only a change is applied again).
    rules: std::sync::Mutex<String>,
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 15
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(NetError::Invalid(format!(
            "interface name {name:?}: use 1–15 letters, digits, '-' or '_'"
        )));
    }
    Ok(())
}

impl HostNet {
    /// Creates (or takes over, after a restart) the bridge with this host's address and the
    /// VXLAN device. Idempotent.
    pub fn setup(config: HostNetConfig) -> Result<Self> {
        check_name(&config.bridge)?;
        check_name(&config.vxlan)?;
        let br = config.bridge.as_str();
        if !link_exists(br) {
            run("ip", &["link", "add", br, "type", "bridge"])?;
        }
        if config.address == config.net.gateway() {
            run("ip", &["link", "set", br, "address", GATEWAY_MAC])?;
        }
        let cidr = format!("{}/{}", config.address, config.net.prefix());
        let shown = run("ip", &["-4", "-o", "addr", "show", "dev", br])?;
        if !shown.contains(&format!("inet {cidr} ")) {
            run("ip", &["addr", "add", &cidr, "dev", br])?;
        }
        run("ip", &["link", "set", br, "up"])?;
        // The service network is one LAN (sub-millisecond round trips): a segment lost in a
        // live migration's short gap is resent after 20 ms, not the default 200 ms.
        run(
            "ip",
            &[
                "route",
                "change",
                &config.net.to_string(),
                "dev",
                br,
                "proto",
                "kernel",
                "scope",
                "link",
                "src",
                &config.address.to_string(),
                "rto_min",
                "20ms",
            ],
        )?;
        if let Some(vtep) = config.vtep {
            let vx = config.vxlan.as_str();
            if !link_exists(vx) {
                run(
                    "ip",
                    &[
                        "link",
                        "add",
                        vx,
                        "type",
                        "vxlan",
                        "id",
                        &config.vni.to_string(),
                        "local",
                        &vtep.to_string(),
                        "dstport",
                        &VXLAN_PORT.to_string(),
                    ],
                )?;
            }
            run("ip", &["link", "set", vx, "master", br, "up"])?;
        }
        Ok(Self {
            config,
            peers: std::sync::Mutex::new(BTreeSet::new()),
            rules: std::sync::Mutex::new(String::new()),
        })
    }

    /// Applies isolation and egress for a machine (see [`firewall`]): bridged IPv4 goes
    /// through the host's filter (`bridge-nf-call-iptables`), routed egress is enabled, and
    /// the table is replaced when the rules changed.
    pub fn apply_rules(&self, rules: &firewall::Rules) -> Result<()> {
        let script = firewall::script(&self.config.table, rules);
        self.apply_script(script, true)
    }

    /// Applies a front host's rules: nothing here accepts a connection from an instance.
    pub fn apply_front_rules(&self) -> Result<()> {
        let script =
            firewall::front_script(&self.config.table, &self.config.net, &self.config.bridge);
        self.apply_script(script, false)
    }

    fn apply_script(&self, script: String, machine: bool) -> Result<()> {
        let mut last = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        if *last == script {
            return Ok(());
        }
        if machine && last.is_empty() {
            // Bridged IPv4 must pass the host's filter, or nothing here is enforced.
            if !std::path::Path::new("/proc/sys/net/bridge").exists() {
                let _ = run("modprobe", &["br_netfilter"]);
            }
            for (key, value) in [
                ("/proc/sys/net/bridge/bridge-nf-call-iptables", "1"),
                ("/proc/sys/net/ipv4/ip_forward", "1"),
            ] {
                std::fs::write(key, value).map_err(|e| {
                    NetError::Invalid(format!(
                        "cannot set {key} ({e}): without it isolation cannot be enforced; \
                         is the br_netfilter module available (modprobe br_netfilter)?"
                    ))
                })?;
            }
        }
        firewall::apply(&script)?;
        *last = script;
        Ok(())
    }

    /// Keeps one flooding entry per other host (`vteps` may include this one); broadcasts
    /// (ARP, a moved instance's announcement) reach every host, and unicast follows the MACs
    /// learnt from them. Only changes are applied.
    pub fn set_peers(&self, vteps: &[Ipv4Addr]) -> Result<()> {
        let Some(own) = self.config.vtep else {
            return Ok(());
        };
        let want: BTreeSet<Ipv4Addr> = vteps.iter().copied().filter(|v| *v != own).collect();
        let mut have = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if *have == want {
            return Ok(());
        }
        let vx = self.config.vxlan.as_str();
        let current = flood_entries(vx)?;
        for peer in want.difference(&current) {
            run(
                "bridge",
                &[
                    "fdb",
                    "append",
                    "00:00:00:00:00:00",
                    "dev",
                    vx,
                    "dst",
                    &peer.to_string(),
                ],
            )?;
        }
        for gone in current.difference(&want) {
            run(
                "bridge",
                &[
                    "fdb",
                    "del",
                    "00:00:00:00:00:00",
                    "dev",
                    vx,
                    "dst",
                    &gone.to_string(),
                ],
            )?;
        }
        *have = want;
        Ok(())
    }

    /// Writes the script QEMU runs to attach a new TAP to the bridge (`SCRIPT TAPNAME`), into
    /// `dir`; returns its path.
    pub fn tap_script(&self, dir: &Path) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(format!("tap-up-{}", self.config.bridge));
        let body = format!(
            "#!/bin/sh\n# Run by QEMU with a new TAP's name: attach it to the service bridge.\nexec ip link set \"$1\" master {} up\n",
            self.config.bridge
        );
        let io = |source| NetError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, body).map_err(|source| NetError::Io {
            path: tmp.clone(),
            source,
        })?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(path)
    }

    /// Removes the rules, the VXLAN device and the bridge (the TAPs go with their QEMUs).
    pub fn remove(&self) -> Result<()> {
        firewall::remove(&self.config.table)?;
        delete_link(&self.config.vxlan)?;
        delete_link(&self.config.bridge)
    }
}

/// The flooding entries (all-zero MAC) of VXLAN device `vx`: the peers it sends broadcasts to.
fn flood_entries(vx: &str) -> Result<BTreeSet<Ipv4Addr>> {
    let out = run("bridge", &["fdb", "show", "dev", vx])?;
    Ok(out
        .lines()
        .filter(|l| l.starts_with("00:00:00:00:00:00 "))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "dst")?;
            words.next()?.parse().ok()
        })
        .collect())
}

/// A TAP device name for instance `id` at `generation`: `vmt` and a short hash (TAP names
/// are at most 15 bytes; the two ends of a move differ by generation).
pub fn tap_name(id: &str, generation: u64) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes().chain(generation.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("vmt{:010x}", h & 0xff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_from_proc_net_dev() {
        let text = "Inter-|   Receive                            |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes\n    \
lo:  1296      16    0    0    0     0          0         0     1296\n\
vmxs39600: 0 0 0 0 0 0 0 0 0\n  eth0: 9 1 0 0 0 0 0 0 9\n";
        assert_eq!(parse_links(text), ["lo", "vmxs39600", "eth0"]);
        // This process's own namespace has a loopback interface.
        assert!(link_exists("lo"));
        assert!(!link_exists("vmx-no-such"));
    }

    #[test]
    fn addresses_of_a_service_network() {
        let n = ServiceNet::parse("10.77.3.9/16").unwrap();
        assert_eq!(n.to_string(), "10.77.0.0/16");
        assert_eq!(n.gateway(), Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(n.front(0), Ipv4Addr::new(10, 77, 255, 254));
        let first: Vec<_> = n.instance_addresses().take(2).collect();
        assert_eq!(
            first,
            [Ipv4Addr::new(10, 77, 0, 2), Ipv4Addr::new(10, 77, 0, 3)]
        );
        assert!(n.is_instance_address(Ipv4Addr::new(10, 77, 0, 2)));
        assert!(!n.is_instance_address(n.gateway()));
        assert!(!n.is_instance_address(n.front(0)));
        assert!(!n.is_instance_address(Ipv4Addr::new(10, 78, 0, 2)));
        let small = ServiceNet::parse("10.9.0.0/26").unwrap();
        assert_eq!(small.instance_addresses().count(), 64 - 3 - 16);
        assert!(ServiceNet::parse("10.9.0.0/27").is_err());
        assert!(ServiceNet::parse("ten/8").is_err());
    }

    #[test]
    fn tap_names_fit_and_differ_by_generation() {
        let a = tap_name("web-1", 1);
        assert!(a.len() <= 15 && a.starts_with("vmt"), "{a}");
        assert_ne!(a, tap_name("web-1", 2));
        assert_eq!(a, tap_name("web-1", 1));
    }
}
