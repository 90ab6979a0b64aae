//! `caisson-fleet endpoints [UNIT]`: what discovery serves, as the machines registered it.

use crate::services;
use crate::store::Store;
use anyhow::Result;
use caisson_net::endpoint::Instance;

/// One line per instance: unit, instance, address, ports (`name=port/proto`), machine,
/// revision; or the JSON of [`caisson_net::endpoint::Endpoints`]. Registrations that do not
/// decode are listed as INVALID.
pub(super) async fn run(store: &Store, unit: Option<&str>, json: bool) -> Result<()> {
    let (mut endpoints, invalid) = services::endpoints(&store.client, &store.keys).await?;
    if let Some(u) = unit {
        endpoints.units.retain(|name, _| name == u);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&endpoints)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<16} {:<16} {:<24} {:<16} REVISION",
        "UNIT", "INSTANCE", "ADDRESS", "PORTS", "MACHINE"
    );
    for (name, instances) in &endpoints.units {
        for i in instances {
            println!("{}", row(name, i));
        }
    }
    for bad in &invalid {
        println!("INVALID {}: {}", bad.key, bad.error);
    }
    if endpoints.units.is_empty() {
        match unit {
            Some(u) => println!("(no serving instance of {u} is registered)"),
            None => println!("(no serving instance is registered)"),
        }
    }
    Ok(())
}

fn row(unit: &str, i: &Instance) -> String {
    let ports: Vec<String> = i
        .ports
        .iter()
        .map(|p| {
            let proto = p.proto.srv_label().trim_start_matches('_');
            match &p.name {
                Some(n) => format!("{n}={}/{proto}", p.port),
                None => format!("{}/{proto}", p.port),
            }
        })
        .collect();
    let ports = if ports.is_empty() {
        "-".to_string()
    } else {
        ports.join(",")
    };
    format!(
        "{unit:<24} {:<16} {:<16} {ports:<24} {:<16} {}",
        i.id,
        i.address.to_string(),
        i.machine,
        i.revision
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use caisson_net::endpoint::{Port, Proto};

    #[test]
    fn a_row_names_ports_and_where() {
        let i = Instance {
            id: "m1".into(),
            address: "10.42.1.5".parse().unwrap(),
            ports: vec![
                Port {
                    name: Some("http".into()),
                    port: 80,
                    proto: Proto::Tcp,
                },
                Port {
                    name: None,
                    port: 53,
                    proto: Proto::Udp,
                },
            ],
            machine: "m1".into(),
            revision: 12,
        };
        let r = row("web", &i);
        assert!(r.starts_with("web "), "{r}");
        assert!(
            r.contains("10.42.1.5") && r.contains("http=80/tcp,53/udp"),
            "{r}"
        );
        assert!(r.trim_end().ends_with("12"), "{r}");
    }
}
