//! NAT for the node subnet: masquerading towards the outside and host-port
//! mappings (DNAT) to containers.
//!
//! We drive nftables through the `nft` binary with one dedicated table
//! `inet oakestra` that is rewritten as a whole on every change: `nft -f`
//! applies a file as one atomic transaction (never a half-written ruleset)
//! and cleanup is deleting one table. The one exception to staying in our
//! own table is the host's FORWARD chain, where a DROP policy (Docker's)
//! would overrule us: `forward` adds two marked accepts there. The netlink nftables crates are still immature, so the `nft`
//! binary is the one subprocess NetManager runs.

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub const TABLE: &str = "oakestra";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub proto: Proto,
}

/// Parse `"hostPort:containerPort[/tcp|/udp];..."`; a bare `port` maps the same
/// port on both sides, TCP unless a protocol is given.
pub fn parse_port_mappings(spec: &str) -> Result<Vec<PortMapping>> {
    let mut out = Vec::new();
    for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let (ports, proto) = match item.split_once('/') {
            None => (item, Proto::Tcp),
            Some((p, "tcp")) => (p, Proto::Tcp),
            Some((p, "udp")) => (p, Proto::Udp),
            Some((_, other)) => {
                bail!("port mapping {item:?}: protocol {other:?} is not tcp or udp")
            }
        };
        let port = |s: &str| -> Result<u16> {
            match s.trim().parse::<u16>() {
                Ok(p) if p != 0 => Ok(p),
                _ => bail!("port mapping {item:?}: {s:?} is not a port number"),
            }
        };
        let (host_port, container_port) = match ports.split_once(':') {
            Some((h, c)) => (port(h)?, port(c)?),
            None => {
                let p = port(ports)?;
                (p, p)
            }
        };
        if out
            .iter()
            .any(|m: &PortMapping| m.host_port == host_port && m.proto == proto)
        {
            bail!(
                "port mapping {item:?}: host port {host_port}/{} given twice",
                proto.as_str()
            );
        }
        out.push(PortMapping {
            host_port,
            container_port,
            proto,
        });
    }
    Ok(out)
}

/// One container's mappings.
#[derive(Debug, Clone)]
pub struct ContainerPorts {
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub mappings: Vec<PortMapping>,
}

/// Everything the table holds.
#[derive(Debug, Clone)]
pub struct Ruleset {
    pub bridge: String,
    pub subnet_v4: (Ipv4Addr, u8),
    pub subnet_v6: (Ipv6Addr, u8),
    pub containers: Vec<ContainerPorts>,
}

impl Ruleset {
    /// nft script that replaces the table atomically (the leading `add`
    /// makes `delete` valid on the first run).
    pub fn render(&self) -> String {
        let mut dnat = String::new();
        for c in &self.containers {
            for m in &c.mappings {
                let p = m.proto.as_str();
                dnat.push_str(&format!(
                    "\t\tmeta nfproto ipv4 fib daddr type local {p} dport {} dnat ip to {}:{}\n",
                    m.host_port, c.v4, m.container_port
                ));
                dnat.push_str(&format!(
                    "\t\tmeta nfproto ipv6 fib daddr type local {p} dport {} dnat ip6 to [{}]:{}\n",
                    m.host_port, c.v6, m.container_port
                ));
            }
        }
        let (n4, l4) = self.subnet_v4;
        let (n6, l6) = self.subnet_v6;
        let br = &self.bridge;
        format!(
            "add table inet {TABLE}\n\
             delete table inet {TABLE}\n\
             table inet {TABLE} {{\n\
             \tchain prerouting {{\n\
             \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             {dnat}\
             \t}}\n\
             \tchain output {{\n\
             \t\ttype nat hook output priority -100; policy accept;\n\
             {dnat}\
             \t}}\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {n4}/{l4} oifname != \"{br}\" masquerade\n\
             \t\tip6 saddr {n6}/{l6} oifname != \"{br}\" masquerade\n\
             \t}}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tiifname \"{br}\" accept\n\
             \t\toifname \"{br}\" accept\n\
             \t}}\n\
             }}\n"
        )
    }
}

/// Feed an nft script to `nft -f -` in the current namespace.
pub fn run_nft(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (is nftables installed?)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .context("writing the nft script")?;
    }
    let out = child.wait_with_output().context("waiting for nft")?;
    if !out.status.success() {
        bail!(
            "nft failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Write the table. Our accepts here cannot override another table's DROP
/// (Docker's FORWARD policy): the caller also runs `forward::ensure`.
pub fn apply(rules: &Ruleset) -> Result<()> {
    run_nft(&rules.render()).context("applying the oakestra nftables table")
}

/// Remove the table entirely (absent is fine).
pub fn remove() -> Result<()> {
    run_nft(&format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings() {
        let m = parse_port_mappings("9080:80/tcp;9081; 53:5353/udp ;").unwrap();
        assert_eq!(
            m,
            vec![
                PortMapping {
                    host_port: 9080,
                    container_port: 80,
                    proto: Proto::Tcp
                },
                PortMapping {
                    host_port: 9081,
                    container_port: 9081,
                    proto: Proto::Tcp
                },
                PortMapping {
                    host_port: 53,
                    container_port: 5353,
                    proto: Proto::Udp
                },
            ]
        );
        assert!(parse_port_mappings("").unwrap().is_empty());
        assert!(parse_port_mappings("80:x").is_err());
        assert!(parse_port_mappings("80/sctp").is_err());
        assert!(parse_port_mappings("0").is_err());
        assert!(parse_port_mappings("80;80").is_err());
        assert!(parse_port_mappings("80/tcp;80/udp").is_ok());
    }

    #[test]
    fn render_has_rules() {
        let r = Ruleset {
            bridge: "goProxyBridge".into(),
            subnet_v4: ("10.18.0.64".parse().unwrap(), 26),
            subnet_v6: ("fc00::".parse().unwrap(), 120),
            containers: vec![ContainerPorts {
                v4: "10.18.0.66".parse().unwrap(),
                v6: "fc00::42".parse().unwrap(),
                mappings: parse_port_mappings("9080:80").unwrap(),
            }],
        };
        let s = r.render();
        assert!(s.contains("tcp dport 9080 dnat ip to 10.18.0.66:80"), "{s}");
        assert!(s.contains("dnat ip6 to [fc00::42]:80"), "{s}");
        assert!(
            s.contains("ip saddr 10.18.0.64/26 oifname != \"goProxyBridge\" masquerade"),
            "{s}"
        );
    }
}
