//! Importing an OCI archive into containerd: its blobs into the content store with the
//! garbage-collection labels containerd's own unpacker sets, its layers applied onto a chain of
//! snapshots named by chain ID, and an image record.
//!
//! Nothing in the archive is trusted: the manifest must list as many layers as the config's
//! `rootfs.diff_ids`, and each layer must unpack to its diff_id (containerd's Diff.Apply
//! computes it) before its snapshot is committed under the chain ID, as containerd's own
//! unpacker checks. Otherwise an archive could plant its content under another image's chain ID.
//!
//! The same steps store an image pulled from a registry ([`super::pull`]): only where the
//! blobs' bytes come from differs ([`Blobs`]).

use super::archive::{self, Archive, ArchiveError, Chosen};
use super::{call, descriptor, found, nanos, Conn, Containerd, ContainerdError, Imported};
use crate::distribution::Repository;
use containerd_client::services::v1 as api;
use containerd_client::services::v1::snapshots as snap;
use containerd_client::tonic::Code;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// Where the bytes of an image's blobs come from.
pub(super) enum Blobs<'a> {
    Archive(&'a Archive),
    /// A registry repository; the manifest and config, already fetched, by digest.
    Registry {
        repo: &'a Repository,
        fetched: &'a HashMap<String, Vec<u8>>,
    },
}

impl Blobs<'_> {
    /// The archive's path or the image reference, for messages.
    pub(super) fn source(&self) -> String {
        match self {
            Blobs::Archive(a) => a.path().display().to_string(),
            Blobs::Registry { repo, .. } => repo.reference.whole(),
        }
    }
}

impl Containerd {
    /// Imports the image of an OCI archive (idempotent). `name` picks the image in the
    /// archive; `fallback` names the image record when the archive does not.
    pub async fn import(
        &self,
        path: &Path,
        name: Option<&str>,
        fallback: &str,
    ) -> Result<Imported, ContainerdError> {
        let (conn, lease) = self.leased("import").await?;
        let r = self.import_with(&conn, path, name, fallback).await;
        self.release(&conn, &lease).await;
        r
    }

    pub(super) async fn import_with(
        &self,
        conn: &Conn,
        path: &Path,
        name: Option<&str>,
        fallback: &str,
    ) -> Result<Imported, ContainerdError> {
        let archive = Archive::open(path)?;
        let chosen = archive.choose(name)?;
        let image_name = chosen
            .name
            .clone()
            // A bare tag ("1.0") is no image name.
            .filter(|n| (n.contains('/') || n.contains(':')) && !n.starts_with(':'))
            .unwrap_or_else(|| format!("caisson.local/{fallback}:latest"));
        self.store_image(
            conn,
            &Blobs::Archive(&archive),
            chosen,
            &image_name,
            HashMap::new(),
        )
        .await
    }

    /// Writes an image's blobs to the content store (with containerd's garbage-collection
    /// labels), unpacks its layers and points the image record `image_name` at it.
    pub(super) async fn store_image(
        &self,
        conn: &Conn,
        blobs: &Blobs<'_>,
        chosen: Chosen,
        image_name: &str,
        image_labels: HashMap<String, String>,
    ) -> Result<Imported, ContainerdError> {
        let chains = archive::chain_ids(&chosen.config.rootfs.diff_ids);
        let top = chains.last().cloned().unwrap_or_default();
        let m = &chosen.manifest;
        // Layers are labelled with their uncompressed digest only once unpacking proved it.
        for layer in &m.layers {
            self.write_blob(conn, blobs, layer, &[]).await?;
        }
        let mut config_labels = Vec::new();
        if !top.is_empty() {
            config_labels.push((
                format!("containerd.io/gc.ref.snapshot.{}", self.snapshotter),
                top.clone(),
            ));
        }
        self.write_blob(conn, blobs, &m.config, &config_labels)
            .await?;
        let mut manifest_labels = vec![(
            "containerd.io/gc.ref.content.config".to_string(),
            m.config.digest.clone(),
        )];
        for (i, l) in m.layers.iter().enumerate() {
            manifest_labels.push((
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.clone(),
            ));
        }
        self.write_blob(conn, blobs, &chosen.target, &manifest_labels)
            .await?;
        self.unpack(conn, blobs, &chosen, &chains).await?;
        self.put_image(conn, image_name, &chosen.target, image_labels)
            .await?;
        Ok(Imported {
            name: image_name.to_string(),
            digest: chosen.target.digest.clone(),
            top,
            chosen,
        })
    }

    async fn put_image(
        &self,
        conn: &Conn,
        name: &str,
        target: &archive::Descriptor,
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        let mut paths = vec!["target".to_string()];
        paths.extend(labels.keys().map(|k| format!("labels.{k}")));
        let image = api::Image {
            name: name.to_string(),
            target: Some(descriptor(target)),
            labels,
            ..Default::default()
        };
        let mut images = api::images_client::ImagesClient::new(conn.channel.clone());
        let created = images
            .create(conn.req(api::CreateImageRequest {
                image: Some(image.clone()),
                ..Default::default()
            }))
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => images
                .update(conn.req(api::UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask { paths }),
                    ..Default::default()
                }))
                .await
                .map(|_| ())
                .map_err(call("image update", name)),
            Err(s) => Err(call("image create", name)(s)),
        }
    }

    /// Writes one blob to the content store unless it is there; sets its labels either way.
    async fn write_blob(
        &self,
        conn: &Conn,
        blobs: &Blobs<'_>,
        desc: &archive::Descriptor,
        labels: &[(String, String)],
    ) -> Result<(), ContainerdError> {
        let labels: HashMap<String, String> = labels.iter().cloned().collect();
        let mut content = conn.content();
        // Held by the lease before it is looked at: then it cannot go in between.
        self.protect(conn, "content", &desc.digest).await?;
        let info = found(
            content
                .info(conn.req(api::InfoRequest {
                    digest: desc.digest.clone(),
                }))
                .await
                .map_err(call("content info", &desc.digest)),
        )?;
        if info.is_some() {
            if labels.is_empty() {
                return Ok(());
            }
            let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
            content
                .update(conn.req(api::UpdateRequest {
                    info: Some(api::Info {
                        digest: desc.digest.clone(),
                        labels,
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                }))
                .await
                .map_err(call("content update", &desc.digest))?;
            return Ok(());
        }
        match blobs {
            Blobs::Archive(archive) => self.write_from_archive(conn, archive, desc, labels).await,
            Blobs::Registry { repo, fetched } => match fetched.get(&desc.digest) {
                Some(bytes) => self.write_bytes(conn, desc, bytes, labels).await,
                None => self.write_from_registry(conn, repo, desc, labels).await,
            },
        }
    }

    /// Streams a blob from an archive into the content store.
    async fn write_from_archive(
        &self,
        conn: &Conn,
        archive: &Archive,
        desc: &archive::Descriptor,
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        let archive_path = |a: &Archive| a.path().display().to_string();
        let mut content = conn.content();
        let (mut reader, size) = archive.blob(&desc.digest)?;
        if i64::try_from(size).ok() != Some(desc.size) {
            return Err(ContainerdError::Archive(ArchiveError::Digest {
                path: archive_path(archive),
                digest: desc.digest.clone(),
            }));
        }
        // Read in chunks on a blocking thread, send them as one Write stream, Commit last.
        let (tx, rx) = tokio::sync::mpsc::channel::<api::WriteContentRequest>(4);
        let digest = desc.digest.clone();
        let reference = format!("caisson-import-{digest}");
        let total = desc.size;
        let reader_task = tokio::task::spawn_blocking(move || -> Result<(), std::io::Error> {
            let mut offset: i64 = 0;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = reader.read(&mut buf)?;
                let last = n == 0;
                let msg = api::WriteContentRequest {
                    action: if last {
                        api::WriteAction::Commit
                    } else {
                        api::WriteAction::Write
                    } as i32,
                    r#ref: reference.clone(),
                    total,
                    expected: digest.clone(),
                    offset,
                    data: buf[..n].to_vec(),
                    labels: if last { labels.clone() } else { HashMap::new() },
                };
                offset += n as i64;
                if tx.blocking_send(msg).is_err() || last {
                    return Ok(());
                }
            }
        });
        let stream =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
            );
        let written = async {
            let mut responses = content
                .write(conn.req(stream))
                .await
                .map_err(call("content write", &desc.digest))?
                .into_inner();
            while responses
                .message()
                .await
                .map_err(call("content write", &desc.digest))?
                .is_some()
            {}
            Ok::<(), ContainerdError>(())
        }
        .await;
        let read = reader_task.await;
        match written {
            Err(e) if e.code() == Some(Code::AlreadyExists) => {}
            other => other?,
        }
        match read {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ContainerdError::Io {
                path: archive_path(archive),
                message: format!("blob {}: {e}", desc.digest),
            }),
            Err(e) => Err(ContainerdError::Io {
                path: archive_path(archive),
                message: format!("blob {}: {e}", desc.digest),
            }),
        }
    }

    /// Applies each layer onto its parent's snapshot, committing it under its chain ID. A layer
    /// whose chain is already there is not applied again.
    async fn unpack(
        &self,
        conn: &Conn,
        blobs: &Blobs<'_>,
        chosen: &Chosen,
        chains: &[String],
    ) -> Result<(), ContainerdError> {
        let diff_ids = &chosen.config.rootfs.diff_ids;
        let mut parent = String::new();
        for ((layer, chain), diff_id) in chosen.manifest.layers.iter().zip(chains).zip(diff_ids) {
            self.protect(conn, &format!("snapshots/{}", self.snapshotter), chain)
                .await?;
            if !self.has_snapshot(conn, chain).await? {
                self.apply_layer(conn, blobs, layer, diff_id, &parent, chain)
                    .await?;
            }
            parent = chain.clone();
        }
        Ok(())
    }

    pub(super) async fn has_snapshot(
        &self,
        conn: &Conn,
        key: &str,
    ) -> Result<bool, ContainerdError> {
        let mut snapshots = conn.snapshots();
        let stat = snapshots.stat(conn.req(snap::StatSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        }));
        Ok(found(stat.await.map_err(call("snapshot stat", key)))?.is_some())
    }

    /// Applies one layer in a new snapshot on `parent` and commits it as `chain`, but only when
    /// what it unpacked to is the image config's `diff_id` for it (as containerd's own unpacker
    /// checks): otherwise an archive could plant any content under another image's chain ID.
    /// The layer's blob gets its `containerd.io/uncompressed` label only once that holds.
    async fn apply_layer(
        &self,
        conn: &Conn,
        blobs: &Blobs<'_>,
        layer: &archive::Descriptor,
        diff_id: &str,
        parent: &str,
        chain: &str,
    ) -> Result<(), ContainerdError> {
        let key = format!("caisson-extract-{}-{chain}", nanos());
        let mounts = conn
            .snapshots()
            .prepare(conn.req(snap::PrepareSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.clone(),
                parent: parent.to_string(),
                labels: HashMap::new(),
            }))
            .await
            .map_err(call("snapshot prepare", &key))?
            .into_inner()
            .mounts;
        let committed = async {
            let applied = api::diff_client::DiffClient::new(conn.channel.clone())
                .apply(conn.req(api::ApplyRequest {
                    diff: Some(descriptor(layer)),
                    mounts,
                    ..Default::default()
                }))
                .await
                .map_err(call("diff apply (unpacking layer)", &layer.digest))?
                .into_inner()
                .applied
                .map(|d| d.digest)
                .unwrap_or_default();
            if applied != diff_id {
                return Err(ContainerdError::Archive(ArchiveError::DiffId {
                    path: blobs.source(),
                    layer: layer.digest.clone(),
                    expected: diff_id.to_string(),
                    got: applied,
                }));
            }
            conn.snapshots()
                .commit(conn.req(snap::CommitSnapshotRequest {
                    snapshotter: self.snapshotter.clone(),
                    name: chain.to_string(),
                    key: key.clone(),
                    labels: HashMap::new(),
                }))
                .await
                .map_err(call("snapshot commit", chain))?;
            Ok(())
        }
        .await;
        if let Err(e) = committed {
            let _ = self.remove_snapshot(conn, &key).await;
            if e.code() != Some(Code::AlreadyExists) {
                return Err(e);
            }
        }
        let labels = [(
            "containerd.io/uncompressed".to_string(),
            diff_id.to_string(),
        )];
        self.write_blob(conn, blobs, layer, &labels).await
    }
}
