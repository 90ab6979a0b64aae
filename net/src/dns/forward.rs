//! Forwarding what is not in the cluster zone to the host's resolvers: each upstream in turn,
//! over UDP first and over TCP when the UDP answer is truncated and the client needs it whole,
//! each within its own timeout.

use hickory_proto::op::{Message, ResponseCode};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

/// The largest answer read from an upstream over UDP.
const MAX_UDP_REPLY: usize = 65_535;

/// Why one upstream gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No upstream resolver is configured.
    #[error("no upstream resolver is configured to forward to")]
    NoUpstreams,
    /// A socket operation with an upstream failed.
    #[error("{what} {upstream} over {transport}: {source}")]
    Io {
        what: &'static str,
        upstream: SocketAddr,
        transport: &'static str,
        source: io::Error,
    },
    /// The upstream did not answer in time.
    #[error("upstream {upstream} did not answer over {transport} within {after:?}")]
    Timeout {
        upstream: SocketAddr,
        transport: &'static str,
        after: Duration,
    },
    /// The upstream's answer cannot be used.
    #[error("upstream {upstream} sent an unusable answer: {reason}")]
    BadReply {
        upstream: SocketAddr,
        reason: String,
    },
    /// The query could not be encoded for the upstream.
    #[error("cannot encode the query to forward: {0}")]
    Encode(hickory_proto::ProtoError),
    /// Every upstream failed; the last failure.
    #[error("none of {tried} upstream resolvers answered; the last one: {last}")]
    AllFailed {
        tried: usize,
        last: Box<ForwardError>,
    },
}

/// The upstream resolvers and how long each one gets.
#[derive(Debug, Clone)]
pub(crate) struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
}

impl Forwarder {
    pub(crate) fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Self {
        Forwarder { upstreams, timeout }
    }

    /// The first usable answer to `query` from the upstreams, as the upstream encoded it, with
    /// `query`'s id. With `whole`, a truncated UDP answer is asked again over TCP; without, it
    /// is returned as is (the client, on UDP, retries over TCP itself). An answer of SERVFAIL or
    /// REFUSED moves on to the next upstream but is returned if no other answers.
    pub(crate) async fn forward(
        &self,
        query: &Message,
        whole: bool,
    ) -> Result<Vec<u8>, ForwardError> {
        let mut last = ForwardError::NoUpstreams;
        let mut fallback = None;
        for &upstream in &self.upstreams {
            match self.ask(upstream, query, whole).await {
                Ok((reply, rcode))
                    if matches!(rcode, ResponseCode::ServFail | ResponseCode::Refused) =>
                {
                    log::debug!("dns: upstream {upstream} answered {rcode}; trying the next one");
                    fallback.get_or_insert(reply);
                }
                Ok((reply, _)) => return Ok(reply),
                Err(e) => {
                    log::warn!("dns: {e}");
                    last = e;
                }
            }
        }
        if let Some(reply) = fallback {
            return Ok(reply);
        }
        match last {
            ForwardError::NoUpstreams => Err(last),
            last => Err(ForwardError::AllFailed {
                tried: self.upstreams.len(),
                last: Box::new(last),
            }),
        }
    }

    /// One upstream's answer, with `query`'s id, and its response code.
    async fn ask(
        &self,
        upstream: SocketAddr,
        query: &Message,
        whole: bool,
    ) -> Result<(Vec<u8>, ResponseCode), ForwardError> {
        let id: u16 = rand::random();
        let mut ours = query.clone();
        ours.metadata.id = id;
        let bytes = ours.to_vec().map_err(ForwardError::Encode)?;
        let after = self.timeout;
        let tcp_timeout = |_| ForwardError::Timeout {
            upstream,
            transport: "TCP",
            after,
        };
        let udp = timeout(after, udp_exchange(upstream, &bytes, id)).await;
        let mut reply = udp.map_err(|_| ForwardError::Timeout {
            upstream,
            transport: "UDP",
            after,
        })??;
        let mut checked = check(upstream, &reply, &ours)?;
        if checked.metadata.truncation && whole {
            log::debug!("dns: upstream {upstream} truncated its UDP answer; asking over TCP");
            reply = timeout(after, tcp_exchange(upstream, &bytes))
                .await
                .map_err(tcp_timeout)??;
            checked = check(upstream, &reply, &ours)?;
        }
        reply[..2].copy_from_slice(&query.metadata.id.to_be_bytes());
        Ok((reply, checked.metadata.response_code))
    }
}

/// `reply` decoded, if it answers `query`.
fn check(upstream: SocketAddr, reply: &[u8], query: &Message) -> Result<Message, ForwardError> {
    let bad = |reason: String| ForwardError::BadReply { upstream, reason };
    let message = Message::from_vec(reply).map_err(|e| bad(format!("cannot decode it: {e}")))?;
    if message.metadata.id != query.metadata.id {
        return Err(bad("its id is not the query's".into()));
    }
    if message.queries != query.queries {
        return Err(bad("it answers another question".into()));
    }
    Ok(message)
}

fn io_error(
    what: &'static str,
    upstream: SocketAddr,
    transport: &'static str,
) -> impl FnOnce(io::Error) -> ForwardError {
    move |source| ForwardError::Io {
        what,
        upstream,
        transport,
        source,
    }
}

/// Sends `query` to `upstream` from a socket of its own and waits for the datagram with `id`.
async fn udp_exchange(
    upstream: SocketAddr,
    query: &[u8],
    id: u16,
) -> Result<Vec<u8>, ForwardError> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(io_error(
        "cannot open a socket to",
        upstream,
        "UDP",
    ))?;
    socket
        .connect(upstream)
        .await
        .map_err(io_error("cannot connect to", upstream, "UDP"))?;
    socket
        .send(query)
        .await
        .map_err(io_error("cannot send to", upstream, "UDP"))?;
    let mut buf = vec![0; MAX_UDP_REPLY];
    loop {
        let n = socket
            .recv(&mut buf)
            .await
            .map_err(io_error("no answer from", upstream, "UDP"))?;
        if n >= 12 && buf[..2] == id.to_be_bytes() {
            buf.truncate(n);
            return Ok(buf);
        }
        log::debug!("dns: ignoring a stray datagram from {upstream}");
    }
}

/// Sends `query` to `upstream` over a new TCP connection and reads one answer.
async fn tcp_exchange(upstream: SocketAddr, query: &[u8]) -> Result<Vec<u8>, ForwardError> {
    let mut stream = TcpStream::connect(upstream).await.map_err(io_error(
        "cannot connect to",
        upstream,
        "TCP",
    ))?;
    let len = u16::try_from(query.len()).map_err(|_| ForwardError::BadReply {
        upstream,
        reason: "the query is too long for TCP".into(),
    })?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream
        .write_all(&framed)
        .await
        .map_err(io_error("cannot send to", upstream, "TCP"))?;
    let len = stream
        .read_u16()
        .await
        .map_err(io_error("no answer from", upstream, "TCP"))?;
    let mut reply = vec![0; usize::from(len)];
    stream
        .read_exact(&mut reply)
        .await
        .map_err(io_error("a cut answer from", upstream, "TCP"))?;
    Ok(reply)
}

/// The resolvers (port 53) that the `nameserver` lines of a resolv.conf name, in order.
///
/// With `own` (the responder's address), a nameserver that would reach the responder itself
/// is left out, so that it does not forward to itself in a loop: the address itself, and any
/// loopback or unspecified address when the responder listens on all addresses (`0.0.0.0` or
/// `::`) on port 53. Lines that do not parse are skipped with a warning.
pub fn upstreams_from_resolv_conf(text: &str, own: Option<SocketAddr>) -> Vec<SocketAddr> {
    let mut upstreams = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(word) = words.next() else {
            continue;
        };
        let Some(upstream) = parse_nameserver(word) else {
            log::warn!("dns: resolv.conf: skipping nameserver {word:?}: not an IP address");
            continue;
        };
        if own.is_some_and(|own| reaches(upstream, own)) {
            log::info!("dns: resolv.conf: skipping nameserver {word}: it is this responder");
            continue;
        }
        if !upstreams.contains(&upstream) {
            upstreams.push(upstream);
        }
    }
    upstreams
}

/// A nameserver's address: IPv4, or IPv6 with an optional numeric `%scope`.
fn parse_nameserver(word: &str) -> Option<SocketAddr> {
    let (addr, scope) = match word.split_once('%') {
        Some((addr, scope)) => (addr, Some(scope.parse::<u32>().ok()?)),
        None => (word, None),
    };
    let mut upstream = SocketAddr::new(addr.parse::<IpAddr>().ok()?, 53);
    if let (SocketAddr::V6(v6), Some(scope)) = (&mut upstream, scope) {
        v6.set_scope_id(scope);
    }
    Some(upstream)
}

/// Whether a query sent to `upstream` would arrive at a responder listening on `own`.
fn reaches(upstream: SocketAddr, own: SocketAddr) -> bool {
    if upstream.port() != own.port() {
        return false;
    }
    let ip = upstream.ip();
    ip == own.ip() || (own.ip().is_unspecified() && (ip.is_loopback() || ip.is_unspecified()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESOLV: &str =
        "# made by hand\nsearch lan\nnameserver 127.0.0.1\nnameserver 192.0.2.53\n\
        nameserver   fe80::1%2 \nnameserver not-an-address\nnameserver 192.0.2.53\n\
        options edns0\nnameserver 127.0.0.53\n";

    fn addrs(list: &[SocketAddr]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn every_nameserver_once_in_order() {
        let all = upstreams_from_resolv_conf(RESOLV, None);
        assert_eq!(
            addrs(&all),
            [
                "127.0.0.1:53",
                "192.0.2.53:53",
                "[fe80::1%2]:53",
                "127.0.0.53:53"
            ]
        );
    }

    #[test]
    fn a_nameserver_that_is_the_responder_itself_is_skipped() {
        let own = "127.0.0.1:53".parse().ok();
        let some = upstreams_from_resolv_conf(RESOLV, own);
        assert_eq!(
            addrs(&some),
            ["192.0.2.53:53", "[fe80::1%2]:53", "127.0.0.53:53"]
        );
        let any = upstreams_from_resolv_conf(RESOLV, "0.0.0.0:53".parse().ok());
        assert_eq!(addrs(&any), ["192.0.2.53:53", "[fe80::1%2]:53"]);
        let bridge = upstreams_from_resolv_conf(RESOLV, "10.42.1.1:53".parse().ok());
        assert_eq!(bridge.len(), 4);
        let other_port = upstreams_from_resolv_conf(RESOLV, "0.0.0.0:5353".parse().ok());
        assert_eq!(other_port.len(), 4);
    }

    #[tokio::test]
    async fn no_upstream_is_an_error_at_once() {
        let f = Forwarder::new(vec![], Duration::from_secs(5));
        let err = f.forward(&Message::query(), true).await.unwrap_err();
        assert!(matches!(err, ForwardError::NoUpstreams), "{err}");
    }
}
