//! The `caisson-fleet` binary against a test etcd (the fleet's CLI tests; included by path).

#![allow(dead_code, clippy::unwrap_used)]

/// `caisson-fleet ARGS` against the etcd at `endpoint` (plain HTTP, no machine config):
/// (success, stdout, stderr).
pub fn fleet(endpoint: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_caisson-fleet"))
        .args([
            "--etcd",
            endpoint,
            "--insecure",
            "--config",
            "/nonexistent/fleet.toml",
        ])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
