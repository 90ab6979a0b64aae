//! Images from OCI registries (a unit's `[image] ref`), pulled into containerd's content store.
//!
//! - Resolving: the reference's manifest (or index, followed to linux/amd64) and image config
//!   are fetched whole under their size caps and checked against their digests; the manifest
//!   must list as many layers as the config's `diff_ids`, and all the layers together must fit
//!   the agent's `image_max_bytes`.
//! - Blobs stream from the registry into a containerd ingest named after the digest
//!   (`caisson-pull-<digest>`); containerd checks size and digest at commit. A connection cut
//!   mid-blob resumes where the ingest stands (a `Range` request), also after an agent restart;
//!   a blob that does not match its digest is refused and its ingest dropped, so nothing of it
//!   is run or kept ([`super::ingest`]). Layers are then unpacked as for archives (checked
//!   against `diff_ids`).
//! - One pull at a time per machine, and one per image whatever the number of units naming it:
//!   pulls run in the background ([`Containerd::prepare_image`]), keyed by reference, so a slow
//!   registry holds up no other unit. A tag is looked up again every `image_poll_s`; when it
//!   moved, the new image is pulled while the old container runs, then the unit is replaced
//!   (its spec, pinned to the digest, changed: [`Containerd::pin`]).
//! - The image record is named by the reference and labelled with the digest it resolved to,
//!   so an agent that restarts while the registry is down runs what it pulled before.

use super::archive::{self, pick_platform, Chosen, ImageConfig, Index, Manifest};
use super::import::Blobs;
use super::{call, found, Conn, Containerd, ContainerdError, Imported};
use crate::distribution::{
    parse_reference, valid_digest, DistributionError, Fetched, Reference, Repository, CONFIG_MAX,
    INDEX_TYPES, MANIFEST_TYPES,
};
use crate::unit::{Image, UnitSpec};
use containerd_client::services::v1 as api;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// The image record label holding the digest the reference resolved to (index or manifest).
pub const LABEL_REF_DIGEST: &str = "caisson.ref-digest";
/// How often a tag is looked up again by default (`image_poll_s`).
pub const DEFAULT_POLL: Duration = Duration::from_secs(300);

/// An image pulled from a registry.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The digest the reference resolved to: a unit's spec is pinned to it.
    pub ref_digest: String,
    pub image: Imported,
}

#[derive(Debug)]
enum Pull {
    Running(JoinHandle<Result<Pulled, ContainerdError>>),
    Failed { error: String, at: Instant },
}

/// The pulls of a [`Containerd`] (shared by its clones): what each reference last resolved to,
/// and the pulls under way or failed.
#[derive(Debug, Clone, Default)]
pub struct Pulls {
    known: Arc<Mutex<HashMap<String, (Pulled, Instant)>>>,
    tasks: Arc<Mutex<HashMap<String, Pull>>>,
    /// One pull at a time: they share bandwidth and maybe layers (one ingest per digest).
    one_at_a_time: Arc<tokio::sync::Mutex<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A registry error: content that does not match its digest or passes a cap is refused, the
/// rest (unreachable, unauthorised) is a failed pull.
pub(super) fn pull_error(reference: &str) -> impl Fn(DistributionError) -> ContainerdError + '_ {
    move |e| {
        let (reference, message) = (reference.to_string(), e.to_string());
        match e {
            DistributionError::Digest { .. } | DistributionError::TooLarge { .. } => {
                ContainerdError::Refused { reference, message }
            }
            _ => ContainerdError::Pull { reference, message },
        }
    }
}

impl Containerd {
    /// The unit with its registry image pinned to the digest this machine pulled for it (none
    /// yet: unpinned). The agent compares containers against pinned specs, so a tag that moved
    /// replaces the unit's container once the new image is here.
    pub fn pin(&self, spec: &UnitSpec) -> UnitSpec {
        let mut spec = spec.clone();
        if let Image::Ref {
            reference,
            resolved,
        } = &mut spec.image
        {
            *resolved = self.known(reference).map(|p| p.ref_digest);
        }
        spec
    }

    /// Forgets what deleted image records were pulled for.
    pub(super) fn forget_pulls(&self, references: &[String]) {
        let mut known = lock(&self.pulls.known);
        for r in references {
            known.remove(r);
        }
    }

    fn known(&self, reference: &str) -> Option<Pulled> {
        lock(&self.pulls.known)
            .get(reference)
            .map(|(p, _)| p.clone())
    }

    /// Starts (in the background, once) what a registry image needs: `Ok` while the image the
    /// unit is pinned to is here; [`ContainerdError::Downloading`] while the first pull runs.
    /// A tag is looked up again every [`Containerd::image_poll`], the current image staying in
    /// use meanwhile; a failed pull is reported, and tried again after
    /// [`super::fetch::FETCH_RETRY`].
    pub(super) async fn prepare_ref(
        &self,
        reference: &str,
        resolved: Option<&str>,
    ) -> Result<(), ContainerdError> {
        let known = lock(&self.pulls.known).get(reference).cloned();
        let usable = known
            .as_ref()
            .is_some_and(|(p, _)| resolved.is_none_or(|r| r == p.ref_digest));
        let due = match &known {
            None => true,
            // A digest never moves.
            Some(_) if reference.contains('@') => false,
            Some((_, at)) => at.elapsed() >= self.image_poll,
        };
        let outcome = {
            let mut tasks = lock(&self.pulls.tasks);
            match tasks.get(reference) {
                Some(Pull::Running(t)) if !t.is_finished() => None,
                Some(Pull::Failed { error, at }) if at.elapsed() < super::fetch::FETCH_RETRY => {
                    Some(Err(error.clone()))
                }
                _ => match tasks.remove(reference) {
                    Some(Pull::Running(t)) => Some(Ok(t)),
                    _ => {
                        if due {
                            let this = self.clone();
                            let r = reference.to_string();
                            tasks.insert(
                                reference.to_string(),
                                Pull::Running(tokio::spawn(async move { this.pull(&r).await })),
                            );
                            log::info!("pulling image {reference} in the background");
                        }
                        None
                    }
                },
            }
        };
        match outcome {
            None | Some(Err(_)) if usable => {}
            None => {}
            Some(Err(error)) => {
                return Err(ContainerdError::Pull {
                    reference: reference.to_string(),
                    message: error,
                })
            }
            Some(Ok(task)) => {
                let done = task
                    .await
                    .map_err(|e| ContainerdError::Pull {
                        reference: reference.to_string(),
                        message: e.to_string(),
                    })
                    .and_then(|r| r);
                match done {
                    Ok(p) => {
                        if known
                            .as_ref()
                            .is_some_and(|(k, _)| k.ref_digest != p.ref_digest)
                        {
                            log::info!("image {reference} moved to {}", p.ref_digest);
                        }
                        lock(&self.pulls.known)
                            .insert(reference.to_string(), (p.clone(), Instant::now()));
                        return if resolved.is_none_or(|r| r == p.ref_digest) {
                            Ok(())
                        } else {
                            Err(ContainerdError::Downloading {
                                url: reference.to_string(),
                            })
                        };
                    }
                    Err(e) => {
                        let error = match &e {
                            ContainerdError::Pull { message, .. }
                            | ContainerdError::Refused { message, .. } => message.clone(),
                            other => other.to_string(),
                        };
                        log::warn!("{e}");
                        let at = Instant::now();
                        lock(&self.pulls.tasks)
                            .insert(reference.to_string(), Pull::Failed { error, at });
                        if !usable {
                            return Err(e);
                        }
                    }
                }
            }
        }
        if usable {
            Ok(())
        } else {
            Err(ContainerdError::Downloading {
                url: reference.to_string(),
            })
        }
    }

    /// The image a pinned unit runs: the one pulled for its reference at its digest.
    pub(super) fn pulled(
        &self,
        reference: &str,
        resolved: Option<&str>,
    ) -> Result<Imported, ContainerdError> {
        match (self.known(reference), resolved) {
            (Some(p), Some(r)) if p.ref_digest == r => Ok(p.image),
            _ => Err(ContainerdError::Downloading {
                url: reference.to_string(),
            }),
        }
    }

    /// Resolves `reference` and pulls what is not here yet, within the agent's deadline. When
    /// the registry cannot be reached, the image pulled before for this reference (if any)
    /// is used, with a warning.
    pub async fn pull(&self, reference: &str) -> Result<Pulled, ContainerdError> {
        let _one = self.pulls.one_at_a_time.lock().await;
        let deadline = self.fetch_limits.deadline;
        let pulled = tokio::time::timeout(deadline, self.pull_now(reference))
            .await
            .unwrap_or_else(|_| {
                Err(ContainerdError::Pull {
                    reference: reference.to_string(),
                    message: format!(
                        "not complete after {deadline:?} (the agent's image_timeout_s)"
                    ),
                })
            });
        // Only a registry out of reach falls back: refused content stands refused.
        match pulled {
            Err(e @ ContainerdError::Pull { .. }) => match self.local_image(reference).await {
                Ok(Some(p)) => {
                    log::warn!("{e}; using the image pulled before ({})", p.ref_digest);
                    Ok(p)
                }
                _ => Err(e),
            },
            other => other,
        }
    }

    async fn pull_now(&self, reference: &str) -> Result<Pulled, ContainerdError> {
        let parsed = parse_reference(reference).map_err(pull_error(reference))?;
        let repo = self
            .registries
            .repository(&parsed)
            .map_err(pull_error(reference))?;
        let want = parsed.digest().or(parsed.tag()).unwrap_or("latest");
        let top = repo.manifest(want).await.map_err(pull_error(reference))?;
        if let Some(p) = self.known(reference).filter(|p| p.ref_digest == top.digest) {
            return Ok(p);
        }
        let (conn, lease) = self.leased("pull").await?;
        let r = self.pull_with(&conn, &repo, &parsed, reference, top).await;
        self.release(&conn, &lease).await;
        r
    }

    async fn pull_with(
        &self,
        conn: &Conn,
        repo: &Repository,
        parsed: &Reference,
        reference: &str,
        top: Fetched,
    ) -> Result<Pulled, ContainerdError> {
        let bad = |message: String| ContainerdError::Refused {
            reference: reference.to_string(),
            message,
        };
        let ref_digest = top.digest.clone();
        let mut fetched = HashMap::new();
        let mut manifest = top;
        // Follow an index (at most two levels) to its linux/amd64 manifest.
        for _ in 0..3 {
            if !is_index(&manifest) {
                break;
            }
            let index: Index = serde_json::from_slice(&manifest.bytes)
                .map_err(|e| bad(format!("index {}: {e}", manifest.digest)))?;
            let d = pick_platform(&index.manifests)
                .ok_or_else(|| bad("the index has no linux/amd64 image".into()))?;
            check_digest(&d.digest).map_err(&bad)?;
            manifest = repo
                .manifest(&d.digest)
                .await
                .map_err(pull_error(reference))?;
        }
        if is_index(&manifest) {
            return Err(bad("indexes nest too deep".into()));
        }
        let m: Manifest = serde_json::from_slice(&manifest.bytes)
            .map_err(|e| bad(format!("manifest {}: {e}", manifest.digest)))?;
        for d in std::iter::once(&m.config).chain(&m.layers) {
            check_digest(&d.digest).map_err(&bad)?;
            if d.size < 0 {
                return Err(bad(format!("blob {} has a negative size", d.digest)));
            }
        }
        let total: u64 = m.layers.iter().map(|l| l.size as u64).sum();
        if total > self.fetch_limits.max_bytes {
            return Err(bad(format!(
                "its layers hold {total} bytes: the cap is {} (the agent's image_max_bytes)",
                self.fetch_limits.max_bytes
            )));
        }
        // A config containerd already holds (checked against its digest when it was written)
        // is not fetched again: an image whose blobs are all here costs one manifest request.
        self.protect(conn, "content", &m.config.digest).await?;
        let config: ImageConfig = match self.read_json(conn, &m.config.digest).await {
            Ok(c) => c,
            Err(_) => {
                let bytes = repo
                    .small_blob(&m.config.digest, CONFIG_MAX)
                    .await
                    .map_err(pull_error(reference))?;
                let c = serde_json::from_slice(&bytes)
                    .map_err(|e| bad(format!("image config {}: {e}", m.config.digest)))?;
                fetched.insert(m.config.digest.clone(), bytes);
                c
            }
        };
        if config.rootfs.diff_ids.len() != m.layers.len() {
            return Err(bad(format!(
                "the manifest lists {} layer(s) but the image config's rootfs.diff_ids lists {}; refusing the image",
                m.layers.len(),
                config.rootfs.diff_ids.len()
            )));
        }
        let target = archive::Descriptor {
            media_type: if MANIFEST_TYPES.contains(&manifest.media_type.as_str()) {
                manifest.media_type.clone()
            } else {
                MANIFEST_TYPES[0].to_string()
            },
            digest: manifest.digest.clone(),
            size: manifest.bytes.len() as i64,
            annotations: Default::default(),
            platform: None,
        };
        fetched.insert(manifest.digest.clone(), manifest.bytes);
        let chosen = Chosen {
            name: Some(parsed.whole()),
            target,
            manifest: m,
            config,
        };
        let labels = HashMap::from([(LABEL_REF_DIGEST.to_string(), ref_digest.clone())]);
        let blobs = Blobs::Registry {
            repo,
            fetched: &fetched,
        };
        let image = self
            .store_image(conn, &blobs, chosen, reference, labels)
            .await?;
        log::info!("pulled image {reference} ({ref_digest})");
        Ok(Pulled { ref_digest, image })
    }

    /// The image pulled before for `reference`, from containerd's image record and content
    /// store, if it is whole (its top snapshot there).
    pub async fn local_image(&self, reference: &str) -> Result<Option<Pulled>, ContainerdError> {
        let conn = self.connect().await?;
        let got = found(
            api::images_client::ImagesClient::new(conn.channel.clone())
                .get(conn.req(api::GetImageRequest {
                    name: reference.to_string(),
                }))
                .await
                .map_err(call("image get", reference)),
        )?;
        let Some(image) = got.and_then(|g| g.into_inner().image) else {
            return Ok(None);
        };
        let (Some(target), Some(ref_digest)) = (image.target, image.labels.get(LABEL_REF_DIGEST))
        else {
            return Ok(None);
        };
        let manifest: Manifest = self.read_json(&conn, &target.digest).await?;
        let config: ImageConfig = self.read_json(&conn, &manifest.config.digest).await?;
        let chains = archive::chain_ids(&config.rootfs.diff_ids);
        let top = chains.last().cloned().unwrap_or_default();
        if config.rootfs.diff_ids.len() != manifest.layers.len()
            || !self.has_snapshot(&conn, &top).await?
        {
            return Ok(None);
        }
        let chosen = Chosen {
            name: Some(reference.to_string()),
            target: archive::Descriptor {
                media_type: target.media_type,
                digest: target.digest.clone(),
                size: target.size,
                annotations: Default::default(),
                platform: None,
            },
            manifest,
            config,
        };
        Ok(Some(Pulled {
            ref_digest: ref_digest.clone(),
            image: Imported {
                name: reference.to_string(),
                digest: target.digest,
                top,
                chosen,
            },
        }))
    }

    /// A small blob of the content store, parsed.
    async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        conn: &Conn,
        digest: &str,
    ) -> Result<T, ContainerdError> {
        let mut stream = conn
            .content()
            .read(conn.req(api::ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(call("content read", digest))?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(m) = stream
            .message()
            .await
            .map_err(call("content read", digest))?
        {
            bytes.extend_from_slice(&m.data);
            if bytes.len() as u64 > CONFIG_MAX {
                return Err(ContainerdError::Io {
                    path: digest.to_string(),
                    message: "larger than an image config or manifest may be".into(),
                });
            }
        }
        serde_json::from_slice(&bytes).map_err(|e| ContainerdError::Io {
            path: digest.to_string(),
            message: e.to_string(),
        })
    }
}

fn is_index(f: &Fetched) -> bool {
    if INDEX_TYPES.contains(&f.media_type.as_str()) {
        return true;
    }
    if MANIFEST_TYPES.contains(&f.media_type.as_str()) {
        return false;
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        manifests: Option<serde_json::Value>,
    }
    serde_json::from_slice::<Probe>(&f.bytes).is_ok_and(|p| p.manifests.is_some())
}

fn check_digest(d: &str) -> Result<(), String> {
    if valid_digest(d) {
        Ok(())
    } else {
        Err(format!(
            "digest {d:?} is not sha256: and 64 lower-case hex digits"
        ))
    }
}

/// The registry image of a unit, if it names one: its reference and pinned digest.
pub fn reference_of(spec: &UnitSpec) -> Option<(&str, Option<&str>)> {
    match &spec.image {
        Image::Ref {
            reference,
            resolved,
        } => Some((reference.as_str(), resolved.as_deref())),
        _ => None,
    }
}
