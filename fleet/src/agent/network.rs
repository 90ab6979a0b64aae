//! The agent's part in the container network: the machine's subnet of the cluster network
//! (claimed in etcd, see the module above), the host set up for it ([`HostNet`]: the subnet
//! fleet.toml names while the fleet has none), routes to the other hosts' subnets, and this
//! machine's service registrations and the DNS responder's view of every machine's.

use super::{Agent, Runtime};
use crate::hostnet::HostNet;
use crate::network::routes::{self as route_reports, RouteReport};
use crate::network::NetworkError;
use crate::services;
use crate::store::UnitStatus;
use crate::unit::UnitSpec;
use caisson_net::cluster::{Backend, Ipv4Net, NetworkConfig, SubnetRecord};
use caisson_net::endpoint::Endpoints;
use caisson_net::routes::{Peer, SyncReport};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often routes are synced although the peers did not change (someone may have removed
/// one by hand).
pub const ROUTES_RESYNC: Duration = Duration::from_secs(60);

/// The network state an agent keeps between ticks.
#[derive(Default)]
pub struct NetState {
    /// The host's network, when fleet.toml's `[network]` is enabled.
    pub host: Option<Arc<HostNet>>,
    /// The last error setting the host or its routes up (logged once until it changes).
    error: Option<String>,
    /// The peers whose routes were synced last, and when.
    synced: Option<(Vec<SubnetRecord>, Instant)>,
    /// What this machine registered for discovery.
    registrations: services::Registrations,
    /// The route report written last, and the lease it was written under.
    reported: Option<(i64, RouteReport)>,
}

impl NetState {
    pub fn new(host: Option<Arc<HostNet>>) -> NetState {
        NetState {
            host,
            ..Default::default()
        }
    }

    fn note(&mut self, r: Result<(), String>) {
        match r {
            Ok(()) => self.error = None,
            Err(text) => {
                if self.error.as_deref() != Some(text.as_str()) {
                    log::warn!("container network: {text}; trying again each tick");
                    self.error = Some(text);
                }
            }
        }
    }
}

impl<R: Runtime> Agent<R> {
    /// Claims this machine's subnet of the cluster network when the operator has set one and
    /// no claim holds under the current lease (see the module's doc). Errors are logged once
    /// each and retried on the next tick.
    pub(super) async fn claim_subnet(&mut self) {
        let lease = self.member.lease();
        if self.subnet.as_ref().and_then(|s| s.lease()) == Some(lease)
            && !self.verify_subnet().await
        {
            return;
        }
        let r = self.try_claim_subnet(lease).await;
        match r {
            Ok(Some((network, subnet))) => {
                log::info!("cluster network {network}: this machine holds subnet {subnet} (lease {lease:x})");
                self.subnet_error = None;
            }
            Ok(None) => self.subnet_error = None,
            // The next tick registers again, then claims under the new lease.
            Err(crate::network::NetworkError::LeaseExpired(_)) => {}
            Err(e) => {
                let text = e.to_string();
                if self.subnet_error.as_deref() != Some(text.as_str()) {
                    log::warn!("claiming this machine's subnet: {text}; trying again each tick");
                    self.subnet_error = Some(text);
                }
            }
        }
    }

    /// Every [`Agent::subnet_verify`]: true when the claim no longer stands (logged), so it
    /// must be made again.
    async fn verify_subnet(&mut self) -> bool {
        let due = self
            .subnet_verified
            .is_none_or(|t| t.elapsed() >= self.subnet_verify);
        let Some(claim) = self.subnet.as_mut().filter(|_| due) else {
            return false;
        };
        self.subnet_verified = Some(std::time::Instant::now());
        let held = claim
            .held()
            .map(|r| r.subnet.to_string())
            .unwrap_or_default();
        match claim.verify().await {
            Ok(true) => false,
            Ok(false) => {
                log::warn!(
                    "the claim on subnet {held} was changed or deleted in etcd; claiming again"
                );
                true
            }
            Err(e) => {
                log::debug!("checking the claim on subnet {held}: {e}");
                false
            }
        }
    }

    /// [`Agent::claim_subnet`]'s work: `Some((network, subnet))` when it claimed, `None` when
    /// there is no cluster network.
    async fn try_claim_subnet(
        &mut self,
        lease: i64,
    ) -> Result<Option<(String, String)>, crate::network::NetworkError> {
        let (client, keys) = (&self.store.client, &self.store.keys);
        let Some(config) = crate::network::config(client, keys).await? else {
            self.cluster_network = None;
            return Ok(None);
        };
        let claim = match &mut self.subnet {
            Some(s) => s,
            None => self.subnet.insert(crate::network::SubnetLease::new(
                client.clone(),
                keys.clone(),
                self.member.id(),
                &self.address,
                self.subnet_state.clone(),
            )?),
        };
        let r = claim.ensure(&config, lease).await?;
        self.cluster_network = Some(config);
        Ok(r.map(|r| (config.network.to_string(), r.subnet.to_string())))
    }

    /// Sets the host up for its subnet (the claimed one, or fleet.toml's while the fleet has no
    /// cluster network) and syncs the routes to the other hosts' subnets.
    pub(super) async fn tend_network(&mut self) {
        let Some(host) = self.net.host.clone() else {
            return;
        };
        let claimed = self
            .subnet
            .as_ref()
            .and_then(|s| s.held())
            .map(|r| r.subnet);
        let (subnet, cluster) = match (&self.cluster_network, claimed) {
            (Some(c), Some(subnet)) => (subnet, c.network),
            // The cluster network is set but this machine holds no subnet yet: bridge units wait.
            (Some(_), None) => return,
            (None, _) => (host.settings.subnet, host.settings.subnet),
        };
        let vxlan = matches!(
            self.cluster_network.as_ref().map(|c| &c.backend),
            Some(Backend::Vxlan { .. })
        );
        let r = host
            .configure(subnet, cluster, vxlan)
            .await
            .map(drop)
            .map_err(|e| e.to_string());
        self.net.note(r);
        if let Some(config) = self.cluster_network {
            let r = self.sync_routes(&host, &config, subnet).await;
            self.net.note(r);
        }
    }

    /// The routes to every other host's subnet, when the peers changed or every
    /// [`ROUTES_RESYNC`].
    async fn sync_routes(
        &mut self,
        host: &HostNet,
        config: &NetworkConfig,
        own: Ipv4Net,
    ) -> Result<(), String> {
        let (client, keys) = (&self.store.client, &self.store.keys);
        let mut peers = crate::network::peers(client, keys)
            .await
            .map_err(|e: NetworkError| e.to_string())?;
        peers.retain(|p| p.subnet != own);
        peers.sort_by_key(|p| p.subnet);
        let lease = self.member.lease();
        if self
            .net
            .synced
            .as_ref()
            .is_some_and(|(old, at)| *old == peers && at.elapsed() < ROUTES_RESYNC)
            && self.net.reported.as_ref().is_some_and(|(l, _)| *l == lease)
        {
            return Ok(());
        }
        let list: Vec<Peer> = peers
            .iter()
            .map(|p| Peer {
                subnet: p.subnet,
                public_ip: p.public_ip,
                vtep_mac: None,
            })
            .collect();
        let local = crate::network::machine_ip(&self.address);
        let synced = host
            .sync_routes(&config.backend, own, local, &list)
            .await
            .map_err(|e| e.to_string());
        self.report_routes(lease, route_report(own, &list, &synced))
            .await;
        let report = synced?;
        if report != Default::default() {
            log::info!("routes to the other hosts' subnets: {report:?}");
        }
        self.net.synced = Some((peers, Instant::now()));
        Ok(())
    }

    /// Writes the route report when it changed or the lease did. A failure is logged and the
    /// report tried again at the next sync of the routes (peers changed, or [`ROUTES_RESYNC`]).
    async fn report_routes(&mut self, lease: i64, report: RouteReport) {
        if self.net.reported.as_ref() == Some(&(lease, report.clone())) {
            return;
        }
        let (client, keys) = (&self.store.client, &self.store.keys);
        let key = keys.route_report(self.member.id());
        if let Err(e) = route_reports::report(client, keys, self.member.id(), lease, &report).await
        {
            log::warn!(
                "reporting this machine's routes at {key}: {e} (a machine role made before this \
                 version lacks the grant: caisson-fleet access machine <id> again)"
            );
        }
        self.net.reported = Some((lease, report));
    }

    /// Registers this machine's serving instances for discovery, gives the DNS responder every
    /// machine's and returns them (for the templates).
    pub(super) async fn register_services(
        &mut self,
        desired: &BTreeMap<String, (UnitSpec, i64)>,
        statuses: &BTreeMap<String, UnitStatus>,
    ) -> Result<Endpoints, String> {
        let me = self.member.id().to_string();
        // Container addresses reach across machines only over the cluster network.
        let reach = if self.cluster_network.is_some() {
            services::Reach::Routed
        } else {
            services::Reach::Published
        };
        let want = services::wanted(
            &me,
            crate::network::machine_ip(self.member.address()),
            reach,
            desired,
            statuses,
            |u| self.runtime.address(u),
        );
        let (client, keys) = (&self.store.client, &self.store.keys);
        self.net
            .registrations
            .sync(client, keys, &me, self.member.lease(), &want)
            .await
            .map_err(|e| e.to_string())?;
        let (endpoints, _invalid) = services::endpoints(client, keys)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(host) = &self.net.host {
            host.set_endpoints(endpoints.clone());
        }
        Ok(endpoints)
    }

    /// After the machine registered again under a new lease: its registrations went with the
    /// old one.
    pub(super) fn forget_registrations(&mut self) {
        self.net.registrations.clear();
    }
}

/// The state of the route to each peer's subnet after a sync.
fn route_report(own: Ipv4Net, peers: &[Peer], synced: &Result<SyncReport, String>) -> RouteReport {
    let routes = peers
        .iter()
        .map(|p| {
            let state = match synced {
                Err(e) => format!("error: {e}"),
                Ok(r) if r.foreign.contains(&p.subnet) => route_reports::FOREIGN.into(),
                Ok(_) => route_reports::OK.into(),
            };
            (p.subnet, state)
        })
        .collect();
    RouteReport {
        own: Some(own),
        routes,
    }
}
