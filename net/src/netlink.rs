//! A netlink connection (`rtnetlink` over tokio) into one network namespace, the host's or
//! one opened through [`crate::netns`] (the socket is opened by a thread inside the namespace
//! and stays there), with the few link and address helpers [`crate::link`] and
//! [`crate::routes`] share. Every error names the link and the namespace.

use crate::netns::{NetNs, NetnsError};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec};
use std::net::{IpAddr, Ipv4Addr};

pub(crate) const ENODEV: i32 = 19;
pub(crate) const EEXIST: i32 = 17;
pub(crate) const ESRCH: i32 = 3;

/// What can go wrong talking netlink.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// A netlink request was refused.
    #[error("netlink {op} on {link} in {netns}: {source}")]
    Request {
        op: &'static str,
        link: String,
        netns: String,
        source: Box<rtnetlink::Error>,
    },
    /// The netlink socket could not be opened.
    #[error("cannot open a netlink socket in {netns}: {source}")]
    Connect {
        netns: String,
        source: std::io::Error,
    },
    /// Called outside a tokio runtime.
    #[error("netlink in {netns} needs a tokio runtime (call it from async code)")]
    NoRuntime { netns: String },
    /// A namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A link that must exist does not.
    #[error("link {link} not found in {netns}")]
    Missing { link: String, netns: String },
}

/// A netlink connection into one network namespace.
pub struct Netlink {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
    netns: String,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink")
            .field("netns", &self.netns)
            .finish_non_exhaustive()
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Netlink {
    /// A connection into the calling thread's namespace (the host's, for the agent).
    pub fn current() -> Result<Netlink, NetlinkError> {
        let netns = String::from("the host namespace");
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(NetlinkError::NoRuntime { netns });
        }
        Self::spawn(netns, rtnetlink::new_connection())
    }

    /// A connection into `ns`: the socket is opened by a thread inside it and stays there.
    pub fn in_netns(ns: &NetNs) -> Result<Netlink, NetlinkError> {
        let netns = ns.path().display().to_string();
        let rt = tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime {
            netns: netns.clone(),
        })?;
        let conn = ns.run(|| {
            let _guard = rt.enter();
            rtnetlink::new_connection()
        })?;
        Self::spawn(netns, conn)
    }

    #[allow(clippy::type_complexity)]
    fn spawn(
        netns: String,
        conn: std::io::Result<(
            rtnetlink::proto::Connection<rtnetlink::packet_route::RouteNetlinkMessage>,
            Handle,
            futures::channel::mpsc::UnboundedReceiver<(
                rtnetlink::packet_core::NetlinkMessage<
                    rtnetlink::packet_route::RouteNetlinkMessage,
                >,
                rtnetlink::sys::SocketAddr,
            )>,
        )>,
    ) -> Result<Netlink, NetlinkError> {
        let (conn, handle, _) = conn.map_err(|source| NetlinkError::Connect {
            netns: netns.clone(),
            source,
        })?;
        let task = tokio::spawn(conn);
        Ok(Netlink {
            handle,
            task,
            netns,
        })
    }

    /// The rtnetlink handle, for requests this module has no helper for.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Which namespace this connection is in, for messages.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    pub(crate) fn err(
        &self,
        op: &'static str,
        link: impl Into<String>,
    ) -> impl FnOnce(rtnetlink::Error) -> NetlinkError + '_ {
        let link = link.into();
        move |source| NetlinkError::Request {
            op,
            link,
            netns: self.netns.clone(),
            source: Box::new(source),
        }
    }

    /// The link called `name`, if there is one.
    pub async fn find(&self, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(self.err("get link", name)(e)),
        }
    }

    /// The index of the link called `name`, which must exist.
    pub async fn index(&self, name: &str) -> Result<u32, NetlinkError> {
        match self.find(name).await? {
            Some(link) => Ok(link.header.index),
            None => Err(NetlinkError::Missing {
                link: name.into(),
                netns: self.netns.clone(),
            }),
        }
    }

    /// Brings the link at `index` (called `name`) up.
    pub async fn set_up(&self, index: u32, name: &str) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(self.err("set up", name))
    }

    /// Deletes the link called `name`; `false` if there was none.
    pub async fn delete(&self, name: &str) -> Result<bool, NetlinkError> {
        let Some(link) = self.find(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.header.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(false),
            Err(e) => Err(self.err("delete link", name)(e)),
        }
    }

    /// Puts `addr/prefix` on the link (kept if it is there already); with `exclusive`, other
    /// IPv4 addresses on it go.
    pub async fn ensure_address(
        &self,
        index: u32,
        name: &str,
        addr: Ipv4Net,
        exclusive: bool,
    ) -> Result<(), NetlinkError> {
        let mut present = false;
        for msg in self.addresses(index, name).await? {
            let (a, prefix) = (address_of(&msg), msg.header.prefix_len);
            if a == Some(addr.addr()) && prefix == addr.prefix_len() {
                present = true;
            } else if exclusive && a.is_some() {
                log::info!(
                    "{name} in {}: removing stale address {a:?}/{prefix}",
                    self.netns
                );
                let del = self.handle.address().del(msg).execute().await;
                del.map_err(self.err("delete address", name))?;
            }
        }
        if present {
            return Ok(());
        }
        let add = self
            .handle
            .address()
            .add(index, IpAddr::V4(addr.addr()), addr.prefix_len());
        match add.execute().await {
            Err(e) if errno(&e) != Some(EEXIST) => Err(self.err("add address", name)(e)),
            _ => Ok(()),
        }
    }

    async fn addresses(&self, index: u32, name: &str) -> Result<Vec<AddressMessage>, NetlinkError> {
        let req = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let all: Vec<AddressMessage> = req.try_collect().await.map_err(self.err("list", name))?;
        Ok(all
            .into_iter()
            .filter(|m| m.header.family == AddressFamily::Inet)
            .collect())
    }
}

/// The errno of a refused request (positive, e.g. 17 for EEXIST).
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

/// The kind of a link (`bridge`, `veth`, `vxlan`), if it says.
pub(crate) fn kind_of(link: &LinkMessage) -> Option<InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(kind) => Some(kind.clone()),
            _ => None,
        }),
        _ => None,
    })
}

fn address_of(msg: &AddressMessage) -> Option<Ipv4Addr> {
    msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(IpAddr::V4(v4)) | AddressAttribute::Address(IpAddr::V4(v4)) => {
            Some(*v4)
        }
        _ => None,
    })
}
