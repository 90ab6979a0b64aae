//! The DNS responder of service discovery: every host runs one (on its bridge address, port 53,
//! UDP and TCP) that answers the cluster zone from the current [`Endpoints`] and forwards every
//! other name to the host's own resolvers.
//!
//! - `<unit>.caisson.` A: the unit's healthy instances' addresses, all of them, rotated by one
//!   per query.
//! - `<instance>.<unit>.caisson.` A: one instance.
//! - `_<port>._<tcp|udp>.<unit>.caisson.` SRV: priority 0, weight 1, the port, and the target
//!   `<instance>.<unit>.caisson.`, whose A record comes in the additional section (the layout of
//!   Consul and of Kubernetes' cluster DNS).
//! - An unknown name in the zone is NXDOMAIN, a known name without the asked type NOERROR with
//!   no answer (NODATA); both carry the zone's SOA, whose TTL and minimum are the negative TTL.
//! - Anything else goes to the upstreams in order, each over UDP first (over TCP when it
//!   truncates and the client asked over TCP; a UDP client gets the truncated answer and retries
//!   over TCP itself), each within [`Config::forward_timeout`]; SERVFAIL when none answers.
//! - Over UDP an answer larger than the client takes (512 bytes, or its EDNS size) loses its
//!   additional section, then all its records, with the TC bit set, so the client asks again
//!   over TCP.
//! - Bad input: a packet without a DNS header, a response, or one larger than 4 KiB is dropped;
//!   a query that does not decode is FORMERR, another opcode NOTIMP, an EDNS version other
//!   than 0 BADVERS. At most [`Config::max_forwards`] forwards are under way (beyond:
//!   SERVFAIL) and [`Config::max_tcp_connections`] TCP connections open (beyond: closed at
//!   once); a TCP connection idle or slow for [`Config::tcp_timeout`] is closed.
//!
//! Each query reads one whole snapshot: the agent replaces it with
//! `watch::Sender::send_replace`, and the next query sees the new one.
//!
//! # Usage
//!
//! ```no_run
//! use caisson_net::dns::{upstreams_from_resolv_conf, Config, Responder};
//! use caisson_net::endpoint::Endpoints;
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let addr = "10.42.1.1:53".parse()?;
//! let resolv = std::fs::read_to_string("/etc/resolv.conf")?;
//! let config = Config {
//!     upstreams: upstreams_from_resolv_conf(&resolv, Some(addr)),
//!     ..Config::default()
//! };
//! let (endpoints, rx) = tokio::sync::watch::channel(Endpoints::default());
//! let responder = Responder::bind(addr, config, rx).await?;
//! tokio::spawn(responder.run());
//! // Whenever the registrations in etcd change:
//! endpoints.send_replace(Endpoints::default());
//! # Ok(())
//! # }
//! ```

mod answer;
mod forward;
mod handler;
mod server;

pub use answer::ZoneError;
pub use forward::{upstreams_from_resolv_conf, ForwardError};
pub use server::{Responder, ServerError};

#[cfg(doc)]
use crate::endpoint::Endpoints;
use std::net::SocketAddr;
use std::time::Duration;

/// How a [`Responder`] answers; [`Config::default`] is the production setting without upstreams.
#[derive(Debug, Clone)]
pub struct Config {
    /// The cluster zone (`caisson.`).
    pub zone: String,
    /// The TTL of the zone's records, in seconds (5).
    pub ttl: u32,
    /// How long resolvers may cache NXDOMAIN and NODATA, in seconds (5).
    pub negative_ttl: u32,
    /// The resolvers other names are forwarded to, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// How long each upstream gets to answer (2 s).
    pub forward_timeout: Duration,
    /// Forwarded queries under way at once (256); beyond, SERVFAIL.
    pub max_forwards: usize,
    /// Open TCP connections (64); beyond, a new one is closed.
    pub max_tcp_connections: usize,
    /// How long a TCP connection may stay idle, or take to send a query or read an answer (10 s).
    pub tcp_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            zone: "caisson.".into(),
            ttl: 5,
            negative_ttl: 5,
            upstreams: Vec::new(),
            forward_timeout: Duration::from_secs(2),
            max_forwards: 256,
            max_tcp_connections: 64,
            tcp_timeout: Duration::from_secs(10),
        }
    }
}
