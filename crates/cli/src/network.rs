//! Bridged networking from the command line: the flags of `controller`, `agent` and `up`, and
//! the faithful model of several hosts that `up` builds on one box — each machine a network
//! namespace of its own (its agent, bridge, VXLAN device and VMs inside), all joined by an
//! underlay bridge as real hosts are by their LAN, and this host (the switch's) joined to the
//! service network as one more tunnel endpoint.
//!
//! The machines' namespaces are anonymous (`unshare` when their agent starts): they vanish with
//! the agent and its VMs, whatever ends them. What lives in this host's namespace — the
//! underlay bridge and the switch's attachment — is named after the API port and removed when
//! `up` ends, and swept by the next `up` on the same port if one was killed.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{anyhow, bail, Context, Result};
use vmatrix_net::{delete_link, link_exists, run, HostNet, HostNetConfig, Ipv4Net, ServiceNet};

/// The default service network.
pub const DEFAULT_SERVICE_NET: &str = "10.77.0.0/16";

/// Bridged-networking flags of `vmatrix controller`.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerNet {
    /// Bridged networking: give each instance its own address on this network (e.g.
    /// 10.77.0.0/16); the agents must be started with the same --service-net. Default: none
    /// (every instance behind QEMU's user-mode NAT).
    #[arg(long)]
    pub service_net: Option<String>,
    /// The service network's VXLAN network identifier.
    #[arg(long, default_value_t = 7077)]
    pub vni: u32,
    /// The tunnel endpoint of a host that carries the service network without being a machine
    /// (the switch's host); repeatable.
    #[arg(long)]
    pub front_vtep: Vec<Ipv4Addr>,
    /// Another address the API listens on (e.g. the network the agents reach it on); repeatable.
    #[arg(long)]
    pub also_listen: Vec<SocketAddr>,
}

impl ControllerNet {
    /// The controller's network settings, checked.
    pub fn config(&self) -> Result<Option<vmatrix_controller::NetConfig>> {
        let Some(net) = &self.service_net else {
            return Ok(None);
        };
        Ok(Some(vmatrix_controller::NetConfig {
            net: ServiceNet::parse(net)?,
            vni: check_vni(self.vni)?,
            fronts: self.front_vtep.clone(),
            hosts: Vec::new(),
        }))
    }
}

/// Bridged-networking flags of `vmatrix agent`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentNet {
    /// Bridged networking: the service network (the controller's --service-net). Needs root.
    #[arg(long)]
    pub service_net: Option<String>,
    /// This host's underlay address, its VXLAN tunnel endpoint to the other hosts (default:
    /// none, a host alone).
    #[arg(long)]
    pub vtep: Option<Ipv4Addr>,
    /// The bridge the VMs' TAP devices join (created if missing).
    #[arg(long, default_value = "vmx0")]
    pub bridge: String,
    /// The service network's VXLAN network identifier (the controller's --vni).
    #[arg(long, default_value_t = 7077)]
    pub vni: u32,
}

impl AgentNet {
    /// The agent's network settings, checked.
    pub fn config(&self) -> Result<Option<HostNetConfig>> {
        let Some(net) = &self.service_net else {
            return Ok(None);
        };
        let net = ServiceNet::parse(net)?;
        Ok(Some(HostNetConfig {
            vxlan: format!("{}-vx", self.bridge),
            bridge: self.bridge.clone(),
            address: net.gateway(),
            net,
            vtep: self.vtep,
            vni: check_vni(self.vni)?,
            table: "vmatrix".into(),
        }))
    }
}

fn check_vni(vni: u32) -> Result<u32> {
    if vni == 0 || vni >= 1 << 24 {
        bail!("--vni {vni}: use 1 to 16777215");
    }
    Ok(vni)
}

/// Networking flags of `vmatrix up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpNet {
    /// bridge: each machine a network namespace with its own bridge, every instance its own
    /// address (needs root); user: QEMU's user-mode NAT with forwarded ports on 127.0.0.x;
    /// auto: bridge where possible, else user (said at start).
    #[arg(long, default_value = "auto", value_parser = ["auto", "bridge", "user"])]
    pub network: String,
    /// The service network the instances get addresses on (bridged).
    #[arg(long, default_value = DEFAULT_SERVICE_NET)]
    pub service_net: String,
    /// The underlay network joining the machines' namespaces (bridged; at least a /26).
    #[arg(long, default_value = "10.78.0.0/24")]
    pub underlay: String,
}

impl UpNet {
    /// Whether `up` runs bridged: asked for, or possible (`auto`).
    pub fn bridged(&self) -> Result<bool> {
        let possible = bridging_possible();
        match (self.network.as_str(), possible) {
            ("user", _) => Ok(false),
            ("bridge", Err(why)) => bail!("--network bridge: {why}; use --network user"),
            (_, Ok(())) => Ok(true),
            (_, Err(why)) => {
                tracing::warn!(
                    "networking: QEMU's user-mode NAT with forwarded ports ({why}); instances \
                     keep no connection across a move"
                );
                Ok(false)
            }
        }
    }
}

/// Why bridged networking cannot run here, if it cannot.
fn bridging_possible() -> std::result::Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("bridges, TAPs and namespaces need root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err("/dev/net/tun is missing".into());
    }
    for tool in ["ip", "bridge", "nsenter"] {
        if std::process::Command::new(tool).arg("-V").output().is_err() {
            return Err(format!(
                "{tool} is missing (Debian packages iproute2, util-linux)"
            ));
        }
    }
    Ok(())
}

/// The limits of `vmatrix switch`: what one client, or all, may take of it.
#[derive(Debug, Clone, clap::Args)]
pub struct SwitchLimitFlags {
    /// Seconds a client has to send a request head (and a first byte after connecting).
    #[arg(long, default_value_t = 10)]
    pub header_timeout: u64,
    /// Client connections open at once, in all (more are closed at once).
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
    /// Client connections open at once from one address.
    #[arg(long, default_value_t = 512)]
    pub max_connections_per_client: usize,
    /// Memory for request bodies held whole (those of up to 64 KiB, so that they can be
    /// retried); larger bodies stream and take none. E.g. 64M.
    #[arg(long, default_value = "64M", value_parser = vmatrix_core::volume::parse_size)]
    pub body_memory: u64,
    /// Seconds an instance has to send a response's head (then 504).
    #[arg(long, default_value_t = 60)]
    pub backend_timeout: u64,
}

impl SwitchLimitFlags {
    pub fn limits(&self) -> Result<vmatrix_switch::Limits> {
        let limits = vmatrix_switch::Limits {
            header_timeout: std::time::Duration::from_secs(self.header_timeout),
            max_connections: self.max_connections,
            max_connections_per_client: self.max_connections_per_client,
            body_memory: usize::try_from(self.body_memory)
                .map_err(|_| anyhow::anyhow!("--body-memory {} is too large", self.body_memory))?,
            backend_timeout: std::time::Duration::from_secs(self.backend_timeout),
        };
        if let Some(p) = limits.problem() {
            bail!("switch limits: {p}");
        }
        Ok(limits)
    }
}

/// HTTPS flags of `vmatrix switch` (and `up`, which passes them on).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsFlags {
    /// Serve HTTPS here too (HTTP/1.1 and HTTP/2 by ALPN), e.g. 127.0.0.1:8443; needs
    /// --tls-cert and --tls-key.
    #[arg(long)]
    pub tls_listen: Option<SocketAddr>,
    /// The certificate chain for HTTPS, PEM, leaf first.
    #[arg(long)]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Its private key, PEM.
    #[arg(long)]
    pub tls_key: Option<std::path::PathBuf>,
}

impl TlsFlags {
    /// The switch's TLS settings: all three flags, or none.
    pub fn config(&self) -> Result<Option<vmatrix_switch::TlsConfig>> {
        match (&self.tls_listen, &self.tls_cert, &self.tls_key) {
            (None, None, None) => Ok(None),
            (Some(listen), Some(cert), Some(key)) => Ok(Some(vmatrix_switch::TlsConfig {
                listen: *listen,
                cert: cert.clone(),
                key: key.clone(),
            })),
            _ => bail!("HTTPS needs all of --tls-listen, --tls-cert and --tls-key"),
        }
    }

    /// The same flags for a child process.
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let (Some(l), Some(c), Some(k)) = (&self.tls_listen, &self.tls_cert, &self.tls_key) {
            out.extend([
                "--tls-listen".into(),
                l.to_string(),
                "--tls-cert".into(),
                c.display().to_string(),
                "--tls-key".into(),
                k.display().to_string(),
            ]);
        }
        out
    }
}

/// The hosts `up` models on this box: an underlay bridge, one namespace per machine and this
/// host's attachment to the service network. Removed when dropped.
pub struct Topology {
    tag: u16,
    underlay: Ipv4Net,
    /// The service network.
    pub net: ServiceNet,
    front: Option<HostNet>,
    veths: Vec<String>,
}

impl Topology {
    fn underlay_bridge(tag: u16) -> String {
        format!("vmxu{tag}")
    }

    fn veth(tag: u16, i: usize) -> (String, String) {
        (format!("vmxr{tag}n{i}"), format!("vmxp{tag}n{i}"))
    }

    /// The VXLAN network identifier of this matrix.
    pub fn vni(&self) -> u32 {
        u32::from(self.tag)
    }

    /// This host's underlay address (the controller's and switch's, their tunnel endpoint).
    pub fn host_address(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.underlay.network()) + 1)
    }

    /// Machine `i`'s underlay address (its agent's and its tunnel endpoint).
    pub fn machine_address(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.underlay.network()) + 2 + i as u32)
    }

    /// Builds the underlay and this host's attachment for `machines` machines; `tag` (the API
    /// port) names everything and is the VXLAN id.
    pub fn create(tag: u16, flags: &UpNet, machines: usize) -> Result<Self> {
        let net = ServiceNet::parse(&flags.service_net)?;
        let underlay: Ipv4Net = flags
            .underlay
            .parse()
            .map_err(|e| anyhow!("--underlay {}: {e}", flags.underlay))?;
        let underlay = underlay.trunc();
        if underlay.hosts().count() < machines + 2 {
            bail!(
                "--underlay {underlay} has room for {} hosts; {machines} machines need a larger one",
                underlay.hosts().count().saturating_sub(1)
            );
        }
        if underlay.contains(&net.net) || net.net.contains(&underlay) {
            bail!("--underlay {underlay} and --service-net {net} overlap; use separate networks");
        }
        Self::sweep(tag);
        for n in [net.net, underlay] {
            if let Some(route) = route_overlapping(n)? {
                bail!(
                    "{n} overlaps a network this host already routes ({route}): another \
                     `vmatrix up`, or a real network; pass another --service-net / --underlay"
                );
            }
        }
        let mut topo = Self {
            tag,
            underlay,
            net,
            front: None,
            veths: Vec::new(),
        };
        let br = Self::underlay_bridge(tag);
        run("ip", &["link", "add", &br, "mtu", "1600", "type", "bridge"])?;
        let cidr = format!("{}/{}", topo.host_address(), underlay.prefix_len());
        run("ip", &["addr", "add", &cidr, "dev", &br])?;
        run("ip", &["link", "set", &br, "up"])?;
        let front = HostNet::setup(HostNetConfig {
            bridge: format!("vmxs{tag}"),
            vxlan: format!("vmxv{tag}"),
            net,
            address: net.front(0),
            vtep: Some(topo.host_address()),
            vni: topo.vni(),
            table: format!("vmatrix{tag}"),
        })
        .context("attaching this host to the service network")?;
        topo.front = Some(front);
        let front = topo.front.as_ref().expect("just set");
        let peers: Vec<Ipv4Addr> = (0..machines).map(|i| topo.machine_address(i)).collect();
        front.set_peers(&peers)?;
        front
            .apply_front_rules()
            .context("closing this host to the instances (nftables)")?;
        Ok(topo)
    }

    /// Joins machine `i`, whose agent runs as `pid` in a namespace of its own, to the underlay:
    /// a veth pair, one end on the underlay bridge, the other in the namespace with the
    /// machine's address.
    pub fn attach(&mut self, i: usize, pid: u32) -> Result<()> {
        let (outer, inner) = Self::veth(self.tag, i);
        run(
            "ip",
            &[
                "link", "add", &outer, "mtu", "1600", "type", "veth", "peer", "name", &inner,
                "mtu", "1600",
            ],
        )?;
        self.veths.push(outer.clone());
        run(
            "ip",
            &[
                "link",
                "set",
                &outer,
                "master",
                &Self::underlay_bridge(self.tag),
                "up",
            ],
        )?;
        let pid = pid.to_string();
        run("ip", &["link", "set", &inner, "netns", &pid])?;
        let ns = format!("--net=/proc/{pid}/ns/net");
        let cidr = format!("{}/{}", self.machine_address(i), self.underlay.prefix_len());
        run("nsenter", &[&ns, "ip", "link", "set", "lo", "up"])?;
        run("nsenter", &[&ns, "ip", "addr", "add", &cidr, "dev", &inner])?;
        run("nsenter", &[&ns, "ip", "link", "set", &inner, "up"])?;
        Ok(())
    }

    /// Removes what a killed `up` on the same port may have left in this namespace.
    fn sweep(tag: u16) {
        let _ = vmatrix_net::firewall::remove(&format!("vmatrix{tag}"));
        for name in [
            format!("vmxs{tag}"),
            format!("vmxv{tag}"),
            Self::underlay_bridge(tag),
        ] {
            let _ = delete_link(&name);
        }
        let prefix = format!("vmxr{tag}n");
        for name in vmatrix_net::links() {
            if name.starts_with(&prefix) {
                let _ = delete_link(&name);
            }
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(front) = self.front.take() {
            if let Err(e) = front.remove() {
                tracing::warn!("removing this host's service-network attachment: {e}");
            }
        }
        for v in &self.veths {
            if link_exists(v) {
                let _ = delete_link(v);
            }
        }
        let _ = delete_link(&Self::underlay_bridge(self.tag));
    }
}

/// A route of this namespace whose destination overlaps `net`, if any.
fn route_overlapping(net: Ipv4Net) -> Result<Option<String>> {
    let out = run("ip", &["-4", "-o", "route", "show", "table", "all"])?;
    for line in out.lines() {
        let dst = line.split_whitespace().next().unwrap_or("");
        let dst = match dst {
            "default" | "local" | "broadcast" | "unreachable" => continue,
            d => d,
        };
        let dst: Ipv4Net = match dst.parse::<Ipv4Net>() {
            Ok(n) => n,
            Err(_) => match dst.parse::<Ipv4Addr>() {
                Ok(a) => Ipv4Net::from(a),
                Err(_) => continue,
            },
        };
        if dst.contains(&net) || net.contains(&dst) {
            return Ok(Some(line.trim().to_owned()));
        }
    }
    Ok(None)
}
