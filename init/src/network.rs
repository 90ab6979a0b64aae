//! Stage 2's network: the first Ethernet interface up, then DHCP (the default) or the static
//! address of `/etc/caisson/network.toml`, the default route and `resolv.conf`. It runs on its
//! own thread so it never holds up "ready"; services that need it put `network` in `after`,
//! which is settled once the interface is configured or `timeout_s` has passed. See NETWORK.md.

use crate::dhcp::{self, DhcpError, Lease, Transport};
use crate::netdev::{self, NetdevError};
/// How the interface gets its address, and what `caisson-ctl status` shows of the network: part
/// of the control protocol, so they live in `caisson_layout::control`.
pub use caisson_layout::control::{NetStatus, NetworkMode as Mode};
use serde::Deserialize;
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

/// `/etc/caisson/network.toml` (every field optional).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// The interface to configure; default: the first Ethernet interface by name.
    pub interface: Option<String>,
    pub mode: Mode,
    /// Static: `a.b.c.d/prefix`.
    pub address: Option<String>,
    /// Static: the default gateway.
    pub gateway: Option<Ipv4Addr>,
    /// Name servers (static; with DHCP they replace the server's list when given).
    pub dns: Vec<Ipv4Addr>,
    /// Search domains for resolv.conf.
    pub search: Vec<String>,
    /// How long services `after = ["network"]` wait for it.
    pub timeout_s: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            interface: None,
            mode: Mode::Dhcp,
            address: None,
            gateway: None,
            dns: Vec::new(),
            search: Vec::new(),
            timeout_s: 30,
        }
    }
}

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

/// An address with its prefix length, `10.0.2.15/24`.
pub fn parse_cidr(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, p) = text.trim().split_once('/')?;
    let prefix: u8 = p.parse().ok()?;
    (prefix <= 32).then_some(())?;
    Some((a.parse().ok()?, prefix))
}

impl NetworkConfig {
    /// Parses and checks the file's text.
    pub fn parse(text: &str) -> Result<NetworkConfig, String> {
        let c: NetworkConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if c.mode == Mode::Static {
            let addr = c
                .address
                .as_deref()
                .ok_or("mode = \"static\" needs `address = \"a.b.c.d/prefix\"`")?;
            parse_cidr(addr).ok_or_else(|| {
                format!("address {addr:?} is not of the form a.b.c.d/prefix (e.g. 192.168.1.10/24)")
            })?;
        }
        Ok(c)
    }

    /// Reads the file: missing means the defaults (DHCP).
    pub fn load(path: &Path) -> Result<NetworkConfig, NetworkError> {
        match std::fs::read_to_string(path) {
            Ok(text) => NetworkConfig::parse(&text).map_err(|message| NetworkError::Config {
                path: path.to_path_buf(),
                message,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(NetworkConfig::default()),
            Err(e) => Err(NetworkError::Config {
                path: path.to_path_buf(),
                message: e.to_string(),
            }),
        }
    }
}

/// Physical Ethernet interfaces under `<root>/sys/class/net`, by name: type 1 (ARPHRD_ETHER)
/// with a `device` link (which bridges, veths and other virtual interfaces lack).
pub fn ethernet_interfaces(root: &Path) -> Vec<String> {
    let dir = root.join("sys/class/net");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    let d = dir.join(n);
                    std::fs::read_to_string(d.join("type")).is_ok_and(|t| t.trim() == "1")
                        && d.join("device").exists()
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The MAC address in `<root>/sys/class/net/<name>/address`.
pub fn mac_address(root: &Path, name: &str) -> Result<[u8; 6], NetworkError> {
    let path = root.join("sys/class/net").join(name).join("address");
    let fail = |message: String| NetworkError::Mac {
        interface: name.to_string(),
        path: path.clone(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| fail(e.to_string()))?;
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()
        .map_err(|e| fail(format!("{:?}: {e}", text.trim())))?;
    bytes
        .try_into()
        .map_err(|_| fail(format!("{:?} is not 6 bytes", text.trim())))
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
    if config.mode == Mode::Off {
        set_status(shared, |s| s.state = "off".into());
        settled.fire();
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(config.timeout_s);
    let iface = match wait_interface(root, &config, Duration::from_secs(5)) {
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

fn wait_interface(
    root: &Path,
    config: &NetworkConfig,
    timeout: Duration,
) -> Result<String, NetworkError> {
    let start = Instant::now();
    loop {
        let found = match &config.interface {
            Some(name) => root
                .join("sys/class/net")
                .join(name)
                .exists()
                .then(|| name.clone()),
            None => ethernet_interfaces(root).into_iter().next(),
        };
        if let Some(f) = found {
            return Ok(f);
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
    fn defaults_to_dhcp() {
        let c = NetworkConfig::parse("").unwrap();
        assert_eq!(c, NetworkConfig::default());
        assert_eq!(c.mode, Mode::Dhcp);
        assert_eq!(c.timeout_s, 30);
    }

    #[test]
    fn static_config() {
        let c = NetworkConfig::parse(
            r#"
interface = "eth1"
mode = "static"
address = "192.168.10.5/24"
gateway = "192.168.10.1"
dns = ["192.168.10.1", "9.9.9.9"]
search = ["lab.example"]
timeout_s = 5
"#,
        )
        .unwrap();
        assert_eq!(c.interface.as_deref(), Some("eth1"));
        assert_eq!(c.mode, Mode::Static);
        assert_eq!(
            parse_cidr(c.address.as_deref().unwrap()),
            Some((Ipv4Addr::new(192, 168, 10, 5), 24))
        );
        assert_eq!(c.gateway, Some(Ipv4Addr::new(192, 168, 10, 1)));
        assert_eq!(c.dns.len(), 2);
    }

    #[test]
    fn config_errors_say_what_is_wrong() {
        let e = NetworkConfig::parse("mode = \"static\"\n").unwrap_err();
        assert!(e.contains("needs `address"), "{e}");
        let e = NetworkConfig::parse("mode = \"static\"\naddress = \"10.0.0.1\"\n").unwrap_err();
        assert!(e.contains("a.b.c.d/prefix"), "{e}");
        let e = NetworkConfig::parse("mode = \"ppp\"\n").unwrap_err();
        assert!(e.contains("ppp"), "{e}");
        let e = NetworkConfig::parse("adress = \"10.0.0.1/8\"\n").unwrap_err();
        assert!(e.contains("adress"), "{e}");
        let e = NetworkConfig::parse("gateway = \"10.0.0\"\n").unwrap_err();
        assert!(e.contains("gateway") || e.contains("line 1"), "{e}");
    }

    #[test]
    fn cidr() {
        assert_eq!(
            parse_cidr("10.0.2.15/24"),
            Some((Ipv4Addr::new(10, 0, 2, 15), 24))
        );
        assert_eq!(parse_cidr("10.0.2.15/33"), None);
        assert_eq!(parse_cidr("10.0.2/24"), None);
    }

    #[test]
    fn picks_the_first_physical_ethernet_interface() {
        let tmp = tempfile::tempdir().unwrap();
        let net = tmp.path().join("sys/class/net");
        for (name, ty, device) in [
            ("lo", "772", false),
            ("eth1", "1", true),
            ("eth0", "1", true),
            ("br0", "1", false),
            ("enp0s3", "1", true),
        ] {
            std::fs::create_dir_all(net.join(name)).unwrap();
            std::fs::write(net.join(name).join("type"), format!("{ty}\n")).unwrap();
            if device {
                std::fs::create_dir_all(net.join(name).join("device")).unwrap();
            }
        }
        assert_eq!(ethernet_interfaces(tmp.path()), ["enp0s3", "eth0", "eth1"]);
        std::fs::write(net.join("eth0/address"), "52:54:00:12:34:56\n").unwrap();
        assert_eq!(
            mac_address(tmp.path(), "eth0").unwrap(),
            crate::dhcp::tests::MAC
        );
        std::fs::write(net.join("eth1/address"), "52:54:00\n").unwrap();
        assert!(mac_address(tmp.path(), "eth1").is_err());
    }

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
