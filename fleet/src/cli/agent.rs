//! `caisson-fleet agent`: the runtime and the machine record from the configuration, then the
//! agent loop (alone, or joined to the fleet).

use super::Cli;
use crate::agent::{self, Agent};
use crate::config::Config;
use crate::containerd::Containerd;
use crate::registry::{self, MachineRecord};
use anyhow::{Context, Result};
use std::path::Path;

fn local_record(config: &Config, root: &Path) -> Result<MachineRecord> {
    let id = match &config.id {
        Some(id) => id.clone(),
        None => registry::machine_id(root)?,
    };
    let (version, slot) = registry::os_facts(root);
    let address = config
        .address
        .clone()
        .or_else(|| {
            config
                .endpoints
                .first()
                .and_then(|e| registry::local_address(e))
        })
        .unwrap_or_else(|| "unknown".into());
    let (memory_bytes, cpus) = registry::capacity(root);
    Ok(MachineRecord {
        id,
        address,
        labels: config.labels.clone(),
        version,
        slot,
        last_seen: 0,
        memory_bytes,
        cpus,
    })
}

pub(super) async fn run_agent(cli: &Cli, root: &Path) -> Result<()> {
    let config = cli.config()?;
    let mut runtime = Containerd::new(config.containerd_socket.clone(), config.namespace.clone());
    runtime.fetch_limits = config.fetch_limits();
    runtime.log_dir = config.log_dir.clone();
    runtime.registries = std::sync::Arc::new(config.registries()?);
    runtime.image_poll = std::time::Duration::from_secs(config.image_poll_s);
    runtime.gc_keep = config.image_keep;
    runtime.volume_root = config.volume_root.clone();
    let network = config
        .network
        .enabled
        .then(|| crate::hostnet::HostNet::new(config.network.clone()));
    runtime.network = network.clone();
    let stop = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("cannot watch SIGTERM: {e}");
                    return std::future::pending().await;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        log::info!("stopping");
    };
    if !config.clustered() {
        agent::run_local(&config, &runtime, network, stop).await;
        return Ok(());
    }
    let record = local_record(&config, root).context("describing this machine")?;
    let mut a = Agent::join(&config, record, runtime).await?;
    a.net = agent::NetState::new(network);
    a.run(stop).await;
    Ok(())
}
