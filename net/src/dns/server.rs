//! The sockets: one UDP socket and one TCP listener on the same address and port.

use super::answer::{Zone, ZoneError};
use super::forward::Forwarder;
use super::handler::{Handler, Outcome, Transport, MAX_QUERY};
use super::Config;
use crate::endpoint::Endpoints;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::timeout;

/// How many times an ephemeral port is drawn again when its TCP twin is taken.
const PORT_TRIES: usize = 16;

/// Errors starting or running the responder.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration's zone is not usable.
    #[error(transparent)]
    Zone(#[from] ZoneError),
    /// A socket could not be bound.
    #[error("cannot listen for DNS over {transport} on {addr}: {source} (is another DNS server running there?)")]
    Bind {
        addr: SocketAddr,
        transport: &'static str,
        source: io::Error,
    },
    /// The local address of a bound socket could not be read.
    #[error("cannot read the address of the DNS socket bound to {addr}: {source}")]
    LocalAddr { addr: SocketAddr, source: io::Error },
    /// Receiving on the UDP socket failed for good.
    #[error("receiving DNS queries over UDP on {addr} failed: {source}")]
    Receive { addr: SocketAddr, source: io::Error },
    /// Accepting TCP connections failed for good.
    #[error("accepting DNS connections over TCP on {addr} failed: {source}")]
    Accept { addr: SocketAddr, source: io::Error },
}

/// A bound DNS responder; [`Responder::run`] serves it.
pub struct Responder {
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
    addr: SocketAddr,
    handler: Arc<Handler>,
    tcp_connections: Arc<Semaphore>,
    tcp_timeout: Duration,
}

impl Responder {
    /// Binds UDP and TCP on `addr` (port 0: the same ephemeral port for both), answering from
    /// the snapshots `endpoints` sees.
    pub async fn bind(
        addr: SocketAddr,
        config: Config,
        endpoints: watch::Receiver<Endpoints>,
    ) -> Result<Responder, ServerError> {
        let zone = Zone::new(&config.zone, config.ttl, config.negative_ttl)?;
        let (udp, tcp, addr) = bind_pair(addr).await?;
        let forwarder = Forwarder::new(config.upstreams, config.forward_timeout);
        let handler = Handler::new(zone, endpoints, forwarder, config.max_forwards);
        log::info!("dns: answering {} on {addr} (UDP and TCP)", config.zone);
        Ok(Responder {
            udp: Arc::new(udp),
            tcp,
            addr,
            handler: Arc::new(handler),
            tcp_connections: Arc::new(Semaphore::new(config.max_tcp_connections)),
            tcp_timeout: config.tcp_timeout,
        })
    }

    /// The address both sockets are bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves queries until a socket fails for good (or the task is dropped or aborted).
    pub async fn run(self) -> Result<(), ServerError> {
        let Responder {
            udp,
            tcp,
            addr,
            handler,
            tcp_connections,
            tcp_timeout,
        } = self;
        let udp_loop = serve_udp(udp, addr, handler.clone());
        let tcp_loop = serve_tcp(tcp, addr, handler, tcp_connections, tcp_timeout);
        tokio::select! {
            r = udp_loop => r,
            r = tcp_loop => r,
        }
    }
}

/// A UDP socket and a TCP listener on the same address and port.
async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener, SocketAddr), ServerError> {
    let tries = if addr.port() == 0 { PORT_TRIES } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr,
                transport: "UDP",
                source,
            })?;
        let bound = udp
            .local_addr()
            .map_err(|source| ServerError::LocalAddr { addr, source })?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp, bound)),
            Err(source) => {
                last = Some(ServerError::Bind {
                    addr: bound,
                    transport: "TCP",
                    source,
                })
            }
        }
    }
    Err(last.unwrap_or(ServerError::Bind {
        addr,
        transport: "TCP",
        source: io::ErrorKind::AddrInUse.into(),
    }))
}

/// Answers datagrams: zone answers inline, forwards each in a task of its own.
async fn serve_udp(
    udp: Arc<UdpSocket>,
    addr: SocketAddr,
    handler: Arc<Handler>,
) -> Result<(), ServerError> {
    let mut buf = vec![0; MAX_QUERY + 1];
    let mut failures = 0u32;
    loop {
        let (n, peer) = match udp.recv_from(&mut buf).await {
            Ok(got) => {
                failures = 0;
                got
            }
            // ICMP errors from earlier answers surface here on Linux; they end nothing.
            Err(e) if failures < 100 => {
                failures += 1;
                log::debug!("dns: receiving on {addr}: {e}");
                continue;
            }
            Err(source) => return Err(ServerError::Receive { addr, source }),
        };
        match handler.decide(&buf[..n], Transport::Udp) {
            Outcome::Drop => {}
            Outcome::Reply(reply) => send(&udp, &reply, peer).await,
            // The place among the forwards is taken before the task is spawned: a flood of
            // queries spawns no more tasks than the limit.
            Outcome::Forward(query) => match handler.forward_permit() {
                None => {
                    if let Some(reply) = handler.too_busy(&query, Transport::Udp) {
                        send(&udp, &reply, peer).await;
                    }
                }
                Some(permit) => {
                    let (udp, handler) = (udp.clone(), handler.clone());
                    tokio::spawn(async move {
                        let reply = handler.forward_holding(&query, Transport::Udp, permit);
                        if let Some(reply) = reply.await {
                            send(&udp, &reply, peer).await;
                        }
                    });
                }
            },
        }
    }
}

async fn send(udp: &UdpSocket, reply: &[u8], peer: SocketAddr) {
    if let Err(e) = udp.send_to(reply, peer).await {
        log::debug!("dns: cannot answer {peer}: {e}");
    }
}

/// Accepts connections up to the limit; beyond it a new connection is closed at once.
async fn serve_tcp(
    tcp: TcpListener,
    addr: SocketAddr,
    handler: Arc<Handler>,
    connections: Arc<Semaphore>,
    idle: Duration,
) -> Result<(), ServerError> {
    let mut tasks = JoinSet::new();
    let mut failures = 0u32;
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(got) => {
                failures = 0;
                got
            }
            // Out of file descriptors and the like: wait a little rather than spin or stop.
            Err(e) if failures < 100 => {
                failures += 1;
                log::warn!("dns: accepting on {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(source) => return Err(ServerError::Accept { addr, source }),
        };
        while tasks.try_join_next().is_some() {}
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            log::warn!("dns: too many TCP connections; closing the one from {peer}");
            continue;
        };
        let handler = handler.clone();
        tasks.spawn(async move {
            if let Err(e) = serve_connection(stream, &handler, idle).await {
                log::debug!("dns: TCP connection from {peer}: {e}");
            }
            drop(permit);
        });
    }
}

/// Answers the queries of one connection in order until it closes, sends an oversized query,
/// or stays idle (or slow) past `idle`.
async fn serve_connection(
    mut stream: TcpStream,
    handler: &Handler,
    idle: Duration,
) -> io::Result<()> {
    loop {
        let len = match timeout(idle, stream.read_u16()).await {
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "idle")),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => usize::from(r?),
        };
        if len == 0 || len > MAX_QUERY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a query of {len} bytes"),
            ));
        }
        let mut query = vec![0; len];
        timeout(idle, stream.read_exact(&mut query))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "a query sent too slowly"))??;
        let Some(reply) = handler.handle(&query, Transport::Tcp).await else {
            continue;
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            log::warn!(
                "dns: an answer of {} bytes does not fit a TCP message",
                reply.len()
            );
            continue;
        };
        let mut framed = reply_len.to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        timeout(idle, stream.write_all(&framed))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client does not read"))??;
    }
}
