//! OCI image layout archives (`oci-archive:` tars as `skopeo copy` or `buildah push` write
//! them): the index, the chosen manifest, its config and layers, read in place from the tar.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Why an OCI archive cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The file cannot be read or is not a tar.
    #[error("reading OCI archive {path}: {message}")]
    Read { path: String, message: String },
    /// A required file is missing from the archive.
    #[error("OCI archive {path}: no {entry} in the archive (is it an OCI image layout tar?)")]
    Missing { path: String, entry: String },
    /// A JSON document does not parse.
    #[error("OCI archive {path}: {entry}: {message}")]
    Json {
        path: String,
        entry: String,
        message: String,
    },
    /// The archive holds no image, or several and none was named.
    #[error("OCI archive {path}: {message}")]
    Choice { path: String, message: String },
    /// A blob's content does not match its digest.
    #[error("OCI archive {path}: blob {digest} does not match its digest")]
    Digest { path: String, digest: String },
    /// The manifest and the image config disagree on how many layers the image has.
    #[error("OCI archive {path}: the manifest lists {layers} layer(s) but the image config's rootfs.diff_ids lists {diff_ids}; refusing the image")]
    LayerCount {
        path: String,
        layers: usize,
        diff_ids: usize,
    },
    /// A layer does not unpack to the uncompressed digest the image config gives it.
    #[error("OCI archive {path}: layer {layer} unpacks to {got:?}, but the image config's rootfs.diff_ids says {expected}; refusing the image")]
    DiffId {
        path: String,
        layer: String,
        expected: String,
        got: String,
    },
}

/// A content descriptor (OCI image spec).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// A descriptor's platform.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

/// An image index (or Docker manifest list).
#[derive(Debug, Deserialize)]
pub struct Index {
    pub manifests: Vec<Descriptor>,
}

/// An image manifest.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// The parts of the image config the runtime uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub config: RunConfig,
    pub rootfs: RootFs,
}

/// How the image wants to be run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
}

/// The uncompressed layer digests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RootFs {
    pub diff_ids: Vec<String>,
}

/// The media types of an image index (OCI and Docker).
use crate::distribution::INDEX_TYPES;
const NAME_ANNOTATIONS: [&str; 2] = [
    "io.containerd.image.name",
    "org.opencontainers.image.ref.name",
];

/// An OCI archive, indexed: where each entry's bytes sit in the tar.
#[derive(Debug)]
pub struct Archive {
    path: PathBuf,
    entries: BTreeMap<String, (u64, u64)>,
}

/// The image chosen in an archive.
#[derive(Debug, Clone)]
pub struct Chosen {
    /// Its name in the archive, if it has one.
    pub name: Option<String>,
    /// The manifest's descriptor (the top of the image).
    pub target: Descriptor,
    pub manifest: Manifest,
    pub config: ImageConfig,
}

impl Archive {
    /// Reads the tar's headers.
    pub fn open(path: &Path) -> Result<Archive, ArchiveError> {
        let read = |e: std::io::Error| ArchiveError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let file = File::open(path).map_err(read)?;
        let mut tar = tar::Archive::new(file);
        let mut entries = BTreeMap::new();
        for entry in tar.entries().map_err(read)? {
            let entry = entry.map_err(read)?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry.path().map_err(read)?.to_string_lossy().to_string();
            let name = name.trim_start_matches("./").to_string();
            entries.insert(name, (entry.raw_file_position(), entry.size()));
        }
        Ok(Archive {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// The archive's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn display(&self) -> String {
        self.path.display().to_string()
    }

    fn blob_entry(digest: &str) -> String {
        format!("blobs/{}", digest.replacen(':', "/", 1))
    }

    /// A reader over one entry's bytes.
    pub fn reader(&self, entry: &str) -> Result<(impl Read, u64), ArchiveError> {
        let (pos, size) = *self
            .entries
            .get(entry)
            .ok_or_else(|| ArchiveError::Missing {
                path: self.display(),
                entry: entry.to_string(),
            })?;
        let read = |e: std::io::Error| ArchiveError::Read {
            path: self.display(),
            message: format!("{entry}: {e}"),
        };
        let mut f = File::open(&self.path).map_err(read)?;
        f.seek(SeekFrom::Start(pos)).map_err(read)?;
        Ok((f.take(size), size))
    }

    /// A blob's reader and size.
    pub fn blob(&self, digest: &str) -> Result<(impl Read, u64), ArchiveError> {
        self.reader(&Self::blob_entry(digest))
    }

    /// A small entry, read whole; blobs are checked against their digest.
    fn read_small(&self, entry: &str, digest: Option<&str>) -> Result<Vec<u8>, ArchiveError> {
        let (mut r, _) = self.reader(entry)?;
        let mut buf = Vec::new();
        r.read_to_end(&mut buf).map_err(|e| ArchiveError::Read {
            path: self.display(),
            message: format!("{entry}: {e}"),
        })?;
        if let Some(d) = digest {
            if sha256_digest(&buf) != d {
                return Err(ArchiveError::Digest {
                    path: self.display(),
                    digest: d.to_string(),
                });
            }
        }
        Ok(buf)
    }

    /// A blob parsed as JSON.
    pub fn blob_json<T: for<'de> Deserialize<'de>>(&self, digest: &str) -> Result<T, ArchiveError> {
        let entry = Self::blob_entry(digest);
        let bytes = self.read_small(&entry, Some(digest))?;
        self.parse(&entry, &bytes)
    }

    fn parse<T: for<'de> Deserialize<'de>>(
        &self,
        entry: &str,
        b: &[u8],
    ) -> Result<T, ArchiveError> {
        serde_json::from_slice(b).map_err(|e| ArchiveError::Json {
            path: self.display(),
            entry: entry.to_string(),
            message: e.to_string(),
        })
    }

    /// Picks the image: the one named `name` (full name or tag), else the only one.
    /// Nested indexes are followed to their linux/amd64 (or only) manifest.
    pub fn choose(&self, name: Option<&str>) -> Result<Chosen, ArchiveError> {
        let index: Index = self.parse("index.json", &self.read_small("index.json", None)?)?;
        let named = |d: &Descriptor| {
            NAME_ANNOTATIONS
                .iter()
                .find_map(|a| d.annotations.get(*a).cloned())
        };
        let candidates: Vec<&Descriptor> = match name {
            Some(n) => index
                .manifests
                .iter()
                .filter(|d| {
                    NAME_ANNOTATIONS
                        .iter()
                        .any(|a| d.annotations.get(*a).is_some_and(|v| v == n))
                })
                .collect(),
            None => index.manifests.iter().collect(),
        };
        let top = match candidates.as_slice() {
            [one] => *one,
            [] => {
                return Err(self.choice(match name {
                    Some(n) => format!("no image named {n:?} in the archive"),
                    None => "the archive's index.json lists no image".into(),
                }))
            }
            many => {
                let names: Vec<String> = many.iter().filter_map(|d| named(d)).collect();
                return Err(self.choice(format!(
                    "{} images in the archive ({}); name one with image.name in the unit",
                    many.len(),
                    names.join(", ")
                )));
            }
        };
        let image_name = named(top);
        let mut target = top.clone();
        // Follow indexes down to a manifest.
        for _ in 0..4 {
            if !INDEX_TYPES.contains(&target.media_type.as_str()) {
                break;
            }
            let nested: Index = self.blob_json(&target.digest)?;
            target = pick_platform(&nested.manifests)
                .ok_or_else(|| self.choice("no linux/amd64 image in the archive's index".into()))?
                .clone();
        }
        let manifest: Manifest = self.blob_json(&target.digest)?;
        let config: ImageConfig = self.blob_json(&manifest.config.digest)?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(ArchiveError::LayerCount {
                path: self.display(),
                layers: manifest.layers.len(),
                diff_ids: config.rootfs.diff_ids.len(),
            });
        }
        Ok(Chosen {
            name: image_name,
            target: Descriptor {
                annotations: BTreeMap::new(),
                platform: None,
                ..target
            },
            manifest,
            config,
        })
    }

    fn choice(&self, message: String) -> ArchiveError {
        ArchiveError::Choice {
            path: self.display(),
            message,
        }
    }
}

/// The linux/amd64 manifest of an index, or its only one.
pub fn pick_platform(ds: &[Descriptor]) -> Option<&Descriptor> {
    let amd64 = ds.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    });
    amd64.or(match ds {
        [one] => Some(one),
        _ => None,
    })
}

pub use crate::distribution::sha256_digest;

/// The chain IDs of a layer stack (OCI image spec): the snapshot names, bottom first.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256_digest(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_spec() {
        let a = "sha256:aa".to_string();
        let b = "sha256:bb".to_string();
        let ids = chain_ids(&[a.clone(), b]);
        assert_eq!(ids[0], a);
        assert_eq!(ids[1], sha256_digest(b"sha256:aa sha256:bb"));
        assert!(chain_ids(&[]).is_empty());
    }

    fn add(t: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        t.append_data(&mut h, name, data).unwrap();
    }

    fn blob(t: &mut tar::Builder<Vec<u8>>, data: &[u8]) -> String {
        let d = sha256_digest(data);
        add(t, &format!("blobs/sha256/{}", &d[7..]), data);
        d
    }

    #[test]
    fn chooses_the_named_or_only_image() {
        let mut t = tar::Builder::new(Vec::new());
        let layer = b"not really a tar";
        let l = blob(&mut t, layer);
        let config = format!(
            r#"{{"config":{{"Cmd":["/bin/sh"],"Env":["A=1"]}},"rootfs":{{"type":"layers","diff_ids":["{l}"]}}}}"#
        );
        let c = blob(&mut t, config.as_bytes());
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{c}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{l}","size":{}}}]}}"#,
            config.len(),
            layer.len()
        );
        let m = blob(&mut t, manifest.as_bytes());
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{m}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"x:1"}}}}]}}"#,
            manifest.len()
        );
        add(&mut t, "./index.json", index.as_bytes());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        std::fs::write(&path, t.into_inner().unwrap()).unwrap();
        let a = Archive::open(&path).unwrap();
        let chosen = a.choose(None).unwrap();
        assert_eq!(chosen.name.as_deref(), Some("x:1"));
        assert_eq!(chosen.target.digest, m);
        assert_eq!(
            chosen.config.config.cmd.as_deref(),
            Some(&["/bin/sh".to_string()][..])
        );
        assert_eq!(a.choose(Some("x:1")).unwrap().manifest.layers[0].digest, l);
        let e = a.choose(Some("y")).unwrap_err().to_string();
        assert!(e.contains("no image named \"y\""), "{e}");
        let (mut r, n) = a.blob(&l).unwrap();
        let mut s = Vec::new();
        r.read_to_end(&mut s).unwrap();
        assert_eq!((s.as_slice(), n), (&layer[..], layer.len() as u64));
        let e = Archive::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("reading OCI archive"), "{e}");
    }

    #[test]
    fn a_layer_count_that_differs_from_the_diff_ids_is_refused() {
        let mut t = tar::Builder::new(Vec::new());
        let l = blob(&mut t, b"a layer");
        let config = format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{l}","{l}"]}}}}"#);
        let c = blob(&mut t, config.as_bytes());
        let manifest = format!(
            r#"{{"config":{{"mediaType":"c","digest":"{c}","size":{}}},"layers":[{{"mediaType":"l","digest":"{l}","size":7}}]}}"#,
            config.len()
        );
        let m = blob(&mut t, manifest.as_bytes());
        let index = format!(
            r#"{{"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{m}","size":{}}}]}}"#,
            manifest.len()
        );
        add(&mut t, "index.json", index.as_bytes());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        std::fs::write(&path, t.into_inner().unwrap()).unwrap();
        let e = Archive::open(&path).unwrap().choose(None).unwrap_err();
        assert!(
            matches!(
                e,
                ArchiveError::LayerCount {
                    layers: 1,
                    diff_ids: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("a.tar"), "{e}");
    }
}
