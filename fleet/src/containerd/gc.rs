//! Image garbage collection, so the state partition does not fill up over months of updates.
//!
//! The agent's namespace holds one image record per archive or registry reference it ran. A
//! record that no container uses and no wanted unit names is deleted, except the `keep` most
//! recently updated (a unit rolled back finds its image still here); containerd's own garbage
//! collector then frees the content and snapshots that nothing references any more (the last
//! delete waits for it). Archives downloaded for units no longer wanted leave the download
//! cache. It runs at most every [`Containerd::gc_interval`].

use super::{call, io, Containerd, ContainerdError};
use crate::unit::{Image, UnitSpec};
use containerd_client::services::v1 as api;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How many unused images are kept by default.
pub const DEFAULT_KEEP: usize = 3;
/// How often the agent collects by default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(600);

/// What one collection removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    /// Image records deleted, by name.
    pub images: Vec<String>,
    /// Cached archives removed.
    pub archives: Vec<PathBuf>,
}

impl Containerd {
    /// Collects if the last collection is older than [`Containerd::gc_interval`].
    pub async fn collect_if_due(&self, desired: &BTreeMap<String, UnitSpec>) {
        {
            let mut last = self.gc_last.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < self.gc_interval) {
                return;
            }
            *last = Some(Instant::now());
        }
        match self.collect_garbage(desired, self.gc_keep).await {
            Ok(c) if c.images.is_empty() && c.archives.is_empty() => {}
            Ok(c) => log::info!(
                "removed {} unused image(s) ({}) and {} cached archive(s)",
                c.images.len(),
                c.images.join(", "),
                c.archives.len()
            ),
            Err(e) => log::warn!("collecting unused images: {e}"),
        }
    }

    /// Deletes the image records no container uses and no unit in `desired` names, but the
    /// `keep` most recently updated, and the cached archives of URLs no unit in `desired` names.
    pub async fn collect_garbage(
        &self,
        desired: &BTreeMap<String, UnitSpec>,
        keep: usize,
    ) -> Result<Collected, ContainerdError> {
        let conn = self.connect().await?;
        let containers = conn
            .containers()
            .list(conn.req(api::ListContainersRequest { filters: vec![] }))
            .await
            .map_err(call("container list", &self.namespace))?
            .into_inner()
            .containers;
        let mut used: BTreeSet<String> = containers.into_iter().map(|c| c.image).collect();
        let mut wanted_archives = BTreeSet::new();
        for spec in desired.values() {
            match &spec.image {
                Image::Ref { reference, .. } => {
                    used.insert(reference.clone());
                }
                Image::Url { url, sha256, .. } => {
                    if let Ok(p) = self.cache_path(url, sha256) {
                        wanted_archives.insert(p);
                    }
                }
                Image::Path { .. } => {}
            }
        }
        let mut images = api::images_client::ImagesClient::new(conn.channel.clone());
        let mut unused: Vec<api::Image> = images
            .list(conn.req(api::ListImagesRequest { filters: vec![] }))
            .await
            .map_err(call("image list", &self.namespace))?
            .into_inner()
            .images
            .into_iter()
            .filter(|i| !used.contains(&i.name))
            .collect();
        // Newest first; the first `keep` stay.
        unused.sort_by_key(|i| {
            std::cmp::Reverse(i.updated_at.as_ref().map(|t| (t.seconds, t.nanos)))
        });
        let doomed: Vec<api::Image> = unused.into_iter().skip(keep).collect();
        let mut out = Collected::default();
        for (n, image) in doomed.iter().enumerate() {
            // Only while it still points where it did: a pull may just have moved it.
            let r = images
                .delete(conn.req(api::DeleteImageRequest {
                    name: image.name.clone(),
                    sync: n + 1 == doomed.len(),
                    target: image.target.clone(),
                }))
                .await;
            match r {
                Ok(_) => out.images.push(image.name.clone()),
                Err(s) if s.code() == containerd_client::tonic::Code::NotFound => {}
                Err(s) => return Err(call("image delete", &image.name)(s)),
            }
        }
        self.forget_pulls(&out.images);
        out.archives = self.prune_cache(&wanted_archives)?;
        Ok(out)
    }

    /// Removes the cached archives not in `wanted`.
    fn prune_cache(&self, wanted: &BTreeSet<PathBuf>) -> Result<Vec<PathBuf>, ContainerdError> {
        let entries = match std::fs::read_dir(&self.cache_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.cache_dir)(e)),
        };
        let mut removed = Vec::new();
        for entry in entries {
            let path = entry.map_err(io(&self.cache_dir))?.path();
            let archive = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(".oci.tar"));
            if archive && !wanted.contains(&path) {
                std::fs::remove_file(&path).map_err(io(&path))?;
                removed.push(path);
            }
        }
        Ok(removed)
    }
}
