//! `caisson`: build, lock, inspect and run Caisson images.

use anyhow::{Context, Result};
use caisson_builder::{build, inspect, lockfile, run, spec};
use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "caisson",
    version,
    about = "Build, inspect and run Caisson OS images"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build an image from a spec into a GPT disk (raw, qcow2) and an update bundle.
    Build {
        /// The image spec, e.g. images/host.toml.
        spec: PathBuf,
        /// Where the outputs go.
        #[arg(long, default_value = "out")]
        out: PathBuf,
        /// Build this version instead of the spec's.
        #[arg(long)]
        version: Option<String>,
        /// Debian mirror base URL (default: the spec's, else the build host's apt sources).
        #[arg(long)]
        mirror: Option<String>,
        /// Fail instead of resolving when the lock is missing or stale.
        #[arg(long)]
        locked: bool,
        /// Take prebuilt caisson-* binaries from this directory instead of building them.
        #[arg(long)]
        binaries: Option<PathBuf>,
        /// Print the outputs as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resolve the spec's packages and write images/<name>.lock.
    Lock {
        /// The image spec.
        spec: PathBuf,
        /// Debian mirror base URL (default: the spec's, else the build host's apt sources).
        #[arg(long)]
        mirror: Option<String>,
    },
    /// Extract only the spec's root packages into a new directory, as the build does.
    Unpack {
        /// The image spec.
        spec: PathBuf,
        /// The directory to create.
        dest: PathBuf,
        /// Debian mirror base URL (default: the spec's, else the build host's apt sources).
        #[arg(long)]
        mirror: Option<String>,
        /// Fail instead of resolving when the lock is missing or stale.
        #[arg(long)]
        locked: bool,
        /// Print the timings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make a minisign key pair that signs update manifests (caisson.key, caisson.pub).
    Keygen {
        /// The directory to write the keys into.
        #[arg(long, default_value = "keys")]
        out: PathBuf,
    },
    /// Sign a bundle's manifest and add the release to a channel directory.
    Publish {
        /// The bundle, e.g. out/host-1.1.0.bundle.
        bundle: PathBuf,
        /// Its manifest (default: the .manifest.json beside the bundle).
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// The channel directory (served over HTTP as it is).
        #[arg(long)]
        channel_dir: PathBuf,
        /// The secret key made by `caisson keygen`.
        #[arg(long)]
        key: PathBuf,
        /// Spread the release over this window (e.g. 48h): machines start by wave.
        #[arg(long)]
        rollout: Option<String>,
        /// Oldest version that may update to this one.
        #[arg(long)]
        min_version: Option<String>,
        /// Machines refuse the manifest after this long (e.g. 30d).
        #[arg(long)]
        expires: Option<String>,
        /// The channel name (default: the directory's name).
        #[arg(long)]
        channel: Option<String>,
    },
    /// Serve a directory over HTTP with Range requests (for tests and air-gapped sites).
    Serve {
        /// The directory to serve, e.g. www/.
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
    },
    /// Show what is in an image: partitions, slots, boot entries, versions, verity hashes.
    Inspect {
        /// A raw disk image.
        image: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Boot an image under QEMU with UEFI, the console on this terminal (ctrl-a x quits).
    Run {
        /// A raw or qcow2 disk image (never changed: a copy-on-write overlay is used).
        image: PathBuf,
        /// Guest memory, e.g. 1G or 2048M.
        #[arg(long, default_value = "1G")]
        mem: String,
        /// Forward a host loopback port to a guest port, HOST:GUEST (repeatable).
        #[arg(long = "forward")]
        forwards: Vec<String>,
        /// tcg (default, works everywhere) or kvm.
        #[arg(long, default_value = "tcg")]
        accel: String,
        /// Boot headless until the ready line, power off, and exit 0 (or 1 with the console's end).
        #[arg(long)]
        until_ready: bool,
        /// With --until-ready: how long to wait, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// A machine config for first-boot provisioning, passed through fw_cfg (opt/caisson/config).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Work with machine configs (first-boot provisioning, provision/CONFIG.md).
    ProvisionConfig {
        #[command(subcommand)]
        command: ProvisionCommand,
    },
    /// Make a config drive: a small FAT volume labelled CAISSON-CFG holding the machine config.
    ConfigDrive {
        /// The machine config, e.g. machine.toml.
        config: PathBuf,
        /// The drive image to write.
        #[arg(short, long, default_value = "config.img")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum ProvisionCommand {
    /// Validate a machine config; prints what it writes, or the field that is wrong.
    Check {
        /// The machine config, e.g. machine.toml.
        config: PathBuf,
        /// Print what it writes as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp(None)
        .init();
    let cli = Cli::parse();
    let progress = std::io::stderr().is_terminal();
    match cli.command {
        Command::Build {
            spec,
            out,
            version,
            mirror,
            locked,
            binaries,
            json,
        } => {
            let opts = build::BuildOptions {
                spec,
                out_dir: out,
                version,
                mirror,
                locked,
                binaries,
                epoch: build::source_date_epoch()?,
                progress,
            };
            let outputs = build::build(&opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&outputs)?);
            } else {
                build::print_summary(&outputs);
            }
        }
        Command::Lock { spec, mirror } => {
            let spec = spec::load(&spec)?;
            let archive = build::archive(&spec, mirror.as_deref())?;
            let cache = caisson_debian::Cache::from_env()?;
            let lock = lockfile::resolve(&spec, &archive, &cache, progress)?;
            lock.save(&spec.lock_path())?;
            println!(
                "{}: {} root packages, kernel {}, boot loader {}",
                spec.lock_path().display(),
                lock.rootfs.packages.len(),
                lock.kernel
                    .packages
                    .first()
                    .map_or("?", |p| p.version.as_str()),
                lock.boot
                    .packages
                    .first()
                    .map_or("?", |p| p.version.as_str()),
            );
        }
        Command::Unpack {
            spec,
            dest,
            mirror,
            locked,
            json,
        } => {
            let t =
                caisson_builder::unpack::unpack(&spec, &dest, mirror.as_deref(), locked, progress)?;
            if json {
                println!("{}", serde_json::to_string(&t)?);
            } else {
                println!(
                    "{} packages into {}: resolve {:.2} s, fetch {:.2} s, extract {:.2} s",
                    t.packages,
                    dest.display(),
                    t.resolve,
                    t.fetch,
                    t.extract
                );
            }
        }
        Command::Keygen { out } => {
            let (sk, pk, id) = caisson_update::sign::keygen(&out)?;
            println!(
                "key {id}: secret {} (keep it safe), public {} (list it in the spec's [update] public_keys)",
                sk.display(),
                pk.display()
            );
        }
        Command::Publish {
            bundle,
            manifest,
            channel_dir,
            key,
            rollout,
            min_version,
            expires,
            channel,
        } => {
            use caisson_update::channel;
            let manifest = manifest.unwrap_or_else(|| channel::manifest_beside(&bundle));
            let opts = channel::PublishOptions {
                channel,
                min_version,
                rollout_seconds: rollout
                    .as_deref()
                    .map(channel::parse_duration)
                    .transpose()?,
                expires_in: expires
                    .as_deref()
                    .map(channel::parse_duration)
                    .transpose()?,
                now: None,
            };
            let r = channel::publish(&bundle, &manifest, &channel_dir, &key, &opts)
                .with_context(|| format!("publishing {}", bundle.display()))?;
            println!(
                "published {} {} into {}",
                r.image,
                r.version,
                channel_dir.display()
            );
        }
        Command::Serve { dir, listen } => {
            let server = caisson_update::channel::Server::bind(&dir, &listen)?;
            println!("serving {} on http://{}", dir.display(), server.addr());
            server.run();
        }
        Command::Inspect { image, json } => {
            let report = inspect::inspect(&image)
                .with_context(|| format!("inspecting {}", image.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.text());
            }
        }
        Command::Run {
            image,
            mem,
            forwards,
            accel,
            until_ready,
            timeout,
            config,
        } => {
            let args = run::RunArgs {
                mem,
                forwards,
                accel,
                config,
            };
            if until_ready {
                let wait = std::time::Duration::from_secs(timeout);
                let line = run::run_until_ready(&image, &args, wait)?;
                println!("{line}");
            } else {
                let status = run::run(&image, &args)?;
                std::process::exit(status.code().unwrap_or(1));
            }
        }
        Command::ProvisionConfig {
            command: ProvisionCommand::Check { config, json },
        } => {
            let plan = run::check_config(&config)?;
            let paths: Vec<String> = plan.entries.iter().map(|e| format!("{e:?}")).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&paths)?);
            } else {
                println!("{}: valid, writes {} paths", config.display(), paths.len());
                for p in paths {
                    println!("  {p}");
                }
            }
        }
        Command::ConfigDrive { config, out } => {
            run::check_config(&config)?;
            caisson_provision::drive::make(&config, &out)
                .with_context(|| format!("making the config drive {}", out.display()))?;
            println!(
                "{}: config drive (label CAISSON-CFG) with {}",
                out.display(),
                config.display()
            );
        }
    }
    Ok(())
}
