//! A private virtual network for several VMs, on host loopback only.
//!
//! Each VM gets a NIC backed by QEMU's `-netdev socket,udp=...,localaddr=...` (works unprivileged
//! in QEMU 7.2). Every frame goes to a hub thread on `127.0.0.1`, which repeats it to every other
//! member, like an Ethernet hub. No multicast, no root, nothing leaves loopback.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::QemuError;

/// One VM's place on a [`VirtualNetwork`]: pass it in [`crate::VmOptions::networks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetAttachment {
    /// The hub's address.
    pub hub: SocketAddr,
    /// The address QEMU binds for this NIC.
    pub local: SocketAddr,
    /// The NIC's MAC address, unique on the network.
    pub mac: String,
}

/// A hub that repeats Ethernet frames between VMs. Stops when dropped.
#[derive(Debug)]
pub struct VirtualNetwork {
    hub: SocketAddr,
    members: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl VirtualNetwork {
    /// Starts a hub on a free loopback port.
    pub fn new() -> Result<VirtualNetwork, QemuError> {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(QemuError::io("bind UDP hub on", "127.0.0.1:0"))?;
        let hub = socket
            .local_addr()
            .map_err(QemuError::io("read address of", "the UDP hub"))?;
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(QemuError::io("set timeout on", hub.to_string()))?;
        let members = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let members = Arc::clone(&members);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("caisson-vnet-hub".into())
                .spawn(move || repeat(&socket, &members, &stop))
                .map_err(QemuError::io("start hub thread for", hub.to_string()))?
        };
        Ok(VirtualNetwork {
            hub,
            members,
            stop,
            thread: Some(thread),
        })
    }

    /// The hub's loopback address.
    pub fn hub(&self) -> SocketAddr {
        self.hub
    }

    /// Reserves a loopback port and a MAC address for one more VM.
    pub fn attach(&self) -> Result<NetAttachment, QemuError> {
        let probe = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(QemuError::io("reserve a UDP port on", "127.0.0.1:0"))?;
        let local = probe
            .local_addr()
            .map_err(QemuError::io("read address of", "a reserved UDP port"))?;
        drop(probe);
        let mut members = self.members.lock().unwrap_or_else(PoisonError::into_inner);
        members.push(local);
        let n = members.len();
        let port = self.hub.port().to_be_bytes();
        let mac = format!("52:54:00:{:02x}:{:02x}:{:02x}", port[0], port[1], n & 0xff);
        Ok(NetAttachment {
            hub: self.hub,
            local,
            mac,
        })
    }
}

fn repeat(socket: &UdpSocket, members: &Mutex<Vec<SocketAddr>>, stop: &AtomicBool) {
    let mut frame = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = socket.recv_from(&mut frame) else {
            continue;
        };
        let targets: Vec<SocketAddr> = members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .filter(|m| *m != from)
            .collect();
        for to in targets {
            if let Err(e) = socket.send_to(&frame[..n], to) {
                log::debug!("virtual network: frame to {to}: {e}");
            }
        }
    }
}

impl Drop for VirtualNetwork {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_repeats_frames_to_every_other_member() {
        let net = VirtualNetwork::new().unwrap();
        let a = net.attach().unwrap();
        let b = net.attach().unwrap();
        let c = net.attach().unwrap();
        assert_ne!(a.mac, b.mac);
        let sock = |att: &NetAttachment| {
            let s = UdpSocket::bind(att.local).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s
        };
        let (sa, sb, sc) = (sock(&a), sock(&b), sock(&c));
        sa.send_to(b"frame-from-a", net.hub()).unwrap();
        let mut buf = [0u8; 64];
        for s in [&sb, &sc] {
            let (n, from) = s.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"frame-from-a");
            assert_eq!(from, net.hub());
        }
        sa.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        assert!(sa.recv_from(&mut buf).is_err(), "no echo to the sender");
    }
}
