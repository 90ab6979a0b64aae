//! The `caisson-fleet` command line: clap types and what each command does; the agent's
//! start in [`agent`], unit file checks in [`validate`], the cluster network in [`network`].

mod agent;
mod endpoints;
mod network;
mod validate;

pub use network::{BackendArg, NetworkCommand};

pub use validate::validate;

use crate::access;
use crate::config::{self, Config};
use crate::etcd::{Client, Credentials, EtcdError};
use crate::lock::RebootLock;
use crate::records::Invalid;
use crate::registry::{self, Keys};
use crate::scheduler::{self, Capacity};
use crate::store::{self, Store, Target};
use crate::unit::UnitSpec;
use crate::volumes;
use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use serde_json::json;
use std::path::PathBuf;

/// Caisson's fleet: machines, units and the reboot lock on etcd.
#[derive(Debug, Parser)]
#[command(name = "caisson-fleet", version)]
pub struct Cli {
    /// etcd endpoints, comma-separated (default: `endpoints` in the config file).
    #[arg(long, env = "CAISSON_FLEET_ETCD", value_delimiter = ',', global = true)]
    pub etcd: Vec<String>,
    /// The configuration file: endpoints, [tls] and [auth] (the operator's credentials on an
    /// operator's machine; the agent's on a machine).
    #[arg(long, env = "CAISSON_FLEET_CONFIG", default_value = config::PATH, global = true)]
    pub config: PathBuf,
    /// Allow plain HTTP and no credentials (as `insecure = true` in the file).
    #[arg(long, global = true)]
    pub insecure: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the machines: id, address, labels, version, slot, units, memory and CPUs the units
    /// there request / the machine has, last seen (a record that does not decode is listed as
    /// INVALID, with its key and the error).
    Machines {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check unit files without etcd: every error names the unit, the field and why. Exits
    /// non-zero when any file is not valid (`submit` runs the same checks).
    Validate {
        /// Unit files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Validate unit files and submit them all in one transaction (or none).
    Submit {
        /// Unit files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Start a stopped unit.
    Start {
        /// The unit's name.
        unit: String,
    },
    /// Stop a unit (its containers are removed; the unit stays).
    Stop {
        /// The unit's name.
        unit: String,
    },
    /// Remove a unit and its containers. Its volumes stay on their machines (and the unit
    /// stays pinned there should it be submitted again) unless `--volumes` is given.
    Destroy {
        /// The unit's name.
        unit: String,
        /// Also delete the unit's volumes on every machine (each does it when it next ticks,
        /// or when it comes back); works for a unit already destroyed without it.
        #[arg(long)]
        volumes: bool,
    },
    /// List units: desired and actual state (starting, running, healthy, unhealthy, exited,
    /// failed, with why a health check failed under the row), where they run, which machines
    /// hold their volumes and, for a unit held to a machine that is gone or full, that it waits
    /// for that machine (a unit,
    /// assignment or status record that does not decode is listed as INVALID, with its key and
    /// the error; the agents skip it).
    Units {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a unit's last output lines.
    Logs {
        /// The unit's name.
        unit: String,
        /// Only this machine.
        #[arg(long)]
        machine: Option<String>,
    },
    /// The reboot semaphore.
    Lock {
        #[command(subcommand)]
        command: LockCommand,
    },
    /// What discovery serves: each unit's serving instances (healthy, or running without a
    /// health check) as their machines registered them, with address, ports and machine.
    Endpoints {
        /// Only this unit.
        unit: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The cluster network: its range, and each host's subnet.
    Network {
        #[command(subcommand)]
        command: NetworkCommand,
    },
    /// etcd users and roles: who may write which keys (as etcd's root user).
    Access {
        #[command(subcommand)]
        command: AccessCommand,
    },
    /// Run the agent (a service of the host image).
    Agent {
        /// The root to read the machine id, os-release and /proc/cmdline from.
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// Make etcd's root user, the operator and leader roles and the operator's user, then turn
    /// authentication on. Run once per etcd cluster, over TLS; idempotent.
    Init {
        /// etcd root's password (a new random one is written here, 0600, if the file is absent).
        #[arg(long)]
        root_password_file: PathBuf,
        /// The operator's etcd user (for the `[auth]` of the operator's config).
        #[arg(long, default_value = "caisson-operator")]
        operator: String,
        /// The operator's password (made like the root's when absent).
        #[arg(long)]
        operator_password_file: PathBuf,
    },
    /// Make machine ID's role and user (`caisson-machine-ID`); print the user name.
    Machine {
        /// The machine id (its /etc/machine-id).
        id: String,
        /// etcd root's password.
        #[arg(long)]
        root_password_file: PathBuf,
        /// The machine's password (made when absent): provision it as `[fleet.auth] password`.
        #[arg(long)]
        password_file: PathBuf,
        /// The machine may lead the fleet (write assignments).
        #[arg(long)]
        leader: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum LockCommand {
    /// Show max and holders.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Let N machines reboot at once.
    SetMax {
        /// At least 1.
        n: u32,
    },
    /// Release a machine's slot.
    Release {
        /// The machine id.
        id: String,
    },
}

impl Cli {
    fn config(&self) -> Result<Config> {
        let mut c = Config::load(&self.config)?;
        if !self.etcd.is_empty() {
            c.endpoints = self.etcd.clone();
        }
        c.insecure |= self.insecure;
        c.check_access().map_err(|why| {
            anyhow::anyhow!("{} (with --etcd/--insecure): {why}", self.config.display())
        })?;
        Ok(c)
    }

    fn store(&self) -> Result<Store> {
        let c = self.config()?;
        if c.endpoints.is_empty() {
            bail!(
                "no etcd endpoints: pass --etcd https://HOST:2379 or set endpoints in {}",
                self.config.display()
            );
        }
        Ok(Store::new(c.client()?, Keys::new(&c.prefix)))
    }

    /// A client as etcd's root user (TLS settings from the config file). Before authentication
    /// is on, etcd takes no credentials: the client then sends none.
    async fn root_client(&self, password: &str) -> Result<(Client, Keys)> {
        let c = self.config()?;
        if c.endpoints.is_empty() {
            bail!(
                "no etcd endpoints: pass --etcd https://HOST:2379 or set endpoints in {}",
                self.config.display()
            );
        }
        let mut access = c.access()?;
        access.credentials = Some(Credentials {
            user: access::ROOT.into(),
            password: password.into(),
        });
        let timeout = std::time::Duration::from_secs(5);
        let root = Client::connect(&c.endpoints, &access, timeout)?;
        let client = match root.range(&c.prefix, false).await {
            Err(EtcdError::AuthNotEnabled { .. }) => {
                access.credentials = None;
                Client::connect(&c.endpoints, &access, timeout)?
            }
            Err(e) => return Err(e.into()),
            Ok(_) => root,
        };
        Ok((client, Keys::new(&c.prefix)))
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Agent { root } => return agent::run_agent(&cli, root).await,
        Command::Validate { files } => {
            let specs = validate(files)?;
            for s in &specs {
                println!("{}: unit {} is valid", s.0.display(), s.1.name);
            }
        }
        Command::Submit { files } => {
            // Validate everything before touching etcd.
            let specs: Vec<UnitSpec> = validate(files)?.into_iter().map(|(_, s)| s).collect();
            cli.store()?.submit(&specs).await?;
            for s in &specs {
                println!("submitted {}", s.name);
                if s.privileged {
                    eprintln!(
                        "warning: unit {} is privileged: every capability and device, no seccomp filter",
                        s.name
                    );
                }
            }
        }
        Command::Start { unit } => cli.store()?.set_target(unit, Target::Running).await?,
        Command::Stop { unit } => cli.store()?.set_target(unit, Target::Stopped).await?,
        Command::Destroy { unit, volumes } => destroy(&cli.store()?, unit, *volumes).await?,
        Command::Machines { json } => machines(&cli.store()?, *json).await?,
        Command::Units { json } => units(&cli.store()?, *json).await?,
        Command::Logs { unit, machine } => logs(&cli.store()?, unit, machine.as_deref()).await?,
        Command::Access { command } => run_access(&cli, command).await?,
        Command::Network { command } => network::run(&cli.store()?, command).await?,
        Command::Endpoints { unit, json } => {
            endpoints::run(&cli.store()?, unit.as_deref(), *json).await?
        }
        Command::Lock { command } => {
            let store = cli.store()?;
            let lock = RebootLock::new(store.client.clone(), store.keys.lock());
            match command {
                LockCommand::Status { json } => {
                    let s = lock.status().await?;
                    if *json {
                        println!("{}", serde_json::to_string_pretty(&s)?);
                    } else {
                        println!("max {} holders [{}]", s.max, s.holders.join(", "));
                    }
                }
                LockCommand::SetMax { n } => lock.set_max(*n).await?,
                LockCommand::Release { id } => {
                    if !lock.release(id).await? {
                        println!("{id} did not hold the reboot lock");
                    }
                }
            }
        }
    }
    Ok(())
}

async fn run_access(cli: &Cli, command: &AccessCommand) -> Result<()> {
    match command {
        AccessCommand::Init {
            root_password_file,
            operator,
            operator_password_file,
        } => {
            let root = access::password_file(root_password_file)?;
            let op = access::password_file(operator_password_file)?;
            let (client, keys) = cli.root_client(&root).await?;
            access::init(&client, &keys, &root, operator, &op).await?;
            println!(
                "authentication is on; operator user {operator} (password in {})",
                operator_password_file.display()
            );
        }
        AccessCommand::Machine {
            id,
            root_password_file,
            password_file,
            leader,
        } => {
            let root = access::password_file(root_password_file)?;
            let pw = access::password_file(password_file)?;
            let (client, keys) = cli.root_client(&root).await?;
            let user = access::add_machine(&client, &keys, id, &pw, *leader).await?;
            println!("{user}");
        }
    }
    Ok(())
}

/// The rows of records that do not decode: `name` (the key's last part), `key`, `invalid`.
fn invalid_rows(prefix: &str, field: &str, invalid: &[Invalid]) -> Vec<serde_json::Value> {
    invalid
        .iter()
        .map(|i| json!({ field: i.key.strip_prefix(prefix).unwrap_or(&i.key), "key": i.key, "invalid": i.error }))
        .collect()
}

fn print_invalid(rows: &[serde_json::Value], field: &str, width: usize) {
    for r in rows {
        println!(
            "{:<width$} INVALID  {}: {}",
            r[field].as_str().unwrap_or(""),
            r["key"].as_str().unwrap_or(""),
            r["invalid"].as_str().unwrap_or("")
        );
    }
}

async fn machines(store: &Store, json: bool) -> Result<()> {
    let (ms, invalid) = registry::machine_records(&store.client, &store.keys).await?;
    let invalid = invalid_rows(&store.keys.machines(), "id", &invalid);
    let placed = store::by_machine(&store.placement().await?);
    let units = store.units().await?;
    let used = |id: &str| -> Capacity {
        placed
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|u| units.get(u))
            .fold(Capacity::default(), |a, (r, _)| {
                a.plus(scheduler::requests(&r.spec))
            })
    };
    let leader = registry::leader(&store.client, &store.keys).await?;
    if json {
        let v: Vec<_> = ms
            .iter()
            .map(|m| {
                let mut v = serde_json::to_value(m).unwrap_or_default();
                v["units"] = json!(placed.get(&m.id).cloned().unwrap_or_default());
                v["leader"] = json!(leader.as_deref() == Some(m.id.as_str()));
                let u = used(&m.id);
                v["memory_used_bytes"] = json!(u.memory_bytes);
                v["cpus_used"] = json!(u.millicpus as f64 / 1000.0);
                v
            })
            .chain(invalid)
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<34} {:<15} {:<8} {:<4} {:<20} {:<6} {:<15} {:<11} LAST-SEEN",
        "MACHINE", "ADDRESS", "VERSION", "SLOT", "LABELS", "UNITS", "MEMORY", "CPUS"
    );
    let now = registry::now_s();
    for m in &ms {
        let labels: Vec<String> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let star = if leader.as_deref() == Some(m.id.as_str()) {
            "*"
        } else {
            ""
        };
        let u = used(&m.id);
        println!(
            "{:<34} {:<15} {:<8} {:<4} {:<20} {:<6} {:<15} {:<11} {}s ago",
            format!("{}{star}", m.id),
            m.address,
            m.version.as_deref().unwrap_or("-"),
            m.slot.as_deref().unwrap_or("-"),
            if labels.is_empty() {
                "-".to_string()
            } else {
                labels.join(",")
            },
            placed.get(&m.id).map_or(0, |u| u.len()),
            format!(
                "{}/{}",
                size(u.memory_bytes),
                m.memory_bytes.map_or("-".into(), size)
            ),
            format!(
                "{}/{}",
                u.millicpus as f64 / 1000.0,
                m.cpus.map_or("-".into(), |c| c.to_string())
            ),
            now.saturating_sub(m.last_seen),
        );
    }
    print_invalid(&invalid, "id", 34);
    Ok(())
}

async fn units(store: &Store, json: bool) -> Result<()> {
    let (units, bad_units) = store.unit_records().await?;
    let (placement, bad_assigns) = store.placement_records().await?;
    let (statuses, bad_statuses) = store.status_records().await?;
    let pins = store.pins().await?;
    let live: std::collections::BTreeSet<String> = registry::machines(&store.client, &store.keys)
        .await?
        .into_iter()
        .map(|m| m.id)
        .collect();
    // Assignments and statuses that do not decode are listed too, by their whole key.
    let invalid: Vec<_> = invalid_rows(&store.keys.units(), "name", &bad_units)
        .into_iter()
        .chain(invalid_rows(&store.keys.prefix, "name", &bad_assigns))
        .chain(invalid_rows(&store.keys.prefix, "name", &bad_statuses))
        .collect();
    let rows: Vec<_> = units
        .values()
        .map(|(rec, _)| {
            let on = placement.get(&rec.spec.name).cloned().unwrap_or_default();
            let actual: serde_json::Map<String, serde_json::Value> = statuses
                .iter()
                .filter(|((_, u), _)| u == &rec.spec.name)
                .map(|((m, _), s)| (m.clone(), serde_json::to_value(s).unwrap_or_default()))
                .collect();
            let running = rec.target == Target::Running;
            let waiting = volumes::waiting_for(&rec.spec, running, pins.get(&rec.spec.name), &on);
            json!({ "name": rec.spec.name, "target": rec.target, "replicas": rec.spec.replicas,
                    "machines": on, "actual": actual, "spec": rec.spec,
                    "volumes_on": pins.get(&rec.spec.name), "waiting_for": waiting })
        })
        .collect();
    if json {
        let rows: Vec<_> = rows.into_iter().chain(invalid).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("{:<24} {:<8} {:<10} ACTUAL", "UNIT", "TARGET", "REPLICAS");
    for r in &rows {
        let actual: Vec<String> = r["actual"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(m, s)| format!("{m}:{}", s["state"].as_str().unwrap_or("?")))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<24} {:<8} {:<10} {}",
            r["name"].as_str().unwrap_or(""),
            r["target"].as_str().unwrap_or(""),
            r["replicas"].to_string(),
            if actual.is_empty() {
                "-".to_string()
            } else {
                actual.join(" ")
            }
        );
        for line in volumes::notes(&r["volumes_on"], &r["waiting_for"], &live) {
            println!("{:<24} {line}", "");
        }
        // Why an instance is not healthy, or failed, or its templates do not render: under its row.
        for (m, s) in r["actual"].as_object().into_iter().flatten() {
            for key in ["health_error", "error"] {
                if let Some(why) = s[key].as_str() {
                    println!("{:<24} {m}: {why}", "");
                }
            }
        }
    }
    print_invalid(&invalid, "name", 24);
    Ok(())
}

async fn destroy(store: &Store, unit: &str, with_volumes: bool) -> Result<()> {
    if !with_volumes {
        store.destroy(unit).await?;
        return Ok(());
    }
    match store.destroy_with_volumes(unit).await? {
        volumes::Destroyed::Unit => {
            println!("destroyed {unit}; each machine deletes its volumes when it next ticks")
        }
        volumes::Destroyed::VolumesOnly => println!(
            "no unit {unit}: the volumes it left on any machine are deleted when it next ticks"
        ),
    }
    Ok(())
}

async fn logs(store: &Store, unit: &str, machine: Option<&str>) -> Result<()> {
    let r = store.client.range(&store.keys.all_logs(), true).await?;
    let prefix = store.keys.all_logs();
    let mut found = false;
    for kv in r.kvs {
        let Some((m, u)) = kv.key[prefix.len()..].split_once('/') else {
            continue;
        };
        if u != unit || machine.is_some_and(|want| want != m) {
            continue;
        }
        found = true;
        for line in kv.value_str().lines() {
            println!("{m}| {line}");
        }
    }
    if !found {
        bail!(
            "no output of unit {unit:?} has been reported{}",
            machine.map(|m| format!(" by {m}")).unwrap_or_default()
        );
    }
    Ok(())
}

/// Bytes in the largest unit of 1024 that keeps one decimal: `512M`, `1.5G`.
fn size(bytes: u64) -> String {
    let mut v = bytes as f64;
    for unit in ["", "K", "M", "G"] {
        if v < 1024.0 {
            return format!("{}{unit}", (v * 10.0).round() / 10.0);
        }
        v /= 1024.0;
    }
    format!("{}T", (v * 10.0).round() / 10.0)
}

#[cfg(test)]
mod tests {
    use super::size;

    #[test]
    fn sizes_read_well() {
        assert_eq!(size(0), "0");
        assert_eq!(size(512 << 20), "512M");
        assert_eq!(size(3 << 29), "1.5G");
        assert_eq!(size(2_062_585_856), "1.9G");
        assert_eq!(size(5 << 40), "5T");
    }
}
