//! First-boot provisioning in stage 2 (provision/CONFIG.md): find the machine config, apply it
//! once before any service file is read, and on every boot set its sysctls and load its modules.
//! A config that fails stops the boot here, before any service, and never echoes contents.

use crate::modules::{List, Loading};
use crate::sys::{Power, Syscall};
use caisson_provision::source::{self, Env};
use caisson_provision::{Checks, Outcome};
use std::path::Path;
use uuid::Uuid;

/// The init's own parsers, so a provisioned file is one the init will take.
pub struct InitChecks;

impl Checks for InitChecks {
    fn service(&self, name: &str, text: &str) -> Result<(), String> {
        crate::service::ServiceSpec::parse(name, text)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    fn network(&self, text: &str) -> Result<(), String> {
        crate::network::NetworkConfig::parse(text).map(|_| ())
    }
}

/// How many times the URL source is tried (a pause between tries) before the boot stops.
const URL_TRIES: u32 = 5;
/// How long one fetch of the URL source may take.
const URL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// True when this boot must look for a machine config (no boot has looked yet), and so needs
/// the drivers of its sources before anything else.
pub fn must_look() -> bool {
    !caisson_provision::looked(Path::new("/"))
}

/// Applies the machine config on the first boot; returns only when the boot may go on.
/// `network` brings the network up and returns once it has settled; it is called only when the
/// config must come from the URL of the kernel command line.
pub fn first_boot(
    sys: &dyn Syscall,
    esp: Option<Uuid>,
    modules: &Loading,
    network: &mut dyn FnMut(),
) {
    let root = Path::new("/");
    match caisson_provision::recorded(root) {
        Some(sha) => log::info!("provisioning: already provisioned (sha256 {sha})"),
        None if caisson_provision::looked(root) => {
            log::info!("provisioning: the first boot found no machine config")
        }
        None => {
            if let Err(why) = find_and_apply(sys, root, esp, network) {
                halt(sys, &why);
            }
        }
    }
    every_boot(sys, root, modules);
}

/// The URL source: the network first, then a few tries (a web server may come up late).
fn fetch(
    cmdline: &str,
    url: &str,
    network: &mut dyn FnMut(),
) -> Result<Option<source::Found>, String> {
    log::info!("provisioning: bringing the network up to fetch {url}");
    network();
    let mut last = String::new();
    for attempt in 1..=URL_TRIES {
        match source::fetch_url(cmdline, URL_TIMEOUT) {
            Ok(found) => return Ok(found),
            Err(e) => {
                last = e.to_string();
                log::warn!("provisioning: try {attempt} of {URL_TRIES}: {last}");
            }
        }
        if attempt < URL_TRIES {
            std::thread::sleep(std::time::Duration::from_secs(2 * u64::from(attempt)));
        }
    }
    Err(format!("source: {last}"))
}

fn find_and_apply(
    sys: &dyn Syscall,
    root: &Path,
    esp: Option<Uuid>,
    network: &mut dyn FnMut(),
) -> Result<(), String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let env = Env {
        root,
        cmdline: &cmdline,
        esp: esp.and_then(|u| crate::blockdev::find_partuuid(root, u)),
    };
    let local = source::discover_local(&env).map_err(|e| format!("source: {e}"))?;
    let found = match local {
        Some(f) => Some(f),
        None => match source::url_source(&cmdline).map_err(|e| format!("source: {e}"))? {
            Some((url, _)) => fetch(&cmdline, &url, network)?,
            None => None,
        },
    };
    let Some(found) = found else {
        log::info!("provisioning: no machine config; later boots do not look again");
        if let Err(e) = caisson_provision::record_nothing(root) {
            log::warn!("provisioning: recording that there was none: {e}");
        }
        return Ok(());
    };
    let from = found.source.to_string();
    match caisson_provision::apply(&found.bytes, root, &InitChecks, &from) {
        Ok(Outcome::Applied { sha256, entries }) => {
            sys.sync();
            log::info!("provisioning: applied {entries} entries from {from} (sha256 {sha256})");
            Ok(())
        }
        Ok(Outcome::AlreadyProvisioned { sha256 }) => {
            log::info!("provisioning: already provisioned (sha256 {sha256})");
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Sysctls and modules of the provisioned config, on every boot.
fn every_boot(sys: &dyn Syscall, root: &Path, modules: &Loading) {
    let names = caisson_provision::boot::module_names(root);
    if names.is_empty() && caisson_provision::boot::sysctls(root).is_empty() {
        return;
    }
    // The sysctls may belong to the spec's modules (net.bridge.*), the modules may need them.
    modules.wait(List::Late);
    for e in caisson_provision::boot::apply_sysctls(root) {
        log::warn!("provisioning: {e}");
    }
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy().into_owned();
    for found in caisson_provision::boot::module_paths(root, &release, &names) {
        match found.map_err(|e| e.to_string()).and_then(|p| {
            sys.load_module(&p)
                .map_err(|e| format!("loading {}: {e}", p.display()))
        }) {
            Ok(()) => {}
            Err(e) => log::warn!("provisioning: {e}"),
        }
    }
}

/// The config failed: say so, start nothing, wait for ctrl-alt-del or a power-off signal.
fn halt(sys: &dyn Syscall, why: &str) -> ! {
    log::info!("provisioning failed: {why}");
    log::info!("no services start; fix the machine config and reboot (ctrl-alt-del)");
    sys.sync();
    loop {
        let power = match crate::sys::wait_signal(&[libc::SIGINT, libc::SIGTERM, libc::SIGPWR]) {
            Ok(libc::SIGINT) => Power::Reboot,
            Ok(_) => Power::PowerOff,
            Err(_) => {
                std::thread::sleep(std::time::Duration::from_secs(1));
                continue;
            }
        };
        sys.sync();
        if let Err(e) = sys.reboot(power) {
            log::error!("reboot(2) failed: {e}");
        }
    }
}
