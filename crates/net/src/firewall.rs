//! Isolation and egress on one host, as one nftables table of vMatrix's own (`inet`, plus a
//! `bridge` table against address spoofing), replaced as a whole in one transaction whenever
//! the view of the network changes, and deleted when the host leaves.
//!
//! What it enforces, for traffic from the service network's instance addresses:
//! - instances of one service reach each other; another service's only if that service lists
//!   theirs in `allow_from` (new TCP connections, new UDP/ICMP flows; replies always pass);
//! - nothing on a host (agent, controller, switch, sshd…) accepts a connection from an instance;
//! - outbound traffic beyond the service network only for `egress` services, masqueraded, and
//!   never to a host's underlay address;
//! - a TAP sends only its guest's MAC and address, and only IPv4, ARP and QEMU's RARP
//!   announcement (anti-spoofing, before the bridge learns anything from the frame).
//!
//! An address no view names yet (an instance just created) is held to "reaches nothing": the
//! rules fail closed. A TCP segment that is not a connection's first passes, so connections
//! survive a live migration (the destination host never saw their start).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use crate::{run, NetError, ServiceNet};

/// One service's place in the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRules {
    /// Its name.
    pub name: String,
    /// Its instances' addresses.
    pub members: Vec<Ipv4Addr>,
    /// Services whose instances may connect to these.
    pub allow_from: Vec<String>,
    /// Outbound traffic allowed.
    pub egress: bool,
}

/// Everything the rules of one host are made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// The service network.
    pub net: ServiceNet,
    /// Addresses on it that are hosts, not instances (gateway, fronts).
    pub host_addresses: Vec<Ipv4Addr>,
    /// Every host's underlay address (never reachable from an instance).
    pub hosts: Vec<Ipv4Addr>,
    /// The services.
    pub services: Vec<ServiceRules>,
    /// This host's TAPs with the MAC and address each may send from.
    pub taps: Vec<Tap>,
}

/// A VM's TAP on this host and what its guest may send as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tap {
    /// The TAP device.
    pub name: String,
    /// The guest NIC's MAC.
    pub mac: String,
    /// The instance's address.
    pub address: Ipv4Addr,
}

fn set(out: &mut String, name: &str, kind: &str, elems: &[String]) {
    let _ = write!(out, "  set {name} {{ type {kind};");
    if !elems.is_empty() {
        let _ = write!(out, " elements = {{ {} }};", elems.join(", "));
    }
    out.push_str(" }\n");
}

fn addrs(a: &[Ipv4Addr]) -> Vec<String> {
    let mut v: Vec<String> = a.iter().map(Ipv4Addr::to_string).collect();
    v.sort();
    v.dedup();
    v
}

/// The nftables script that replaces table `table` (in families `inet` and `bridge`) with
/// `rules`.
pub fn script(table: &str, rules: &Rules) -> String {
    let net = rules.net.to_string();
    let mut out = String::new();
    // Create-then-delete makes the replacement one transaction whether or not it existed.
    for family in ["inet", "bridge"] {
        let _ = writeln!(
            out,
            "table {family} {table} {{}}\ndelete table {family} {table}"
        );
    }
    let _ = writeln!(out, "table inet {table} {{");
    set(
        &mut out,
        "hostaddrs",
        "ipv4_addr",
        &addrs(&rules.host_addresses),
    );
    set(&mut out, "underlay", "ipv4_addr", &addrs(&rules.hosts));
    let egress: Vec<Ipv4Addr> = rules
        .services
        .iter()
        .filter(|s| s.egress)
        .flat_map(|s| s.members.iter().copied())
        .collect();
    set(&mut out, "egress", "ipv4_addr", &addrs(&egress));
    // Per service: its members (mN) and what they may open connections to (rN).
    let by_name: BTreeMap<&str, &ServiceRules> = rules
        .services
        .iter()
        .map(|s| (s.name.as_str(), s))
        .collect();
    let mut east_west = String::new();
    for (i, s) in rules.services.iter().enumerate() {
        let mut reach = s.members.clone();
        for t in by_name.values() {
            if t.allow_from.iter().any(|a| a == &s.name) {
                reach.extend(t.members.iter().copied());
            }
        }
        set(&mut out, &format!("m{i}"), "ipv4_addr", &addrs(&s.members));
        set(&mut out, &format!("r{i}"), "ipv4_addr", &addrs(&reach));
        let _ = writeln!(
            east_west,
            "    ip saddr @m{i} ip daddr @r{i} accept comment \"{}\"",
            s.name
        );
    }
    let _ = write!(
        out,
        "  chain forward {{\n    type filter hook forward priority 0; policy accept;\n\
         \x20   ct state established,related accept\n\
         \x20   ip saddr != {net} ip daddr {net} drop\n\
         \x20   ip saddr != {net} accept\n\
         \x20   ip saddr @hostaddrs accept\n\
         \x20   ip daddr {net} meta l4proto tcp tcp flags & (syn | ack) != syn accept\n\
         \x20   ip daddr {net} jump east_west\n\
         \x20   ip daddr @underlay drop\n\
         \x20   ip saddr @egress accept\n\
         \x20   drop\n  }}\n\
         \x20 chain east_west {{\n{east_west}    drop\n  }}\n\
         \x20 chain input {{\n    type filter hook input priority 0; policy accept;\n\
         \x20   ip saddr @hostaddrs accept\n\
         \x20   ip saddr {net} ct state established,related accept\n\
         \x20   ip saddr {net} drop\n  }}\n\
         \x20 chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;\n\
         \x20   ip saddr @egress ip daddr != {net} masquerade\n  }}\n}}\n"
    );
    let _ = writeln!(out, "table bridge {table} {{");
    let taps: Vec<String> = rules
        .taps
        .iter()
        .map(|t| format!("\"{}\" . {}", t.name, t.address))
        .collect();
    set(&mut out, "taps", "ifname . ipv4_addr", &taps);
    let macs: Vec<String> = rules
        .taps
        .iter()
        .map(|t| format!("\"{}\" . {}", t.name, t.mac))
        .collect();
    set(&mut out, "macs", "ifname . ether_addr", &macs);
    // Before the bridge learns a MAC (prerouting): a frame from a TAP must carry its guest's
    // MAC and, for IPv4 and ARP, its address; nothing but IPv4, ARP and QEMU's RARP
    // announcement leaves a TAP (no IPv6, no VLAN tags).
    let _ = write!(
        out,
        "  chain prerouting {{\n    type filter hook prerouting priority -300; policy accept;\n\
         \x20   iifname != \"vmt*\" accept\n\
         \x20   iifname . ether saddr != @macs drop\n\
         \x20   ether type != {{ ip, arp, 0x8035 }} drop\n\
         \x20   ether type ip iifname . ip saddr != @taps drop\n\
         \x20   ether type arp iifname . arp saddr ip != @taps drop\n  }}\n}}\n"
    );
    out
}

/// The script for a host that only joins the service network (the switch's): nothing on it
/// accepts a connection from an instance.
pub fn front_script(table: &str, net: &ServiceNet, bridge: &str) -> String {
    format!(
        "table inet {table} {{}}\ndelete table inet {table}\n\
         table inet {table} {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n\
         \x20   iifname \"{bridge}\" ct state established,related accept\n\
         \x20   iifname \"{bridge}\" ip saddr {net} drop\n  }}\n}}\n"
    )
}

/// Applies a script with `nft -f -`.
pub fn apply(script: &str) -> Result<(), NetError> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetError::Spawn {
            tool: "nft (Debian package nftables)".into(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|source| NetError::Spawn {
                tool: "nft".into(),
                source,
            })?;
    }
    let out = child.wait_with_output().map_err(|source| NetError::Spawn {
        tool: "nft".into(),
        source,
    })?;
    if !out.status.success() {
        return Err(NetError::Command {
            command: "nft -f -".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Deletes table `table` (both families) if it exists.
pub fn remove(table: &str) -> Result<(), NetError> {
    for family in ["inet", "bridge"] {
        let listed = run("nft", &["list", "tables", family]).unwrap_or_default();
        if listed
            .lines()
            .any(|l| l.trim() == format!("table {family} {table}"))
        {
            run("nft", &["delete", "table", family, table])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reach_follows_allow_from_and_the_script_names_every_piece() {
        let rules = Rules {
            net: ServiceNet::parse("10.77.0.0/16").unwrap(),
            host_addresses: vec!["10.77.0.1".parse().unwrap()],
            hosts: vec!["10.78.0.2".parse().unwrap()],
            services: vec![
                ServiceRules {
                    name: "web".into(),
                    members: vec!["10.77.0.2".parse().unwrap()],
                    allow_from: vec![],
                    egress: true,
                },
                ServiceRules {
                    name: "db".into(),
                    members: vec!["10.77.0.3".parse().unwrap()],
                    allow_from: vec!["web".into()],
                    egress: false,
                },
            ],
            taps: vec![Tap {
                name: "vmt0123456789".into(),
                mac: "52:54:00:01:02:03".into(),
                address: "10.77.0.2".parse().unwrap(),
            }],
        };
        let s = script("vmatrix", &rules);
        // web may open connections to db (db allows it), db not to web.
        assert!(
            s.contains("set r0 { type ipv4_addr; elements = { 10.77.0.2, 10.77.0.3 }; }"),
            "{s}"
        );
        assert!(
            s.contains("set r1 { type ipv4_addr; elements = { 10.77.0.3 }; }"),
            "{s}"
        );
        assert!(
            s.contains("set egress { type ipv4_addr; elements = { 10.77.0.2 }; }"),
            "{s}"
        );
        assert!(s.contains("\"vmt0123456789\" . 10.77.0.2"), "{s}");
        assert!(s.contains("\"vmt0123456789\" . 52:54:00:01:02:03"), "{s}");
        assert!(s.contains("ether type != { ip, arp, 0x8035 } drop"), "{s}");
        assert!(s.contains("delete table inet vmatrix"));
        assert!(s.contains("masquerade"));
    }
}
