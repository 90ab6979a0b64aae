//! `caisson run`: boot an image under QEMU for a person, the console on the terminal.

use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

/// A bad `caisson run` argument or a QEMU failure.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("--mem {0:?}: expected a size such as 1G or 2048M")]
    Mem(String),
    #[error("--forward {0:?}: expected HOST:GUEST port numbers, e.g. 8080:80")]
    Forward(String),
    #[error("--accel {0:?}: expected tcg or kvm")]
    Accel(String),
    #[error(transparent)]
    Qemu(#[from] caisson_qemu::QemuError),
    #[error("--config {path}: {source}")]
    ConfigRead {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--config {path}: {why}")]
    Config {
        path: std::path::PathBuf,
        why: caisson_provision::ConfigError,
    },
}

/// Parses `1G`, `512M` or a number of MiB into MiB.
pub fn parse_mem(s: &str) -> Result<u64, RunError> {
    let bad = || RunError::Mem(s.to_string());
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('G' | 'g') => (&t[..t.len() - 1], 1024),
        Some('M' | 'm') => (&t[..t.len() - 1], 1),
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(bad());
    }
    n.checked_mul(mult).ok_or_else(bad)
}

/// Parses `HOST:GUEST`.
pub fn parse_forward(s: &str) -> Result<(u16, u16), RunError> {
    let bad = || RunError::Forward(s.to_string());
    let (h, g) = s.split_once(':').ok_or_else(bad)?;
    Ok((h.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?))
}

/// The line the init prints when the machine is ready.
pub const READY_PATTERN: &str = "caisson: ready ";

/// `caisson run` arguments, as given on the command line.
#[derive(Debug, Clone)]
pub struct RunArgs {
    pub mem: String,
    pub forwards: Vec<String>,
    pub accel: String,
    /// A machine config handed to the guest through fw_cfg (provision/CONFIG.md).
    pub config: Option<std::path::PathBuf>,
}

struct Parsed {
    memory_mib: u64,
    forwards: Vec<(u16, u16)>,
    accel: caisson_qemu::Accel,
    fw_cfg: Vec<(String, caisson_qemu::FwCfgValue)>,
}

/// Checks a machine config as `caisson provision-config check` does (without the image).
pub fn check_config(path: &Path) -> Result<caisson_provision::Plan, RunError> {
    let bytes = std::fs::read(path).map_err(|source| RunError::ConfigRead {
        path: path.into(),
        source,
    })?;
    caisson_provision::check(&bytes, None, &caisson_init::provisioning::InitChecks).map_err(|why| {
        RunError::Config {
            path: path.into(),
            why,
        }
    })
}

/// The fw_cfg entry that hands `config` to the guest, once it is checked.
fn config_fw_cfg(
    config: Option<&Path>,
) -> Result<Vec<(String, caisson_qemu::FwCfgValue)>, RunError> {
    let Some(path) = config else {
        return Ok(Vec::new());
    };
    check_config(path)?;
    let abs = std::fs::canonicalize(path).map_err(|source| RunError::ConfigRead {
        path: path.into(),
        source,
    })?;
    Ok(vec![(
        caisson_provision::source::FW_CFG_NAME.to_string(),
        caisson_qemu::FwCfgValue::File(abs),
    )])
}

fn parse(args: &RunArgs) -> Result<Parsed, RunError> {
    let accel = match args.accel.as_str() {
        "tcg" => caisson_qemu::Accel::Tcg,
        "kvm" => caisson_qemu::Accel::Kvm,
        other => return Err(RunError::Accel(other.to_string())),
    };
    Ok(Parsed {
        memory_mib: parse_mem(&args.mem)?,
        forwards: args
            .forwards
            .iter()
            .map(|f| parse_forward(f))
            .collect::<Result<_, _>>()?,
        accel,
        fw_cfg: config_fw_cfg(args.config.as_deref())?,
    })
}

/// Boots `image` with the console on this terminal and returns QEMU's exit status.
pub fn run(image: &Path, args: &RunArgs) -> Result<ExitStatus, RunError> {
    let p = parse(args)?;
    let opts = caisson_qemu::RunOptions {
        memory_mib: p.memory_mib,
        forwards: p.forwards,
        accel: p.accel,
        fw_cfg: p.fw_cfg,
        ..Default::default()
    };
    Ok(caisson_qemu::run_interactive(image, opts)?)
}

/// Boots `image` headless until the ready line, then powers it off. Returns the ready line.
pub fn run_until_ready(
    image: &Path,
    args: &RunArgs,
    timeout: std::time::Duration,
) -> Result<String, RunError> {
    let p = parse(args)?;
    let mut opts = caisson_qemu::VmOptions::new(image);
    opts.memory_mib = p.memory_mib;
    opts.accel = p.accel;
    opts.fw_cfg = p.fw_cfg;
    opts.user_net = Some(caisson_qemu::UserNet {
        forwards: p.forwards,
        restrict: false,
    });
    let mut vm = caisson_qemu::Vm::launch(opts)?;
    let line = vm.wait_for(READY_PATTERN, timeout)?;
    // The init powers off cleanly when asked on its control channel; the ACPI button needs a
    // listener the image does not have. A machine that does not answer is switched off hard.
    let asked = vm
        .control()
        .and_then(|mut c| {
            c.call_within(
                &caisson_layout::control::Request::Poweroff,
                Duration::from_secs(10),
            )
        })
        .is_ok();
    if !asked || vm.wait_exit(Duration::from_secs(60)).is_err() {
        vm.kill()?;
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_arguments_and_names_bad_ones() {
        assert_eq!(parse_mem("2G").unwrap(), 2048);
        assert_eq!(parse_mem("512M").unwrap(), 512);
        assert!(parse_mem("lots").unwrap_err().to_string().contains("lots"));
        assert_eq!(parse_forward("8080:80").unwrap(), (8080, 80));
        assert!(parse_forward("8080").is_err());
        assert!(parse_forward("99999:80").is_err());
    }

    #[test]
    fn provisioned_ssh_services_are_valid_for_the_init() {
        let config = "version = 1\n[ssh]\nauthorized_keys = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKbOu0U8yBdVVMmPV5CNV3ntL0DhUNwkDiV0m0nU1vMo a@b\"]\n";
        let plan = caisson_provision::check(
            config.as_bytes(),
            None,
            &caisson_init::provisioning::InitChecks,
        )
        .unwrap();
        let mut names = Vec::new();
        for e in &plan.entries {
            let (Some(name), caisson_provision::plan::Kind::File(text)) = (
                e.path
                    .strip_prefix("/etc/caisson/services/")
                    .and_then(|n| n.strip_suffix(".toml")),
                &e.kind,
            ) else {
                continue;
            };
            let text = String::from_utf8(text.clone()).unwrap();
            caisson_init::service::ServiceSpec::parse(name, &text)
                .unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
            names.push(name);
        }
        assert_eq!(names, ["ssh-keygen", "sshd-rundir", "sshd"]);
    }
}
