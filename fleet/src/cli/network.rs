//! `caisson-fleet network`: set the cluster network once, and show each host's subnet.

use crate::network::{self, Backend, Init, Ipv4Net, NetworkConfig};
use crate::registry;
use crate::store::Store;
use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use serde_json::json;

#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Set the cluster network: one private range for every container, cut into one subnet
    /// per host. Written once: the same settings again do nothing, others are refused. A range
    /// that overlaps a registered machine's own network is refused.
    Init {
        /// The range, e.g. 10.42.0.0/16 (RFC 1918 or 100.64.0.0/10).
        network: Ipv4Net,
        /// The prefix length of each host's subnet.
        #[arg(long, default_value_t = 24)]
        subnet_len: u8,
        /// How packets reach other hosts' subnets: host-gw (routes through the peer host, one
        /// L2 segment) or vxlan (across L3).
        #[arg(long, value_enum, default_value_t = BackendArg::HostGw)]
        backend: BackendArg,
        /// The VXLAN network identifier (with --backend vxlan).
        #[arg(long, default_value_t = 1)]
        vni: u32,
        /// The VXLAN UDP port (with --backend vxlan).
        #[arg(long, default_value_t = 4789)]
        port: u16,
    },
    /// Show the cluster network and each host's subnet: machine, public IP, and whether the
    /// machine's record is alive.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    HostGw,
    Vxlan,
}

/// Runs `caisson-fleet network ...`.
pub async fn run(store: &Store, command: &NetworkCommand) -> Result<()> {
    match command {
        NetworkCommand::Init {
            network,
            subnet_len,
            backend,
            vni,
            port,
        } => {
            let config = NetworkConfig {
                network: *network,
                subnet_len: *subnet_len,
                backend: match backend {
                    BackendArg::HostGw => Backend::HostGw,
                    BackendArg::Vxlan => Backend::Vxlan {
                        vni: *vni,
                        port: *port,
                    },
                },
            };
            match network::init(&store.client, &store.keys, &config).await? {
                Init::Written => println!("cluster network {}", describe(&config)),
                Init::Unchanged => println!("cluster network already {}", describe(&config)),
            }
        }
        NetworkCommand::Status { json } => status(store, *json).await?,
    }
    Ok(())
}

fn describe(c: &NetworkConfig) -> String {
    let backend = match c.backend {
        Backend::HostGw => "host-gw".to_string(),
        Backend::Vxlan { vni, port } => format!("vxlan (VNI {vni}, UDP port {port})"),
    };
    format!("{}, /{} per host, {backend}", c.network, c.subnet_len)
}

async fn status(store: &Store, as_json: bool) -> Result<()> {
    let config = network::config(&store.client, &store.keys).await?;
    let (claims, invalid) = network::claims(&store.client, &store.keys).await?;
    let live: std::collections::BTreeSet<String> = registry::machines(&store.client, &store.keys)
        .await?
        .into_iter()
        .map(|m| m.id)
        .collect();
    let (reports, bad_reports) = network::routes::reports(&store.client, &store.keys).await?;
    let rows: Vec<_> = claims
        .iter()
        .map(|c| {
            let r = &c.record;
            let routes = routes_to(&r.subnet, &r.machine, &live, &reports);
            let ok = routes
                .values()
                .filter(|s| *s == network::routes::OK)
                .count();
            json!({ "subnet": r.subnet, "machine": r.machine, "public_ip": r.public_ip,
                    "vtep_mac": r.vtep_mac, "alive": live.contains(&r.machine),
                    "routes": routes, "routed": format!("{ok}/{}", routes.len()) })
        })
        .collect();
    let invalid: Vec<_> = invalid.into_iter().chain(bad_reports).collect();
    if as_json {
        let v = json!({ "config": config, "subnets": rows, "invalid": invalid });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match &config {
        Some(c) => println!("network {}", describe(c)),
        None => println!("no cluster network (caisson-fleet network init 10.42.0.0/16)"),
    }
    println!(
        "{:<18} {:<34} {:<15} {:<5} ROUTED",
        "SUBNET", "MACHINE", "PUBLIC-IP", "ALIVE"
    );
    for r in &rows {
        // Any route not in place, by the machine that lacks it.
        let missing: Vec<String> = r["routes"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, s)| s.as_str() != Some(network::routes::OK))
            .map(|(m, s)| format!("{m}: {}", s.as_str().unwrap_or("")))
            .collect();
        println!(
            "{:<18} {:<34} {:<15} {:<5} {}{}",
            r["subnet"].as_str().unwrap_or(""),
            r["machine"].as_str().unwrap_or(""),
            r["public_ip"].as_str().unwrap_or(""),
            if r["alive"] == true { "yes" } else { "no" },
            r["routed"].as_str().unwrap_or(""),
            if missing.is_empty() {
                String::new()
            } else {
                format!(" ({})", missing.join(", "))
            }
        );
    }
    for i in &invalid {
        println!("{:<18} INVALID  {}: {}", "-", i.key, i.error);
    }
    Ok(())
}

/// How every other live machine reports its route to `subnet` (held by `holder`): its state,
/// or `not reported`.
fn routes_to(
    subnet: &network::Ipv4Net,
    holder: &str,
    live: &std::collections::BTreeSet<String>,
    reports: &std::collections::BTreeMap<String, network::routes::RouteReport>,
) -> std::collections::BTreeMap<String, String> {
    live.iter()
        .filter(|m| *m != holder)
        .map(|m| {
            let state = reports
                .get(m)
                .and_then(|r| r.state(subnet))
                .unwrap_or("not reported");
            (m.clone(), state.to_string())
        })
        .collect()
}
