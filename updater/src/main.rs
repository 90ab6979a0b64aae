//! `caisson-update`: status, check, apply, rollback and the update agent on a Caisson machine.

use anyhow::{Context, Result};
use caisson_update::agent::{self, AgentOptions, Round};
use caisson_update::apply::Progress;
use caisson_update::config::Config;
use caisson_update::machine::Machine;
use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "caisson-update",
    version,
    about = "Signed A/B updates of a Caisson machine"
)]
struct Cli {
    /// The configuration file.
    #[arg(long, global = true, default_value = caisson_update::config::CONFIG_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Version and state of both slots, the booted entry, the next boot, the last result.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Is there a newer version for this machine, and when may it start (waves)?
    Check {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Download, verify and write the update into the inactive slot; it boots next.
    Apply {
        /// Ignore this machine's wave.
        #[arg(long)]
        now: bool,
        /// Reboot afterwards, as the configured strategy allows.
        #[arg(long)]
        reboot: bool,
        /// A bundle file instead of the channel (no network).
        #[arg(long, requires = "manifest")]
        file: Option<PathBuf>,
        /// The bundle's manifest (its signature `<manifest>.minisig` beside it).
        #[arg(long, requires = "file")]
        manifest: Option<PathBuf>,
    },
    /// Boot the other slot next (the running version is given up).
    Rollback {
        /// Reboot now.
        #[arg(long)]
        reboot: bool,
    },
    /// Check on an interval with jitter, apply when the wave has come, reboot per strategy.
    Agent {
        /// Ignore waves.
        #[arg(long)]
        now: bool,
        /// One round, then exit.
        #[arg(long)]
        once: bool,
        /// Override the configuration's interval, in seconds.
        #[arg(long)]
        interval: Option<u64>,
    },
}

/// A progress bar on a terminal, a log line every 10% otherwise; each log line says how long
/// after the command's start it came (`+N ms`).
struct Bar {
    bar: Option<indicatif::ProgressBar>,
    last: u64,
    started: std::time::Instant,
}

impl Bar {
    fn new() -> Bar {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b
        });
        Bar {
            bar,
            last: 0,
            started: std::time::Instant::now(),
        }
    }

    fn ms(&self) -> u128 {
        self.started.elapsed().as_millis()
    }
}

impl Progress for Bar {
    fn root(&mut self, done: u64, total: u64) {
        match &self.bar {
            Some(b) => {
                b.set_length(total);
                b.set_position(done);
            }
            None => {
                let pct = done * 100 / total.max(1);
                if pct >= self.last + 10 || done == total {
                    self.last = pct;
                    log::info!(
                        "root payload: {pct}% ({done} of {total} bytes) (+{} ms)",
                        self.ms()
                    );
                }
            }
        }
    }
    fn step(&mut self, what: &str) {
        match &self.bar {
            Some(b) => b.set_message(what.to_string()),
            None => log::info!("{what} (+{} ms)", self.ms()),
        }
    }
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp(None)
        .init();
    let cli = Cli::parse();
    let config = Config::load(&cli.config)?;
    let run = agent::RunPaths::default();
    let machine = Machine::detect().context("finding this machine's slots")?;
    match cli.command {
        Command::Status { json } => {
            machine.reconcile()?;
            let s = machine.status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", s.text());
            }
        }
        Command::Check { json } => {
            machine.reconcile()?;
            let url = config
                .channel_url
                .as_deref()
                .with_context(|| format!("no channel_url in {}", cli.config.display()))?;
            let offer = machine.check(url)?;
            if json {
                let v = offer.as_ref().map(|o| {
                    serde_json::json!({"version": o.manifest.version, "bundle": o.bundle_url,
                        "wave_start": o.wave_start, "key": o.keyid})
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                match offer {
                    None => println!("up to date: {}", machine.booted.version),
                    Some(o) => {
                        let now = caisson_update::record::now();
                        let when = if o.wave_start <= now {
                            "now".to_string()
                        } else {
                            format!("in {} s (this machine's wave)", o.wave_start - now)
                        };
                        println!(
                            "{} available (signed by {}); may start {when}",
                            o.manifest.version, o.keyid
                        );
                    }
                }
            }
        }
        Command::Apply {
            now,
            reboot,
            file,
            manifest,
        } => {
            machine.reconcile()?;
            let mut bar = Bar::new();
            if let (Some(file), Some(manifest)) = (file, manifest) {
                let version = machine.local_manifest(&manifest)?.version;
                machine.apply_file(&file, &manifest, &mut bar)?;
                println!("applied; the next boot runs the new version");
                if reboot {
                    let mut lock = agent::lock_for(&config, &machine.machine_id)?;
                    agent::reboot_when_allowed_for(&config, lock.as_mut(), &run, &version)?;
                }
            } else {
                let opts = AgentOptions { now, reboot };
                match agent::round(&machine, &config, opts, &mut bar, &run)? {
                    Round::UpToDate => println!("up to date: {}", machine.booted.version),
                    Round::NoChannel => {
                        return Err(caisson_update::Error::NoChannel(
                            cli.config.display().to_string(),
                        )
                        .into())
                    }
                    Round::AwaitingReboot { version } => println!(
                        "{version} is already written to the other slot; reboot to run it"
                    ),
                    Round::NotBlessed => anyhow::bail!(
                        "the running version is not blessed yet; try again once it is healthy"
                    ),
                    Round::Waiting { version, starts_at } => println!(
                        "{version} is available; this machine's wave starts at {starts_at} (use --now)"
                    ),
                    Round::Applied { version, rebooting } => println!(
                        "{version} applied{}",
                        if rebooting { "; rebooting" } else { "; reboot to run it" }
                    ),
                }
            }
        }
        Command::Rollback { reboot } => {
            let to = machine.rollback()?;
            println!("the next boot runs {to}");
            if reboot {
                caisson_update::reboot::request_reboot(&run.control_socket)?;
            }
        }
        Command::Agent {
            now,
            once,
            interval,
        } => {
            let mut config = config;
            if let Some(i) = interval {
                config.interval_s = i;
            }
            let opts = AgentOptions { now, reboot: true };
            let mut n = 0;
            let mut retry = agent::NOT_BLESSED_RECHECK;
            loop {
                let mut bar = Bar::new();
                let round = agent::round(&machine, &config, opts, &mut bar, &run);
                match &round {
                    Ok(Round::NoChannel) if n == 0 => log::info!(
                        "agent: no channel_url in {}: recording boot results only (updates by `apply --file`)",
                        cli.config.display()
                    ),
                    Ok(Round::NoChannel) => {}
                    Ok(Round::NotBlessed) if n > 0 => {}
                    Ok(r) => log::info!("agent: {r:?}"),
                    Err(e) => log::error!("agent: {e}"),
                }
                if once {
                    break;
                }
                if let Ok(Round::Applied {
                    rebooting: true, ..
                }) = round
                {
                    // The init is shutting down: no more rounds until the new version runs.
                    log::info!("agent: waiting for the reboot");
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(3600));
                    }
                }
                n += 1;
                // Until this boot has settled, look again soon: the result of an update
                // (success, or the fallback) is recorded right after, and only then does the
                // fleet agent give back its slot of the reboot lock (etcd-lock). A round that
                // failed before it could say so retries with a growing delay, up to the interval.
                let settled = run.boot_settled.exists();
                let sleep = match round {
                    Ok(Round::NotBlessed) => agent::NOT_BLESSED_RECHECK,
                    Err(_) if !settled => {
                        let s = retry;
                        let most = std::time::Duration::from_secs(config.interval_s)
                            .max(agent::NOT_BLESSED_RECHECK);
                        retry = (retry * 2).min(most);
                        s
                    }
                    _ => agent::next_sleep(&config, &machine.machine_id, n),
                };
                if settled {
                    retry = agent::NOT_BLESSED_RECHECK;
                }
                std::thread::sleep(sleep);
            }
        }
    }
    Ok(())
}
