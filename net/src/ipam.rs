//! Host-local address management for the host's subnet, as CNI's `host-local` plugin does it:
//! the state is a directory with one file per allocated address (named after the address,
//! holding the instance's name). A file is created with `O_EXCL`, so two allocations, even from
//! two processes, never get the same address; the directory survives agent restarts (keep it
//! on the state partition). The network address, the gateway (the subnet's first host, the
//! bridge's address) and the broadcast address are never handed out.

use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// What can go wrong managing addresses.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// The subnet is too small to hold a gateway and an instance.
    #[error("subnet {0} is too small for container addresses (need at most a /30)")]
    SubnetTooSmall(Ipv4Net),
    /// An instance name that cannot be stored (empty, or with a newline or a NUL).
    #[error("instance name {0:?} is not valid for address management (empty, or with a newline)")]
    BadInstance(String),
    /// Every address of the subnet is taken.
    #[error("no free address left in {subnet} (state in {dir}); release instances that are gone")]
    Exhausted { subnet: Ipv4Net, dir: PathBuf },
    /// The state directory or one of its files could not be read or written.
    #[error("address state {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> IpamError + '_ {
    move |source| IpamError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The addresses of one subnet, kept in one directory.
#[derive(Debug, Clone)]
pub struct Ipam {
    subnet: Ipv4Net,
    dir: PathBuf,
}

impl Ipam {
    /// Opens (creating if needed) the state in `dir` for `subnet` (its host bits are ignored).
    pub fn open(dir: impl Into<PathBuf>, subnet: Ipv4Net) -> Result<Self, IpamError> {
        let subnet = subnet.trunc();
        if subnet.prefix_len() > 30 {
            return Err(IpamError::SubnetTooSmall(subnet));
        }
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(Ipam { subnet, dir })
    }

    /// The subnet this state hands out addresses of.
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// The gateway: the subnet's first host, the bridge's address; never handed out.
    pub fn gateway(&self) -> Ipv4Addr {
        gateway(self.subnet)
    }

    /// The address of `instance`: the one it already has, or a new free one.
    pub fn allocate(&self, instance: &str) -> Result<Ipv4Addr, IpamError> {
        check_instance(instance)?;
        if let Some(addr) = self.find(instance)? {
            return Ok(addr);
        }
        let candidates = self.subnet.hosts().filter(|a| *a != self.gateway());
        for addr in candidates {
            let path = self.dir.join(addr.to_string());
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut file) => {
                    file.write_all(instance.as_bytes()).map_err(io_err(&path))?;
                    file.sync_all().map_err(io_err(&path))?;
                    // The new name must survive a power cut too.
                    let dir = File::open(&self.dir).map_err(io_err(&self.dir))?;
                    dir.sync_all().map_err(io_err(&self.dir))?;
                    log::debug!("ipam: {addr} for {instance}");
                    return Ok(addr);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Err(IpamError::Exhausted {
            subnet: self.subnet,
            dir: self.dir.clone(),
        })
    }

    /// Frees the address of `instance`; returns it, or `None` if it had none.
    pub fn release(&self, instance: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        let Some(addr) = self.find(instance)? else {
            return Ok(None);
        };
        let path = self.dir.join(addr.to_string());
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        log::debug!("ipam: released {addr} of {instance}");
        Ok(Some(addr))
    }

    /// Every allocated address and the instance that holds it.
    pub fn list(&self) -> Result<BTreeMap<Ipv4Addr, String>, IpamError> {
        let mut out = BTreeMap::new();
        let entries = fs::read_dir(&self.dir).map_err(io_err(&self.dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name();
            let Some(addr) = name.to_str().and_then(|n| n.parse::<Ipv4Addr>().ok()) else {
                continue; // not ours (a lock file, an editor's backup)
            };
            if !self.subnet.contains(&addr) {
                continue;
            }
            let path = entry.path();
            let holder = match fs::read_to_string(&path) {
                Ok(holder) => holder,
                // Released between read_dir and here.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path)(e)),
            };
            out.insert(addr, holder.trim().to_string());
        }
        Ok(out)
    }

    /// The address `instance` holds, if any.
    pub fn find(&self, instance: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        Ok(self
            .list()?
            .into_iter()
            .find(|(_, holder)| holder == instance)
            .map(|(addr, _)| addr))
    }
}

/// The gateway of a subnet: its first host (10.42.3.1 for 10.42.3.0/24).
pub fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(1))
}

fn check_instance(instance: &str) -> Result<(), IpamError> {
    if instance.is_empty() || instance.contains(['\n', '\0']) {
        return Err(IpamError::BadInstance(instance.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn skips_network_gateway_and_broadcast() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(dir.path(), net("10.42.3.0/29")).unwrap();
        assert_eq!(ipam.gateway(), "10.42.3.1".parse::<Ipv4Addr>().unwrap());
        let got: Vec<_> = (0..5)
            .map(|i| ipam.allocate(&format!("i{i}")).unwrap())
            .collect();
        let want: Vec<Ipv4Addr> = (2..=6).map(|h| Ipv4Addr::new(10, 42, 3, h)).collect();
        assert_eq!(got, want);
        assert!(matches!(
            ipam.allocate("one-more"),
            Err(IpamError::Exhausted { .. })
        ));
    }

    #[test]
    fn same_instance_same_address_and_release_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(dir.path(), net("10.42.3.0/24")).unwrap();
        let a = ipam.allocate("web-1").unwrap();
        let b = ipam.allocate("web-2").unwrap();
        assert_ne!(a, b);
        assert_eq!(ipam.allocate("web-1").unwrap(), a);
        assert_eq!(ipam.release("web-1").unwrap(), Some(a));
        assert_eq!(ipam.release("web-1").unwrap(), None);
        assert_eq!(ipam.list().unwrap().len(), 1);
        assert_eq!(ipam.allocate("web-3").unwrap(), a);
    }

    #[test]
    fn rejects_bad_names_and_tiny_subnets() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Ipam::open(dir.path(), net("10.0.0.0/31")),
            Err(IpamError::SubnetTooSmall(_))
        ));
        let ipam = Ipam::open(dir.path(), net("10.0.0.0/24")).unwrap();
        assert!(matches!(ipam.allocate(""), Err(IpamError::BadInstance(_))));
        assert!(matches!(
            ipam.allocate("a\nb"),
            Err(IpamError::BadInstance(_))
        ));
    }

    #[test]
    fn unwritable_state_dir_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let err = Ipam::open(&file, net("10.0.0.0/24")).unwrap_err();
        assert!(err.to_string().contains("not-a-dir"), "{err}");
    }
}
