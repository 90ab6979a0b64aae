//! `caisson run`: boot an image under QEMU for a person, the console on the terminal.

use std::path::Path;
use std::process::ExitStatus;

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

/// Boots `image` with the console on this terminal and returns QEMU's exit status.
pub fn run(
    image: &Path,
    mem: &str,
    forwards: &[String],
    accel: &str,
) -> Result<ExitStatus, RunError> {
    let accel = match accel {
        "tcg" => caisson_qemu::Accel::Tcg,
        "kvm" => caisson_qemu::Accel::Kvm,
        other => return Err(RunError::Accel(other.to_string())),
    };
    let opts = caisson_qemu::RunOptions {
        memory_mib: parse_mem(mem)?,
        forwards: forwards
            .iter()
            .map(|f| parse_forward(f))
            .collect::<Result<_, _>>()?,
        accel,
        ..Default::default()
    };
    Ok(caisson_qemu::run_interactive(image, opts)?)
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
}
