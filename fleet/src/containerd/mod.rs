//! The containerd runtime: the agent's containers through containerd's gRPC API.
//!
//! - Images: an OCI archive (a path on the machine, or an HTTP URL checked against its sha256
//!   and cached, downloaded in the background within a deadline and a size cap: [`fetch`])
//!   is imported into containerd: its blobs written to the content store with the
//!   garbage-collection labels containerd's own unpacker sets, its layers applied
//!   (Diff.Apply) onto a chain of snapshots named by chain ID, and an image record created.
//!   Everything already present is skipped, so importing again is cheap and idempotent.
//! - Containers: one per unit, id = unit name, in the agent's own namespace (default
//!   `caisson`), with a runtime spec made by [`spec`] and a writable snapshot of the image, run
//!   by `io.containerd.runc.v2` with stdout and stderr appended to `<log_dir>/<unit>.log`.
//!   The unit name, spec hash and restart count live in the container's labels, so the agent
//!   needs no state of its own.
//!
//! Work that creates content or snapshots runs under a containerd lease, so the garbage
//! collector never takes a half-imported image.

pub mod archive;
mod exec;
pub mod fetch;
pub mod gc;
mod import;
mod ingest;
pub mod pull;
pub mod spec;
mod tasks;
pub mod volumes;

use crate::agent::{Container, Runtime, RuntimeError};
use crate::unit::{Network, UnitSpec};
use archive::{ArchiveError, Chosen};
use containerd_client::services::v1 as api;
use containerd_client::services::v1::snapshots as snap;
use containerd_client::tonic::{self, metadata::MetadataValue, transport::Channel, Code, Request};
use containerd_client::types::Descriptor;
pub use fetch::FetchLimits;
use spec::SpecError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What went wrong talking to containerd.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    /// The host's network could not take the unit in.
    #[error("unit {unit}: network: {source}")]
    Network {
        unit: String,
        #[source]
        source: Box<crate::hostnet::HostNetError>,
    },
    /// The socket cannot be reached.
    #[error("connecting to containerd at {socket}: {message} (is containerd running?)")]
    Connect { socket: String, message: String },
    /// A call failed.
    #[error("containerd {op} {what}: {message} ({code:?})")]
    Call {
        op: &'static str,
        what: String,
        code: Code,
        message: String,
    },
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A local file (log, cache) cannot be read or written.
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    /// An image download failed or did not match its sha256.
    #[error("fetching image {url}: {message}")]
    Fetch { url: String, message: String },
    /// The image is being downloaded in the background.
    #[error("downloading image {url}")]
    Downloading { url: String },
    /// A registry image could not be pulled (unreachable, unauthorised, cut off).
    #[error("pulling image {reference}: {message}")]
    Pull { reference: String, message: String },
    /// A registry sent content that does not match its digest, passes a cap or contradicts
    /// itself: nothing of it is run.
    #[error("pulling image {reference}: {message}")]
    Refused { reference: String, message: String },
    /// A command run in a container (a health check) could not run or did not finish.
    #[error("health check in unit {unit}'s container: {message}")]
    Exec { unit: String, message: String },
    /// The namespace is not a valid gRPC metadata value.
    #[error("containerd namespace {namespace:?} is not valid")]
    Namespace { namespace: String },
}

impl ContainerdError {
    fn code(&self) -> Option<Code> {
        match self {
            ContainerdError::Call { code, .. } => Some(*code),
            _ => None,
        }
    }
}

fn call(
    op: &'static str,
    what: impl std::fmt::Display,
) -> impl FnOnce(tonic::Status) -> ContainerdError {
    let what = what.to_string();
    move |s| ContainerdError::Call {
        op,
        what,
        code: s.code(),
        message: s.message().to_string(),
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ContainerdError + '_ {
    move |e| ContainerdError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// `Ok(None)` for a NotFound answer.
fn found<T>(r: Result<T, ContainerdError>) -> Result<Option<T>, ContainerdError> {
    match r {
        Err(e) if e.code() == Some(Code::NotFound) => Ok(None),
        other => other.map(Some),
    }
}

/// Labels on the agent's containers.
pub const LABEL_UNIT: &str = "caisson.unit";
pub const LABEL_HASH: &str = "caisson.spec-hash";
pub const LABEL_RESTARTS: &str = "caisson.restarts";
/// `bridge` on a container in its own network namespace on the host's bridge.
pub const LABEL_NETWORK: &str = "caisson.network";
const RUNTIME: &str = "io.containerd.runc.v2";
const SPEC_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// Host files bound read-only into every container (host network: same resolver and hosts).
const HOST_FILES: [&str; 2] = ["/etc/resolv.conf", "/etc/hosts"];
/// The exit code reported for a container whose task is gone (containerd restarted, reboot).
pub const LOST_TASK_EXIT: u32 = 255;

/// containerd at a socket, in a namespace.
#[derive(Debug, Clone)]
pub struct Containerd {
    pub socket: PathBuf,
    pub namespace: String,
    /// The snapshotter that unpacks images (`overlayfs`).
    pub snapshotter: String,
    /// Where each unit's output goes (`<unit>.log`).
    pub log_dir: PathBuf,
    /// Where images fetched over HTTP are kept (`<sha256>.oci.tar`).
    pub cache_dir: PathBuf,
    /// Where units' volumes live (`<unit>/<name>`, see [`volumes`]).
    pub volume_root: PathBuf,
    /// How long a container has to exit after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// The deadline and size cap of each image download or pull.
    pub fetch_limits: FetchLimits,
    /// Downloads running in the background (see [`fetch`]).
    downloads: fetch::Downloads,
    /// How the machine reaches registries (see [`pull`]).
    pub registries: std::sync::Arc<crate::distribution::Registries>,
    /// How often a registry image's tag is looked up again.
    pub image_poll: Duration,
    /// Registry pulls: what each reference resolved to, and those under way.
    pulls: pull::Pulls,
    /// How many unused images garbage collection keeps ([`gc`]).
    pub gc_keep: usize,
    /// How often garbage collection runs.
    pub gc_interval: Duration,
    gc_last: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// The host's container network; `None`: bridge units get a namespace with loopback only.
    pub network: Option<std::sync::Arc<crate::hostnet::HostNet>>,
}

impl ContainerdError {
    /// The host's subnet is not known yet: the unit waits, it has not failed.
    fn waiting_for_network(&self) -> bool {
        matches!(self, ContainerdError::Network { source, .. }
            if matches!(**source, crate::hostnet::HostNetError::NotConfigured))
    }
}

/// An imported image.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The image record's name.
    pub name: String,
    /// The manifest digest.
    pub digest: String,
    /// The snapshot of the whole layer stack (its chain ID).
    pub top: String,
    pub chosen: Chosen,
}

/// A connection with the namespace (and maybe a lease) to put on every request.
struct Conn {
    channel: Channel,
    namespace: MetadataValue<tonic::metadata::Ascii>,
    lease: Option<MetadataValue<tonic::metadata::Ascii>>,
    /// The lease's id, to add what is already there to it ([`Containerd::protect`]).
    lease_id: Option<String>,
}

impl Conn {
    fn req<T>(&self, m: T) -> Request<T> {
        let mut r = Request::new(m);
        let md = r.metadata_mut();
        md.insert("containerd-namespace", self.namespace.clone());
        if let Some(l) = &self.lease {
            md.insert("containerd-lease", l.clone());
        }
        r
    }
    fn content(&self) -> api::content_client::ContentClient<Channel> {
        api::content_client::ContentClient::new(self.channel.clone())
    }
    fn snapshots(&self) -> snap::snapshots_client::SnapshotsClient<Channel> {
        snap::snapshots_client::SnapshotsClient::new(self.channel.clone())
    }
    fn containers(&self) -> api::containers_client::ContainersClient<Channel> {
        api::containers_client::ContainersClient::new(self.channel.clone())
    }
    fn tasks(&self) -> api::tasks_client::TasksClient<Channel> {
        api::tasks_client::TasksClient::new(self.channel.clone())
    }
}

fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// RFC 3339 UTC time of a Unix timestamp (for the lease's expiry label).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

impl Containerd {
    /// containerd at `socket`, the agent's containers in `namespace`, with the machine's
    /// default directories (`/var/log/caisson/fleet`, `/var/lib/caisson/fleet/images`).
    pub fn new(socket: impl Into<PathBuf>, namespace: impl Into<String>) -> Containerd {
        Containerd {
            socket: socket.into(),
            namespace: namespace.into(),
            snapshotter: "overlayfs".into(),
            log_dir: "/var/log/caisson/fleet".into(),
            cache_dir: "/var/lib/caisson/fleet/images".into(),
            volume_root: volumes::DEFAULT_ROOT.into(),
            stop_timeout: Duration::from_secs(10),
            fetch_limits: FetchLimits::default(),
            downloads: fetch::Downloads::default(),
            registries: Default::default(),
            image_poll: pull::DEFAULT_POLL,
            pulls: pull::Pulls::default(),
            gc_keep: gc::DEFAULT_KEEP,
            gc_interval: gc::DEFAULT_INTERVAL,
            gc_last: Default::default(),
            network: None,
        }
    }

    async fn connect(&self) -> Result<Conn, ContainerdError> {
        let err = |message: String| ContainerdError::Connect {
            socket: self.socket.display().to_string(),
            message,
        };
        let channel = tokio::time::timeout(
            Duration::from_secs(10),
            containerd_client::connect(&self.socket),
        )
        .await
        .map_err(|_| err("timed out".into()))?
        .map_err(|e| {
            err(format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            ))
        })?;
        let namespace = self
            .namespace
            .parse()
            .map_err(|_| ContainerdError::Namespace {
                namespace: self.namespace.clone(),
            })?;
        Ok(Conn {
            channel,
            namespace,
            lease: None,
            lease_id: None,
        })
    }

    /// Connects and takes a lease (expiring in an hour should the agent die holding it).
    async fn leased(&self, purpose: &str) -> Result<(Conn, String), ContainerdError> {
        let mut conn = self.connect().await?;
        let id = format!("caisson-{purpose}-{}", nanos());
        let expire = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 3600;
        let labels = HashMap::from([("containerd.io/gc.expire".to_string(), rfc3339(expire))]);
        api::leases_client::LeasesClient::new(conn.channel.clone())
            .create(conn.req(api::CreateRequest {
                id: id.clone(),
                labels,
            }))
            .await
            .map_err(call("lease create", &id))?;
        conn.lease = id.parse().ok();
        conn.lease_id = Some(id.clone());
        Ok((conn, id))
    }

    /// Adds a blob or snapshot that is already there to the connection's lease, so that
    /// containerd's garbage collector (which may be running after another import let go of it)
    /// keeps it until the image that will reference it is recorded. `kind`: `content` or
    /// `snapshots/<snapshotter>`.
    async fn protect(&self, conn: &Conn, kind: &str, id: &str) -> Result<(), ContainerdError> {
        let Some(lease) = &conn.lease_id else {
            return Ok(());
        };
        api::leases_client::LeasesClient::new(conn.channel.clone())
            .add_resource(conn.req(api::AddResourceRequest {
                id: lease.clone(),
                resource: Some(api::Resource {
                    id: id.to_string(),
                    r#type: kind.to_string(),
                }),
            }))
            .await
            .map_err(call("lease add", id))?;
        Ok(())
    }

    async fn release(&self, conn: &Conn, id: &str) {
        let r = api::leases_client::LeasesClient::new(conn.channel.clone())
            .delete(conn.req(api::DeleteRequest {
                id: id.to_string(),
                sync: false,
            }))
            .await;
        if let Err(e) = r {
            log::warn!("containerd: deleting lease {id}: {}", e.message());
        }
    }

    async fn remove_snapshot(&self, conn: &Conn, key: &str) -> Result<(), ContainerdError> {
        found(
            conn.snapshots()
                .remove(conn.req(snap::RemoveSnapshotRequest {
                    snapshotter: self.snapshotter.clone(),
                    key: key.to_string(),
                }))
                .await
                .map_err(call("snapshot remove", key)),
        )
        .map(|_| ())
    }

    fn log_path(&self, unit: &str) -> PathBuf {
        self.log_dir.join(format!("{unit}.log"))
    }

    /// Imports the unit's image, creates its container and starts its task.
    pub async fn create_and_start(
        &self,
        spec: &UnitSpec,
        spec_hash: &str,
    ) -> Result<(), ContainerdError> {
        // A registry image was pulled by `prepare`; an archive is imported here.
        let pulled = match pull::reference_of(spec) {
            Some((reference, resolved)) => Ok(self.pulled(reference, resolved)?),
            None => Err(self.archive_of(spec).await?),
        };
        let (conn, lease) = self.leased("start").await?;
        let r = async {
            let image = match pulled {
                Ok(image) => image,
                Err((path, name)) => {
                    self.import_with(&conn, &path, name.as_deref(), &spec.name)
                        .await?
                }
            };
            self.create_container(&conn, spec, spec_hash, &image).await
        }
        .await;
        self.release(&conn, &lease).await;
        r?;
        let conn = self.connect().await?;
        let started = async {
            if spec.network == Network::Bridge {
                self.attach(&spec.name).await?;
            }
            self.start_task(&conn, &spec.name, true).await
        };
        if let Err(e) = started.await {
            // Leave nothing half-made: the next reconciliation starts from scratch.
            let _ = self.delete(&conn, &spec.name).await;
            return Err(e);
        }
        Ok(())
    }

    async fn create_container(
        &self,
        conn: &Conn,
        spec: &UnitSpec,
        spec_hash: &str,
        image: &Imported,
    ) -> Result<(), ContainerdError> {
        let id = spec.name.clone();
        let host_files: Vec<&str> = HOST_FILES
            .iter()
            .copied()
            .filter(|f| Path::new(f).exists())
            .collect();
        volumes::prepare(&self.volume_root, spec, &image.chosen.config.config)?;
        let mut runtime_spec = spec::runtime_spec(
            spec,
            &image.chosen.config.config,
            &self.namespace,
            &host_files,
            &self.volume_root,
        )?;
        let bridge = spec.network == Network::Bridge;
        if bridge {
            let net = self.network.as_ref();
            spec::join_network(
                &mut runtime_spec,
                net.map(|n| n.netns_path(&id)).as_deref(),
                net.map(|n| n.resolv_conf()).as_deref(),
            );
        }
        // A snapshot left by an earlier failed attempt would make Prepare fail.
        self.remove_snapshot(conn, &id).await?;
        conn.snapshots()
            .prepare(conn.req(snap::PrepareSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: id.clone(),
                parent: image.top.clone(),
                labels: HashMap::new(),
            }))
            .await
            .map_err(call("snapshot prepare", &id))?;
        let labels = HashMap::from([
            (LABEL_UNIT.to_string(), id.clone()),
            (LABEL_HASH.to_string(), spec_hash.to_string()),
            (LABEL_RESTARTS.to_string(), "0".to_string()),
        ]);
        let mut labels = labels;
        if bridge {
            labels.insert(LABEL_NETWORK.to_string(), "bridge".to_string());
        }
        let container = api::Container {
            id: id.clone(),
            labels,
            image: image.name.clone(),
            runtime: Some(api::container::Runtime {
                name: RUNTIME.into(),
                options: None,
            }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE.into(),
                value: runtime_spec.to_string().into_bytes(),
            }),
            snapshotter: self.snapshotter.clone(),
            snapshot_key: id.clone(),
            ..Default::default()
        };
        conn.containers()
            .create(conn.req(api::CreateContainerRequest {
                container: Some(container),
            }))
            .await
            .map_err(call("container create", &id))?;
        Ok(())
    }

    fn runtime_error(&self, unit: &str, e: ContainerdError) -> RuntimeError {
        match e {
            ContainerdError::Connect { socket, message } => RuntimeError::Unavailable {
                endpoint: socket,
                message,
            },
            e @ ContainerdError::Network { .. } if e.waiting_for_network() => {
                RuntimeError::Pending {
                    unit: unit.to_string(),
                    message: e.to_string(),
                }
            }
            e @ ContainerdError::Downloading { .. } => RuntimeError::Pending {
                unit: unit.to_string(),
                message: e.to_string(),
            },
            other => RuntimeError::Unit {
                unit: unit.to_string(),
                message: other.to_string(),
            },
        }
    }
}

fn descriptor(d: &archive::Descriptor) -> Descriptor {
    Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        annotations: HashMap::new(),
    }
}

impl Runtime for Containerd {
    async fn list(&self) -> Result<Vec<Container>, RuntimeError> {
        self.containers().await.map_err(|e| match e {
            ContainerdError::Connect { socket, message } => RuntimeError::Unavailable {
                endpoint: socket,
                message,
            },
            other => RuntimeError::Unavailable {
                endpoint: self.socket.display().to_string(),
                message: other.to_string(),
            },
        })
    }
    fn pin(&self, spec: &UnitSpec) -> UnitSpec {
        Containerd::pin(self, spec)
    }
    async fn tidy(&self, desired: &std::collections::BTreeMap<String, UnitSpec>) {
        if let Some(net) = &self.network {
            if let Err(e) = net.publish(desired.values()) {
                log::warn!("publishing the units' ports: {e}");
            }
        }
        self.collect_if_due(desired).await
    }
    fn address(&self, unit: &str) -> std::net::IpAddr {
        self.network
            .as_ref()
            .and_then(|n| n.address(unit))
            .map_or_else(crate::agent::health::loopback, std::net::IpAddr::V4)
    }
    async fn refresh(&self, spec: &UnitSpec) {
        if let Some((reference, resolved)) = pull::reference_of(spec) {
            // Errors are reported when the unit is started from it.
            let _ = self.prepare_ref(reference, resolved).await;
        }
    }
    async fn prepare(&self, spec: &UnitSpec) -> Result<(), RuntimeError> {
        self.prepare_image(spec)
            .await
            .map_err(|e| self.runtime_error(&spec.name, e))
    }
    async fn start(&self, spec: &UnitSpec, spec_hash: &str) -> Result<(), RuntimeError> {
        self.create_and_start(spec, spec_hash)
            .await
            .map_err(|e| self.runtime_error(&spec.name, e))
    }
    async fn restart(&self, unit: &str) -> Result<(), RuntimeError> {
        self.restart_unit(unit)
            .await
            .map_err(|e| self.runtime_error(unit, e))
    }
    async fn delete_volumes(&self, unit: &str) -> Result<bool, RuntimeError> {
        volumes::delete(&self.volume_root, unit).map_err(|e| self.runtime_error(unit, e))
    }
    async fn remove(&self, unit: &str) -> Result<(), RuntimeError> {
        let r = async {
            let conn = self.connect().await?;
            self.delete(&conn, unit).await
        };
        r.await.map_err(|e| self.runtime_error(unit, e))?;
        if let Some(net) = &self.network {
            if let Err(e) = net.detach(unit).await {
                log::warn!("unit {unit}: taking it off the host's network: {e}");
            }
        }
        Ok(())
    }
    async fn logs(&self, unit: &str, lines: usize) -> Result<Vec<String>, RuntimeError> {
        self.tail(unit, lines)
            .map_err(|e| self.runtime_error(unit, e))
    }
    async fn exec(
        &self,
        unit: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<i32, RuntimeError> {
        self.exec_in(unit, argv, timeout)
            .await
            .map_err(|e| self.runtime_error(unit, e))
    }
    async fn stop_task(&self, unit: &str) -> Result<(), RuntimeError> {
        self.stop(unit)
            .await
            .map(drop)
            .map_err(|e| self.runtime_error(unit, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn tail_of_missing_and_present_logs() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Containerd::new("/nonexistent.sock", "caisson");
        c.log_dir = dir.path().into();
        assert!(c.tail("web", 5).unwrap().is_empty());
        std::fs::write(dir.path().join("web.log"), "a\nb\nc\n").unwrap();
        assert_eq!(c.tail("web", 2).unwrap(), ["b", "c"]);
    }

    #[tokio::test]
    async fn a_missing_socket_is_unavailable() {
        let c = Containerd::new("/nonexistent/containerd.sock", "caisson");
        let e = c.list().await.unwrap_err();
        assert!(matches!(e, RuntimeError::Unavailable { .. }), "{e}");
        assert!(
            e.to_string().contains("/nonexistent/containerd.sock"),
            "{e}"
        );
    }
}
