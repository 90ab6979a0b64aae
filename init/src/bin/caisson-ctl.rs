//! caisson-ctl: talk to the init over its control socket.

use anyhow::{bail, Context, Result};
use caisson_layout::control::{Client, Request, Response, ANSWER_TIMEOUT, EXEC_TIMEOUT_DEFAULT_S};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    version,
    about = "Control Caisson's init: services, logs, reboot and power off"
)]
struct Cli {
    /// The init's control socket.
    #[arg(long, default_value = caisson_layout::paths::CONTROL_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the machine's version, slot, readiness and every service.
    Status {
        /// Print JSON for tools.
        #[arg(long)]
        json: bool,
    },
    /// Print a service's log.
    Logs {
        /// The service.
        service: String,
        /// Keep printing new lines as they come.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(short = 'n', long)]
        lines: Option<usize>,
    },
    /// Start a stopped or failed service.
    Start {
        /// The service.
        service: String,
    },
    /// Stop a service (it stays stopped until started).
    Stop {
        /// The service.
        service: String,
    },
    /// Stop a service and start it again.
    Restart {
        /// The service.
        service: String,
    },
    /// Stop every service and reboot.
    Reboot,
    /// Stop every service and power off.
    Poweroff,
    /// Run a command as root under the init (the host uses this through the virtio port) and
    /// exit with its code; its stdout and stderr come back together.
    Exec {
        /// Seconds before its process group is killed.
        #[arg(long, default_value_t = EXEC_TIMEOUT_DEFAULT_S)]
        timeout: u64,
        /// The program and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        argv: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut client = Client::connect(&cli.socket)?;
    let req = match cli.command {
        Command::Status { json } => return status(&mut client, json),
        Command::Logs {
            service,
            follow,
            lines,
        } => {
            return logs(
                &mut client,
                Request::Logs {
                    service,
                    follow,
                    lines,
                },
            )
        }
        Command::Start { service } => Request::Start { service },
        Command::Stop { service } => Request::Stop { service },
        Command::Restart { service } => Request::Restart { service },
        Command::Reboot => Request::Reboot,
        Command::Poweroff => Request::Poweroff,
        Command::Exec { timeout, argv } => {
            let req = Request::Exec {
                argv,
                timeout_s: Some(timeout),
            };
            return exec(&mut client, &req);
        }
    };
    check(client.call(&req)?)?;
    Ok(())
}

fn exec(client: &mut Client, req: &Request) -> Result<()> {
    let r = check(client.call(req)?)?;
    let Some(e) = r.exec else {
        bail!("the init answered an exec without its result");
    };
    print!("{}", e.output);
    if e.truncated {
        eprintln!("caisson-ctl: the output was cut at 1 MiB");
    }
    if e.timed_out {
        bail!("killed after its timeout");
    }
    match (e.code, e.signal) {
        (Some(0), _) => Ok(()),
        (Some(c), _) => std::process::exit(c),
        (None, Some(s)) => bail!("killed by signal {s}"),
        (None, None) => bail!("ended without an exit status"),
    }
}

fn check(r: Response) -> Result<Response> {
    if !r.ok {
        bail!("{}", r.error.unwrap_or_else(|| "the init refused".into()));
    }
    Ok(r)
}

fn status(client: &mut Client, json: bool) -> Result<()> {
    let r = check(client.call(&Request::Status)?)?;
    let st = r.status.context("the init sent no status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    println!(
        "version {}  slot {}  {}",
        st.version,
        st.slot,
        if st.shutting_down {
            "shutting down"
        } else if st.ready {
            "ready"
        } else {
            "starting"
        }
    );
    if let Some(n) = &st.network {
        println!(
            "network {} {} {}{}",
            n.state,
            n.interface.as_deref().unwrap_or("-"),
            n.address.as_deref().unwrap_or("-"),
            n.gateway
                .as_deref()
                .map(|g| format!(" via {g}"))
                .unwrap_or_default()
        );
    }
    if let Some(why) = &st.degraded {
        println!("DEGRADED: {why}");
    }
    if let Some(kib) = st.init_rss_kib {
        println!("init memory {kib} KiB");
    }
    println!(
        "{:<24} {:<11} {:>7} {:>8}  LAST EXIT / ERROR",
        "SERVICE", "STATE", "PID", "RESTARTS"
    );
    for s in st.services {
        let pid = s.pid.map_or("-".into(), |p| p.to_string());
        let note = s.error.or(s.last_exit).unwrap_or_default();
        let name = if s.required {
            s.name
        } else {
            format!("{} (optional)", s.name)
        };
        println!(
            "{name:<24} {:<11} {pid:>7} {:>8}  {note}",
            s.state, s.restarts
        );
    }
    Ok(())
}

fn logs(client: &mut Client, req: Request) -> Result<()> {
    client.send(&req)?;
    loop {
        // While following, the init sends a heartbeat (a blank line) when the log is quiet.
        let r = check(client.recv(ANSWER_TIMEOUT)?)?;
        match r.line {
            Some(l) => println!("{l}"),
            None => return Ok(()),
        }
    }
}
