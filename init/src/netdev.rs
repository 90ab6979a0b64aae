//! Interface configuration through the classic `SIOC*` ioctls on an `AF_INET` datagram socket:
//! link up, IPv4 address and netmask, default route, and a UDP socket bound to one interface for
//! DHCP. Chosen over rtnetlink because it needs no extra crates, builds statically and covers
//! exactly what the init does (one address and one default route per interface).
//!
//! With [`crate::sys`] and [`crate::dm`], one of the few modules with `unsafe`.

use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

/// An ioctl or socket call on an interface failed.
#[derive(Debug, thiserror::Error)]
#[error("{action} on {interface} failed: {source}")]
pub struct NetdevError {
    pub action: &'static str,
    pub interface: String,
    #[source]
    pub source: io::Error,
}

fn err<'a>(action: &'static str, interface: &'a str) -> impl FnOnce(io::Error) -> NetdevError + 'a {
    move |source| NetdevError {
        action,
        interface: interface.to_string(),
        source,
    }
}

fn inet_socket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        None,
    )?)
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and both are plain old
    // data; this is the reinterpretation the socket API is designed around.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// `ioctl(fd, request, &mut req)` for requests that take a `struct ifreq`.
fn ifreq_ioctl(fd: &OwnedFd, request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `req` is a valid, initialised ifreq that outlives the call; the SIOC[GS]IF*
    // requests used here read and write only within it.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request as _, req as *mut libc::ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `IFF_UP` on `name`.
pub fn link_up(name: &str) -> Result<(), NetdevError> {
    let fd = inet_socket().map_err(err("opening a socket", name))?;
    let mut req = ifreq(name).map_err(err("naming", name))?;
    ifreq_ioctl(&fd, libc::SIOCGIFFLAGS as _, &mut req).map_err(err("SIOCGIFFLAGS", name))?;
    // SAFETY: SIOCGIFFLAGS just initialised the `ifru_flags` member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    ifreq_ioctl(&fd, libc::SIOCSIFFLAGS as _, &mut req).map_err(err("SIOCSIFFLAGS", name))
}

/// Whether the link has carrier (`/sys/class/net/<name>/carrier` is 1).
pub fn carrier(sys_root: &Path, name: &str) -> bool {
    std::fs::read_to_string(sys_root.join("sys/class/net").join(name).join("carrier"))
        .is_ok_and(|t| t.trim() == "1")
}

/// Sets the IPv4 address and netmask of `name` (the kernel adds the prefix route).
pub fn set_address(name: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), NetdevError> {
    let fd = inet_socket().map_err(err("opening a socket", name))?;
    let mut req = ifreq(name).map_err(err("naming", name))?;
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    ifreq_ioctl(&fd, libc::SIOCSIFADDR as _, &mut req).map_err(err("SIOCSIFADDR", name))?;
    let mut req = ifreq(name).map_err(err("naming", name))?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(prefix_mask(prefix));
    ifreq_ioctl(&fd, libc::SIOCSIFNETMASK as _, &mut req).map_err(err("SIOCSIFNETMASK", name))
}

/// The netmask of a prefix length (`24` → 255.255.255.0).
pub fn prefix_mask(prefix: u8) -> Ipv4Addr {
    let bits = match prefix {
        0 => 0,
        p if p >= 32 => u32::MAX,
        p => u32::MAX << (32 - u32::from(p)),
    };
    Ipv4Addr::from(bits)
}

/// The prefix length of a netmask (255.255.255.0 → 24).
pub fn mask_prefix(mask: Ipv4Addr) -> u8 {
    u32::from(mask).leading_ones() as u8
}

/// `struct rtentry` from `<net/route.h>` (x86-64 layout; glibc's libc crate does not export it).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

const RTF_UP: libc::c_ushort = 0x0001;
const RTF_GATEWAY: libc::c_ushort = 0x0002;

/// Adds `default via gateway dev name`; an existing identical route is not an error.
pub fn add_default_route(name: &str, gateway: Ipv4Addr) -> Result<(), NetdevError> {
    let fd = inet_socket().map_err(err("opening a socket", name))?;
    let mut dev = std::ffi::CString::new(name)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
        .map_err(err("naming", name))?
        .into_bytes_with_nul();
    let rt = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr_in(gateway),
        rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_flags: RTF_UP | RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: dev.as_mut_ptr().cast(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: `rt` is a fully initialised rtentry and `dev` (a NUL-terminated name it points
    // to) outlives the call; SIOCADDRT only reads them.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCADDRT as _, &rt as *const RtEntry) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(err("SIOCADDRT (default route)", name)(e));
    }
    Ok(())
}

/// A UDP socket on `0.0.0.0:port`, bound to interface `name`, allowed to broadcast: what a DHCP
/// client needs before the interface has an address.
pub fn dhcp_socket(name: &str, port: u16) -> Result<UdpSocket, NetdevError> {
    use rustix::net::sockopt;
    let fd = inet_socket().map_err(err("opening a socket", name))?;
    sockopt::set_socket_reuseaddr(&fd, true)
        .map_err(io::Error::from)
        .map_err(err("SO_REUSEADDR", name))?;
    sockopt::set_socket_broadcast(&fd, true)
        .map_err(io::Error::from)
        .map_err(err("SO_BROADCAST", name))?;
    let bytes = name.as_bytes();
    // SAFETY: `bytes` is valid for `bytes.len()` bytes for the duration of the call;
    // SO_BINDTODEVICE only reads the interface name from it.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            bytes.as_ptr().cast(),
            bytes.len() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(err("SO_BINDTODEVICE", name)(io::Error::last_os_error()));
    }
    let sock = UdpSocket::from(fd);
    let local = rustix::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
    rustix::net::bind(&sock, &local)
        .map_err(io::Error::from)
        .map_err(err("binding UDP port 68", name))?;
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_prefixes() {
        assert_eq!(prefix_mask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(prefix_mask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(prefix_mask(32), Ipv4Addr::BROADCAST);
        assert_eq!(prefix_mask(20), Ipv4Addr::new(255, 255, 240, 0));
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 255, 255, 0)), 24);
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 255, 240, 0)), 20);
    }

    #[test]
    fn rtentry_has_the_kernel_size() {
        // sizeof(struct rtentry) on x86-64.
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(ifreq("eth0").is_ok());
        assert!(ifreq("").is_err());
        assert!(ifreq("a-name-that-is-too-long").is_err());
    }
}
