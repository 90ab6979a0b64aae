//! A small DHCPv4 client (RFC 2131/2132): DISCOVER, OFFER, REQUEST, ACK over a UDP socket bound
//! to the interface, with the broadcast flag set so replies reach a machine without an address.
//! Messages are built and parsed here (pure functions, unit-tested); the exchange runs over
//! [`Transport`], so the state machine is tested without a network.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// The BOOTP/DHCP magic cookie.
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// Fixed header size (op .. file), before the cookie.
const HEADER: usize = 236;
/// BOOTP's minimum message size; some servers drop shorter requests.
const MIN_LEN: usize = 300;

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Decline = 4,
    Ack = 5,
    Nak = 6,
    Release = 7,
}

impl MsgType {
    fn from_u8(v: u8) -> Option<MsgType> {
        Some(match v {
            1 => MsgType::Discover,
            2 => MsgType::Offer,
            3 => MsgType::Request,
            4 => MsgType::Decline,
            5 => MsgType::Ack,
            6 => MsgType::Nak,
            7 => MsgType::Release,
            _ => return None,
        })
    }
}

/// A message that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DhcpError {
    #[error("DHCP message too short ({0} bytes)")]
    Short(usize),
    #[error("not a BOOTP reply or not for us")]
    NotForUs,
    #[error("no DHCP magic cookie")]
    NoMagic,
    #[error("option {0} runs past the end of the message")]
    Truncated(u8),
    #[error("no DHCP message type")]
    NoType,
    #[error("the offer/ack has no {0}")]
    Missing(&'static str),
    #[error("no DHCP offer from any server within {0} s")]
    NoOffer(u64),
    #[error("the server refused the request (DHCPNAK)")]
    Nak,
    #[error("DHCP I/O: {0}")]
    Io(String),
}

/// A parsed server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub kind: MsgType,
    pub xid: u32,
    pub yiaddr: Ipv4Addr,
    pub server: Option<Ipv4Addr>,
    pub netmask: Option<Ipv4Addr>,
    pub routers: Vec<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub lease_s: Option<u32>,
    pub renew_s: Option<u32>,
}

/// A lease: what the interface is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub server: Ipv4Addr,
    pub lease: Duration,
    pub renew: Duration,
}

impl Reply {
    /// The lease an ACK grants.
    pub fn lease(&self) -> Result<Lease, DhcpError> {
        let server = self.server.ok_or(DhcpError::Missing("server identifier"))?;
        if self.yiaddr.is_unspecified() {
            return Err(DhcpError::Missing("address"));
        }
        let lease = Duration::from_secs(u64::from(self.lease_s.unwrap_or(3600)).max(60));
        let renew = self
            .renew_s
            .map(|s| Duration::from_secs(u64::from(s).max(30)))
            .unwrap_or(lease / 2);
        Ok(Lease {
            address: self.yiaddr,
            prefix: self
                .netmask
                .map(crate::netdev::mask_prefix)
                .unwrap_or_else(|| default_prefix(self.yiaddr)),
            gateway: self.routers.first().copied(),
            dns: self.dns.clone(),
            domain: self.domain.clone(),
            server,
            lease,
            renew,
        })
    }
}

/// The classful prefix, for a server that sends no subnet mask.
fn default_prefix(a: Ipv4Addr) -> u8 {
    match a.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

/// What a request carries besides its type.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub xid: u32,
    pub mac: [u8; 6],
    pub secs: u16,
    /// Our current address (renewing), else 0.0.0.0.
    pub ciaddr: Option<Ipv4Addr>,
    /// Option 50 (selecting, after an offer).
    pub requested: Option<Ipv4Addr>,
    /// Option 54 (selecting).
    pub server: Option<Ipv4Addr>,
    pub hostname: Option<String>,
}

/// The parameters we ask for: mask, router, DNS, domain, lease, T1, T2.
const PARAMS: [u8; 7] = [1, 3, 6, 15, 51, 58, 59];

/// Builds a client message of type `kind`.
pub fn build(kind: MsgType, r: &Request) -> Vec<u8> {
    let mut m = vec![0u8; HEADER];
    m[0] = 1; // BOOTREQUEST
    m[1] = 1; // Ethernet
    m[2] = 6;
    m[4..8].copy_from_slice(&r.xid.to_be_bytes());
    m[8..10].copy_from_slice(&r.secs.to_be_bytes());
    if r.ciaddr.is_none() {
        m[10] = 0x80; // broadcast flag: we cannot receive unicast yet
    }
    if let Some(c) = r.ciaddr {
        m[12..16].copy_from_slice(&c.octets());
    }
    m[28..34].copy_from_slice(&r.mac);
    m.extend_from_slice(&MAGIC);
    m.extend_from_slice(&[53, 1, kind as u8]);
    let mut client_id = vec![1u8];
    client_id.extend_from_slice(&r.mac);
    push_opt(&mut m, 61, &client_id);
    if let Some(a) = r.requested {
        push_opt(&mut m, 50, &a.octets());
    }
    if let Some(s) = r.server {
        push_opt(&mut m, 54, &s.octets());
    }
    if let Some(h) = &r.hostname {
        push_opt(&mut m, 12, &h.as_bytes()[..h.len().min(255)]);
    }
    push_opt(&mut m, 55, &PARAMS);
    push_opt(&mut m, 57, &1500u16.to_be_bytes());
    m.push(255);
    if m.len() < MIN_LEN {
        m.resize(MIN_LEN, 0);
    }
    m
}

fn push_opt(m: &mut Vec<u8>, code: u8, data: &[u8]) {
    m.push(code);
    m.push(data.len() as u8);
    m.extend_from_slice(data);
}

fn addrs(data: &[u8]) -> Vec<Ipv4Addr> {
    data.chunks_exact(4)
        .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
        .collect()
}

fn u32_of(data: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(data.get(..4)?.try_into().ok()?))
}

/// Parses a server reply for the client with `mac`.
pub fn parse(m: &[u8], mac: &[u8; 6]) -> Result<Reply, DhcpError> {
    if m.len() < HEADER + MAGIC.len() {
        return Err(DhcpError::Short(m.len()));
    }
    if m[0] != 2 || &m[28..34] != mac {
        return Err(DhcpError::NotForUs);
    }
    if m[HEADER..HEADER + 4] != MAGIC {
        return Err(DhcpError::NoMagic);
    }
    let ip = |o: usize| Ipv4Addr::new(m[o], m[o + 1], m[o + 2], m[o + 3]);
    let mut reply = Reply {
        kind: MsgType::Discover,
        xid: u32::from_be_bytes([m[4], m[5], m[6], m[7]]),
        yiaddr: ip(16),
        server: None,
        netmask: None,
        routers: Vec::new(),
        dns: Vec::new(),
        domain: None,
        lease_s: None,
        renew_s: None,
    };
    let mut kind = None;
    let mut i = HEADER + 4;
    while i < m.len() {
        let code = m[i];
        if code == 255 {
            break;
        }
        if code == 0 {
            i += 1;
            continue;
        }
        let len = *m.get(i + 1).ok_or(DhcpError::Truncated(code))? as usize;
        let data = m
            .get(i + 2..i + 2 + len)
            .ok_or(DhcpError::Truncated(code))?;
        match code {
            1 => reply.netmask = addrs(data).first().copied(),
            3 => reply.routers = addrs(data),
            6 => reply.dns = addrs(data),
            15 => reply.domain = Some(String::from_utf8_lossy(data).trim_end_matches('\0').into()),
            51 => reply.lease_s = u32_of(data),
            53 => kind = data.first().copied().and_then(MsgType::from_u8),
            54 => reply.server = addrs(data).first().copied(),
            58 => reply.renew_s = u32_of(data),
            _ => {}
        }
        i += 2 + len;
    }
    reply.kind = kind.ok_or(DhcpError::NoType)?;
    Ok(reply)
}

/// Sends and receives DHCP messages (a UDP socket on the machine, a script in tests).
pub trait Transport {
    /// Broadcast (or send to the server) one message.
    fn send(&mut self, msg: &[u8]) -> Result<(), DhcpError>;
    /// The next message, or `None` after `timeout`.
    fn recv(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>, DhcpError>;
}

/// The client's identity and patience.
#[derive(Debug, Clone)]
pub struct Client {
    pub mac: [u8; 6],
    pub hostname: Option<String>,
    /// Time to wait for a reply before sending again (doubles, at most 8 s).
    pub retry: Duration,
    /// Give up after this long.
    pub timeout: Duration,
}

impl Client {
    fn request(&self, xid: u32, start: Instant) -> Request {
        Request {
            xid,
            mac: self.mac,
            secs: start.elapsed().as_secs().min(u64::from(u16::MAX)) as u16,
            hostname: self.hostname.clone(),
            ..Default::default()
        }
    }

    /// Sends `msg` and waits for a reply of one of `kinds` with `xid`, resending with backoff.
    fn exchange(
        &self,
        t: &mut dyn Transport,
        msg: impl Fn(Instant) -> Vec<u8>,
        xid: u32,
        kinds: &[MsgType],
        deadline: Instant,
    ) -> Result<Option<Reply>, DhcpError> {
        let start = Instant::now();
        let mut wait = self.retry;
        while Instant::now() < deadline {
            t.send(&msg(start))?;
            let until = (Instant::now() + wait).min(deadline);
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                let Some(bytes) = t.recv(left)? else { break };
                match parse(&bytes, &self.mac) {
                    Ok(r) if r.xid == xid && kinds.contains(&r.kind) => return Ok(Some(r)),
                    Ok(_) => {}
                    Err(e) => log::debug!("dhcp: ignoring a message: {e}"),
                }
            }
            wait = (wait * 2).min(Duration::from_secs(8));
        }
        Ok(None)
    }

    /// DISCOVER → OFFER → REQUEST → ACK.
    pub fn acquire(&self, t: &mut dyn Transport, xid: u32) -> Result<Lease, DhcpError> {
        let deadline = Instant::now() + self.timeout;
        let offer = self
            .exchange(
                t,
                |s| build(MsgType::Discover, &self.request(xid, s)),
                xid,
                &[MsgType::Offer],
                deadline,
            )?
            .ok_or(DhcpError::NoOffer(self.timeout.as_secs()))?;
        let server = offer
            .server
            .ok_or(DhcpError::Missing("server identifier"))?;
        let ack = self
            .exchange(
                t,
                |s| {
                    let mut r = self.request(xid, s);
                    r.requested = Some(offer.yiaddr);
                    r.server = Some(server);
                    build(MsgType::Request, &r)
                },
                xid,
                &[MsgType::Ack, MsgType::Nak],
                deadline,
            )?
            .ok_or(DhcpError::NoOffer(self.timeout.as_secs()))?;
        match ack.kind {
            MsgType::Ack => ack.lease(),
            _ => Err(DhcpError::Nak),
        }
    }

    /// Renewing: REQUEST with our address in `ciaddr` → ACK (a new lease) or NAK.
    pub fn renew(
        &self,
        t: &mut dyn Transport,
        xid: u32,
        lease: &Lease,
    ) -> Result<Lease, DhcpError> {
        let deadline = Instant::now() + self.timeout;
        let ack = self
            .exchange(
                t,
                |s| {
                    let mut r = self.request(xid, s);
                    r.ciaddr = Some(lease.address);
                    build(MsgType::Request, &r)
                },
                xid,
                &[MsgType::Ack, MsgType::Nak],
                deadline,
            )?
            .ok_or(DhcpError::NoOffer(self.timeout.as_secs()))?;
        match ack.kind {
            MsgType::Ack => ack.lease(),
            _ => Err(DhcpError::Nak),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::VecDeque;

    pub const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    /// A reply as QEMU's user-mode network (slirp) sends it.
    pub fn server_reply(kind: MsgType, xid: u32) -> Vec<u8> {
        let mut m = vec![0u8; HEADER];
        m[0] = 2;
        m[1] = 1;
        m[2] = 6;
        m[4..8].copy_from_slice(&xid.to_be_bytes());
        m[16..20].copy_from_slice(&[10, 0, 2, 15]);
        m[20..24].copy_from_slice(&[10, 0, 2, 2]);
        m[28..34].copy_from_slice(&MAC);
        m.extend_from_slice(&MAGIC);
        m.extend_from_slice(&[53, 1, kind as u8]);
        m.extend_from_slice(&[54, 4, 10, 0, 2, 2]);
        m.extend_from_slice(&[51, 4, 0, 1, 0x51, 0x80]); // 86400 s
        m.extend_from_slice(&[1, 4, 255, 255, 255, 0]);
        m.extend_from_slice(&[3, 4, 10, 0, 2, 2]);
        m.extend_from_slice(&[6, 4, 10, 0, 2, 3]);
        m.extend_from_slice(&[0, 0]); // padding
        m.push(255);
        m
    }

    #[test]
    fn discover_layout() {
        let r = Request {
            xid: 0xdeadbeef,
            mac: MAC,
            hostname: Some("caisson".into()),
            ..Default::default()
        };
        let m = build(MsgType::Discover, &r);
        assert_eq!(m.len(), MIN_LEN);
        assert_eq!(&m[..4], &[1, 1, 6, 0]);
        assert_eq!(&m[4..8], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(m[10], 0x80, "broadcast flag");
        assert_eq!(&m[12..16], &[0; 4]);
        assert_eq!(&m[28..34], &MAC);
        assert_eq!(&m[236..240], &MAGIC);
        assert_eq!(&m[240..243], &[53, 1, 1]);
        assert_eq!(&m[243..251], &[61, 7, 1, 0x52, 0x54, 0x00, 0x12, 0x34]);
        let opts = &m[240..];
        let host = opts.windows(9).position(|w| w == b"\x0c\x07caisson");
        assert!(host.is_some(), "hostname option");
        assert!(opts
            .windows(9)
            .any(|w| w == [55, 7, 1, 3, 6, 15, 51, 58, 59]));
    }

    #[test]
    fn request_carries_the_offer_and_renew_carries_ciaddr() {
        let r = Request {
            xid: 7,
            mac: MAC,
            requested: Some(Ipv4Addr::new(10, 0, 2, 15)),
            server: Some(Ipv4Addr::new(10, 0, 2, 2)),
            ..Default::default()
        };
        let m = build(MsgType::Request, &r);
        assert_eq!(&m[240..243], &[53, 1, 3]);
        assert!(m.windows(6).any(|w| w == [50, 4, 10, 0, 2, 15]));
        assert!(m.windows(6).any(|w| w == [54, 4, 10, 0, 2, 2]));
        let renew = Request {
            xid: 8,
            mac: MAC,
            ciaddr: Some(Ipv4Addr::new(10, 0, 2, 15)),
            ..Default::default()
        };
        let m = build(MsgType::Request, &renew);
        assert_eq!(m[10], 0, "no broadcast flag with an address");
        assert_eq!(&m[12..16], &[10, 0, 2, 15]);
    }

    #[test]
    fn parses_a_slirp_ack() {
        let r = parse(&server_reply(MsgType::Ack, 42), &MAC).unwrap();
        assert_eq!(r.kind, MsgType::Ack);
        assert_eq!(r.xid, 42);
        let l = r.lease().unwrap();
        assert_eq!(l.address, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(l.prefix, 24);
        assert_eq!(l.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(l.dns, vec![Ipv4Addr::new(10, 0, 2, 3)]);
        assert_eq!(l.server, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(l.lease, Duration::from_secs(86400));
        assert_eq!(l.renew, Duration::from_secs(43200));
    }

    #[test]
    fn rejects_broken_and_foreign_messages() {
        let good = server_reply(MsgType::Offer, 1);
        assert_eq!(parse(&good[..100], &MAC), Err(DhcpError::Short(100)));
        assert_eq!(parse(&good, &[0; 6]), Err(DhcpError::NotForUs));
        let mut no_magic = good.clone();
        no_magic[236] = 0;
        assert_eq!(parse(&no_magic, &MAC), Err(DhcpError::NoMagic));
        let mut truncated = good[..240].to_vec();
        truncated.extend_from_slice(&[6, 8, 10, 0]);
        assert_eq!(parse(&truncated, &MAC), Err(DhcpError::Truncated(6)));
        let mut untyped = good[..240].to_vec();
        untyped.push(255);
        assert_eq!(parse(&untyped, &MAC), Err(DhcpError::NoType));
        // A request (op 1) we hear on the wire is not a reply.
        let own = build(
            MsgType::Discover,
            &Request {
                xid: 1,
                mac: MAC,
                ..Default::default()
            },
        );
        assert_eq!(parse(&own, &MAC), Err(DhcpError::NotForUs));
    }

    /// Answers each client message from a script of (expected type, reply type).
    struct Script {
        steps: VecDeque<(u8, Option<MsgType>)>,
        pending: VecDeque<Vec<u8>>,
        sent: Vec<u8>,
    }

    impl Transport for Script {
        fn send(&mut self, msg: &[u8]) -> Result<(), DhcpError> {
            let kind = msg[242];
            self.sent.push(kind);
            // Past the script: silence.
            let (want, reply) = self.steps.pop_front().unwrap_or((kind, None));
            assert_eq!(kind, want, "client sent type {kind}, expected {want}");
            if let Some(r) = reply {
                let xid = u32::from_be_bytes([msg[4], msg[5], msg[6], msg[7]]);
                self.pending
                    .push_back(server_reply(MsgType::Offer, xid ^ 1)); // stale
                self.pending.push_back(server_reply(r, xid));
            }
            Ok(())
        }
        fn recv(&mut self, _timeout: Duration) -> Result<Option<Vec<u8>>, DhcpError> {
            Ok(self.pending.pop_front())
        }
    }

    fn client() -> Client {
        Client {
            mac: MAC,
            hostname: None,
            retry: Duration::from_millis(1),
            timeout: Duration::from_millis(200),
        }
    }

    #[test]
    fn acquires_after_a_lost_discover() {
        let mut t = Script {
            steps: [
                (1, None),
                (1, Some(MsgType::Offer)),
                (3, Some(MsgType::Ack)),
            ]
            .into(),
            pending: VecDeque::new(),
            sent: Vec::new(),
        };
        let lease = client().acquire(&mut t, 99).unwrap();
        assert_eq!(lease.address, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(t.sent, [1, 1, 3]);
    }

    #[test]
    fn nak_and_silence_are_errors() {
        let mut t = Script {
            steps: [(1, Some(MsgType::Offer)), (3, Some(MsgType::Nak))].into(),
            pending: VecDeque::new(),
            sent: Vec::new(),
        };
        assert_eq!(client().acquire(&mut t, 5), Err(DhcpError::Nak));
        let mut silent = Script {
            steps: VecDeque::new(),
            pending: VecDeque::new(),
            sent: Vec::new(),
        };
        assert!(matches!(
            client().acquire(&mut silent, 5),
            Err(DhcpError::NoOffer(_))
        ));
    }
}
