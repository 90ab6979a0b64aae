//! Stage 2's network: the first Ethernet interface up, then DHCP (the default) or the static
//! address of `/etc/caisson/network.toml`, the default route and `resolv.conf`. It runs on its
//! own thread so it never holds up "ready"; services that need it put `network` in `after`,
//! which is settled once the interface is configured or `timeout_s` has passed. See NETWORK.md.

mod config;
mod iface;

pub use config::{parse_cidr, NetworkConfig};
pub use iface::{ethernet_interfaces, mac_address};

use crate::dhcp::{self, DhcpError, Lease, Transport};
use crate::netdev::{self, NetdevError};
/// How the interface gets its address, and what `caisson-ctl status` shows of the network: part
/// of the control protocol, so they live in `caisson_layout::control`.
pub use caisson_layout::control::{NetStatus, NetworkMode as Mode};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The network settings file.
pub const CONFIG_PATH: &str = "/etc/caisson/network.toml";
/// The resolver configuration the init writes; `/etc/resolv.conf` links to it.
pub const RESOLV_PATH: &str = "/run/caisson/resolv.conf";
/// The pseudo-service name services put in `after` to wait for the network.
pub const PSEUDO_SERVICE: &str = "network";

/// Why the network could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("no Ethernet interface in {0}")]
    NoInterface(PathBuf),
    #[error("reading the MAC address of {interface} from {path}: {message}")]
    Mac {
        interface: String,
        path: PathBuf,
        message: String,
    },
    #[error(transparent)]
    Netdev(#[from] NetdevError),
    #[error("DHCP on {interface}: {source}")]
    Dhcp {
        interface: String,
        #[source]
        source: DhcpError,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The text of resolv.conf.
pub fn resolv_conf(dns: &[Ipv4Addr], search: &[String]) -> String {
    let mut out = String::from("# written by caisson-init; see /etc/caisson/network.toml\n");
    if !search.is_empty() {
        out += &format!("search {}\n", search.join(" "));
    }
    for d in dns {
        out += &format!("nameserver {d}\n");
    }
    out
}

/// Writes `<root>/run/caisson/resolv.conf` and points `<root>/etc/resolv.conf` at it, unless
/// /etc/resolv.conf is a regular file (a provisioned one wins).
pub fn write_resolv(root: &Path, text: &str) -> Result<(), NetworkError> {
    let target = root.join(RESOLV_PATH.trim_start_matches('/'));
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| NetworkError::Write { path, source }
    };
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).map_err(werr(dir))?;
    }
    let tmp = target.with_extension("conf.tmp");
    std::fs::write(&tmp, text).map_err(werr(&tmp))?;
    std::fs::rename(&tmp, &target).map_err(werr(&target))?;
    let etc = root.join("etc/resolv.conf");
    match std::fs::symlink_metadata(&etc) {
        Ok(m) if m.file_type().is_file() => {
            log::info!("/etc/resolv.conf is a file; leaving it as it is");
            return Ok(());
        }
        Ok(m) if m.file_type().is_symlink() => {
            if std::fs::read_link(&etc).is_ok_and(|l| l == Path::new(RESOLV_PATH)) {
                return Ok(());
            }
            std::fs::remove_file(&etc).map_err(werr(&etc))?;
        }
        _ => {}
    }
    std::os::unix::fs::symlink(RESOLV_PATH, &etc).map_err(werr(&etc))
}

/// A DHCP transport over a UDP socket bound to the interface.
struct Udp(UdpSocket);

impl Transport for Udp {
    fn send(&mut self, msg: &[u8]) -> Result<(), DhcpError> {
        self.0
            .send_to(msg, SocketAddrV4::new(Ipv4Addr::BROADCAST, 67))
            .map(|_| ())
            .map_err(|e| DhcpError::Io(format!("sending to 255.255.255.255:67: {e}")))
    }

    fn recv(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>, DhcpError> {
        let timeout = timeout.max(Duration::from_millis(1));
        self.0
            .set_read_timeout(Some(timeout))
            .map_err(|e| DhcpError::Io(e.to_string()))?;
        let mut buf = vec![0u8; 1500];
        match self.0.recv_from(&mut buf) {
            Ok((n, _)) => {
                buf.truncate(n);
                Ok(Some(buf))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(DhcpError::Io(format!("receiving on port 68: {e}"))),
        }
    }
}

/// Shared with the control channel.
pub type Shared = Arc<Mutex<NetStatus>>;

fn set_status(shared: &Shared, f: impl FnOnce(&mut NetStatus)) {
    if let Ok(mut s) = shared.lock() {
        f(&mut s);
    }
}

/// Starts the network thread. `settled` is called once: when the interface is configured, when
/// there is nothing to configure, or after the configured timeout.
/// The thread first waits for the early modules (the network drivers).
pub fn start(shared: Shared, modules: crate::modules::Loading, settled: Box<dyn Fn() + Send>) {
    let root = PathBuf::from("/");
    let spawned = std::thread::Builder::new()
        .name("network".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            modules.wait(crate::modules::List::Early);
            run(&root, &shared, settled)
        });
    if let Err(e) = spawned {
        log::error!("no network thread: {e}");
    }
}

struct Once(Option<Box<dyn Fn() + Send>>);

impl Once {
    fn fire(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

fn run(root: &Path, shared: &Shared, settled: Box<dyn Fn() + Send>) {
    let mut settled = Once(Some(settled));
    let config = match NetworkConfig::load(&root.join(CONFIG_PATH.trim_start_matches('/'))) {
        Ok(c) => c,
        Err(e) => {
            log::error!("network: {e}; using DHCP");
            NetworkConfig::default()
        }
    };
    let claimed = configure_links(root, &config, shared);
    if config.mode == Mode::Off {
        set_status(shared, |s| s.state = "off".into());
        settled.fire();
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(config.timeout_s);
    let iface = match wait_interface(root, &config, &claimed, Duration::from_secs(5)) {
        Ok(i) => i,
        Err(e) => {
            log::warn!("network: {e}");
            set_status(shared, |s| {
                s.state = "failed".into();
                s.error = Some(e.to_string());
            });
            settled.fire();
            return;
        }
    };
    set_status(shared, |s| {
        s.state = "configuring".into();
        s.interface = Some(iface.clone());
        s.mode = Some(config.mode);
    });
    let result = match config.mode {
        Mode::Static => configure_static(root, &iface, &config, shared),
        _ => dhcp_loop(root, &iface, &config, shared, deadline, &mut settled),
    };
    if let Err(e) = result {
        log::error!("network: {e}");
        set_status(shared, |s| {
            s.state = "failed".into();
            s.error = Some(e.to_string());
        });
    }
    settled.fire();
}

/// Waits (up to 5 s for all of them) for the interfaces `links` names and gives each its
/// address. Returns the names of the ones found, which the main interface may not be; a link
/// that fails is logged and shown in the status, and the rest go on.
fn configure_links(root: &Path, config: &NetworkConfig, shared: &Shared) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut claimed = Vec::new();
    for link in &config.links {
        let (Some(sel), Some((addr, prefix))) = (link.select(), parse_cidr(&link.address)) else {
            continue;
        };
        let found = loop {
            match iface::find(root, &sel) {
                Some(name) => break Some(name),
                None if Instant::now() >= deadline => break None,
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let result = match &found {
            None => Err(format!("link {}: {sel} is not there", link.address)),
            Some(name) => netdev::link_up(name)
                .and_then(|()| netdev::set_address(name, addr, prefix))
                .map_err(|e| format!("link {name}: {e}")),
        };
        match result {
            Ok(()) => {
                let name = found.unwrap_or_default();
                log::info!("network: {name} {addr}/{prefix} (link)");
                set_status(shared, |s| s.links.push(format!("{name} {addr}/{prefix}")));
                claimed.push(name);
            }
            Err(e) => {
                log::error!("network: {e}");
                claimed.extend(found);
                set_status(shared, |s| s.error = Some(e));
            }
        }
    }
    claimed
}

/// The main interface: the one the file names, or the first Ethernet interface (by name, not
/// one of the links) whose link comes up within a second of being set up, else the first.
fn wait_interface(
    root: &Path,
    config: &NetworkConfig,
    claimed: &[String],
    timeout: Duration,
) -> Result<String, NetworkError> {
    let start = Instant::now();
    loop {
        if let Some(sel) = config.main_interface() {
            if let Some(name) = iface::find(root, &sel) {
                return Ok(name);
            }
        } else {
            let candidates: Vec<String> = ethernet_interfaces(root)
                .into_iter()
                .filter(|n| !claimed.contains(n))
                .collect();
            if !candidates.is_empty() {
                // Carrier only shows on a link that is up.
                for c in &candidates {
                    if let Err(e) = netdev::link_up(c) {
                        log::warn!("network: {e}");
                    }
                }
                let settle = Instant::now() + Duration::from_secs(1);
                while Instant::now() < settle
                    && !candidates.iter().any(|c| netdev::carrier(root, c))
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if let Some(name) = iface::pick(root, &candidates) {
                    return Ok(name);
                }
            }
        }
        if start.elapsed() >= timeout {
            return Err(NetworkError::NoInterface(root.join("sys/class/net")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn configure_static(
    root: &Path,
    iface: &str,
    config: &NetworkConfig,
    shared: &Shared,
) -> Result<(), NetworkError> {
    let (addr, prefix) = config
        .address
        .as_deref()
        .and_then(parse_cidr)
        .ok_or_else(|| NetworkError::Config {
            path: PathBuf::from(CONFIG_PATH),
            message: "static mode without a valid address".into(),
        })?;
    netdev::link_up(iface)?;
    netdev::set_address(iface, addr, prefix)?;
    if let Some(gw) = config.gateway {
        netdev::add_default_route(iface, gw)?;
    }
    write_resolv(root, &resolv_conf(&config.dns, &config.search))?;
    log::info!(
        "network: {iface} {addr}/{prefix} (static){}",
        config
            .gateway
            .map(|g| format!(" via {g}"))
            .unwrap_or_default()
    );
    set_status(shared, |s| {
        s.state = "up".into();
        s.address = Some(format!("{addr}/{prefix}"));
        s.gateway = config.gateway.map(|g| g.to_string());
        s.dns = config.dns.iter().map(|d| d.to_string()).collect();
    });
    Ok(())
}

fn xid(mac: &[u8; 6]) -> u32 {
    let mut b = [0u8; 4];
    if rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::NONBLOCK).is_err() {
        b.copy_from_slice(&mac[2..]);
        b[0] ^= crate::sys::boot_ms() as u8;
    }
    u32::from_ne_bytes(b)
}

fn apply_lease(
    root: &Path,
    iface: &str,
    lease: &Lease,
    config: &NetworkConfig,
    shared: &Shared,
) -> Result<(), NetworkError> {
    netdev::set_address(iface, lease.address, lease.prefix)?;
    if let Some(gw) = lease.gateway {
        netdev::add_default_route(iface, gw)?;
    }
    let dns = if config.dns.is_empty() {
        &lease.dns
    } else {
        &config.dns
    };
    let mut search = config.search.clone();
    if search.is_empty() {
        search.extend(lease.domain.clone().filter(|d| !d.is_empty()));
    }
    write_resolv(root, &resolv_conf(dns, &search))?;
    set_status(shared, |s| {
        s.state = "up".into();
        s.error = None;
        s.address = Some(format!("{}/{}", lease.address, lease.prefix));
        s.gateway = lease.gateway.map(|g| g.to_string());
        s.dns = dns.iter().map(|d| d.to_string()).collect();
    });
    Ok(())
}

/// Acquire, apply, renew at T1; start over when a renewal fails past the lease's end.
fn dhcp_loop(
    root: &Path,
    iface: &str,
    config: &NetworkConfig,
    shared: &Shared,
    deadline: Instant,
    settled: &mut Once,
) -> Result<(), NetworkError> {
    netdev::link_up(iface)?;
    let mac = mac_address(root, iface)?;
    let hostname = std::fs::read_to_string(root.join("etc/hostname"))
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty());
    let mut udp = Udp(netdev::dhcp_socket(iface, 68)?);
    let dhcp_err = |source| NetworkError::Dhcp {
        interface: iface.to_string(),
        source,
    };
    let mut lease: Option<(Lease, Instant)> = None;
    loop {
        let first = lease.is_none() && Instant::now() < deadline;
        let client = dhcp::Client {
            mac,
            hostname: hostname.clone(),
            retry: Duration::from_secs(1),
            timeout: if first {
                deadline.saturating_duration_since(Instant::now())
            } else {
                Duration::from_secs(30)
            },
        };
        let result = match &lease {
            Some((l, got)) if got.elapsed() < l.lease => client.renew(&mut udp, xid(&mac), l),
            _ => client.acquire(&mut udp, xid(&mac)),
        };
        match result {
            Ok(l) => {
                let fresh = lease
                    .as_ref()
                    .is_none_or(|(old, _)| old.address != l.address);
                apply_lease(root, iface, &l, config, shared)?;
                if fresh {
                    log::info!(
                        "network: {iface} {}/{} via {} dns {} (DHCP from {}, lease {} s)",
                        l.address,
                        l.prefix,
                        l.gateway.map_or_else(|| "-".into(), |g| g.to_string()),
                        l.dns
                            .iter()
                            .map(|d| d.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                        l.server,
                        l.lease.as_secs()
                    );
                }
                settled.fire();
                let renew = l.renew;
                lease = Some((l, Instant::now()));
                std::thread::sleep(renew);
            }
            Err(e) => {
                let e = dhcp_err(e);
                if lease.is_none() {
                    log::warn!("network: {e}; still trying");
                    set_status(shared, |s| s.error = Some(e.to_string()));
                    settled.fire();
                } else {
                    log::warn!("network: renewing: {e}");
                }
                if matches!(&lease, Some((l, got)) if got.elapsed() >= l.lease) {
                    lease = None;
                }
                std::thread::sleep(Duration::from_secs(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_is_linked_unless_provisioned() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        let text = resolv_conf(&[Ipv4Addr::new(10, 0, 2, 3)], &["lab".into()]);
        assert!(
            text.ends_with("search lab\nnameserver 10.0.2.3\n"),
            "{text}"
        );
        write_resolv(r, &text).unwrap();
        assert_eq!(
            std::fs::read_link(r.join("etc/resolv.conf")).unwrap(),
            Path::new(RESOLV_PATH)
        );
        assert_eq!(
            std::fs::read_to_string(r.join("run/caisson/resolv.conf")).unwrap(),
            text
        );
        // Again: idempotent. A provisioned file stays.
        write_resolv(r, &text).unwrap();
        std::fs::remove_file(r.join("etc/resolv.conf")).unwrap();
        std::fs::write(r.join("etc/resolv.conf"), "nameserver 1.1.1.1\n").unwrap();
        write_resolv(r, &text).unwrap();
        assert_eq!(
            std::fs::read_to_string(r.join("etc/resolv.conf")).unwrap(),
            "nameserver 1.1.1.1\n"
        );
    }
}
