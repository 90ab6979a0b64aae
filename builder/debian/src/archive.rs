//! An archive on a mirror, and its signed indexes: `InRelease` and `Packages.xz`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::Cache;
use crate::error::{DebianError, IoContext};
use crate::http::{retry, Http};
use crate::index::{parse_packages, parse_release, Package, Release};
use crate::progress::Reporter;

/// The keyring Debian's archive is signed with (package `debian-archive-keyring`).
pub const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// A Debian archive: which mirror, suite, components and architecture. Its `InRelease` must be
/// signed by a key of [`DEBIAN_KEYRING`] ([`crate::resolve`]) or of a keyring the caller names
/// ([`crate::resolve_with_keyring`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archive {
    /// Base URL, e.g. `http://host/debian` (no trailing slash needed).
    pub mirror: String,
    /// Suite or codename, e.g. `bookworm`.
    pub suite: String,
    /// Components, e.g. `["main"]`.
    pub components: Vec<String>,
    /// Debian architecture, e.g. `amd64`.
    pub arch: String,
}

impl Archive {
    /// bookworm, main, amd64 on `mirror`.
    pub fn bookworm(mirror: impl Into<String>) -> Archive {
        Archive {
            mirror: mirror.into(),
            suite: "bookworm".to_string(),
            components: vec!["main".to_string()],
            arch: "amd64".to_string(),
        }
    }

    /// The URL of `path` relative to the mirror.
    pub fn url(&self, path: &str) -> String {
        format!(
            "{}/{}",
            self.mirror.trim_end_matches('/'),
            path.trim_start_matches('/')
        )
    }

    /// `suite/component,component`, for messages.
    pub fn label(&self) -> String {
        format!("{}/{}", self.suite, self.components.join(","))
    }
}

/// Fetches `dists/SUITE/InRelease`, checks its signature against `keyring`, and parses the
/// verified part.
pub(crate) fn release(
    archive: &Archive,
    keyring: &Path,
    http: &Http,
) -> Result<Release, DebianError> {
    let url = archive.url(&format!("dists/{}/InRelease", archive.suite));
    let signed = http.bytes(&url)?;
    let verified = verify(&signed, keyring, &url)?;
    let text = String::from_utf8(verified).map_err(|_| DebianError::Parse {
        what: url.clone(),
        reason: "not UTF-8".to_string(),
    })?;
    let release = parse_release(&text, &url)?;
    if release.suite != archive.suite && release.codename != archive.suite {
        return Err(DebianError::WrongSuite {
            url,
            found: format!("{} ({})", release.codename, release.suite),
            wanted: archive.suite.clone(),
        });
    }
    Ok(release)
}

/// Checks a clearsigned file with gpgv and returns only the data gpgv vouches for.
pub(crate) fn verify(signed: &[u8], keyring: &Path, url: &str) -> Result<Vec<u8>, DebianError> {
    let bad = |detail: String| DebianError::BadSignature {
        url: url.to_string(),
        keyring: keyring.to_path_buf(),
        detail,
    };
    if !keyring.is_file() {
        return Err(bad(
            "no such keyring; install debian-archive-keyring".to_string()
        ));
    }
    let keyring = std::path::absolute(keyring).ctx("locating", keyring)?;
    let mut file = tempfile::NamedTempFile::new().ctx("creating", std::env::temp_dir())?;
    std::io::Write::write_all(&mut file, signed).ctx("writing", file.path())?;
    let out = Command::new("gpgv")
        .arg("--keyring")
        .arg(&keyring)
        .args(["--output", "-"])
        .arg(file.path())
        .output()
        .map_err(|source| DebianError::GpgvMissing {
            url: url.to_string(),
            source,
        })?;
    if !out.status.success() || out.stdout.is_empty() {
        let said = String::from_utf8_lossy(&out.stderr);
        let said: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
        return Err(bad(format!("gpgv: {}", said.join("; "))));
    }
    Ok(out.stdout)
}

/// Fetches (or takes from the cache) every component's `Packages.xz`, checked against the
/// signed `release`, and parses them.
pub(crate) fn packages(
    archive: &Archive,
    cache: &Cache,
    http: &Http,
    release: &Release,
    report: Reporter,
) -> Result<Vec<Package>, DebianError> {
    let mut all = Vec::new();
    for component in &archive.components {
        let file = format!("{component}/binary-{}/Packages.xz", archive.arch);
        let url = archive.url(&format!("dists/{}/{file}", archive.suite));
        let (size, sha256) = release
            .checksum(&file)
            .ok_or_else(|| DebianError::NotInRelease {
                file: file.clone(),
                url: archive.url(&format!("dists/{}/InRelease", archive.suite)),
            })?;
        let path = match cache.get(sha256, size)? {
            Some(p) => p,
            None => download(cache, http, &url, sha256, size, report)?,
        };
        let text = decompress_xz(&path, &url)?;
        all.extend(parse_packages(&text, &url)?);
    }
    Ok(all)
}

/// Downloads `url` into the cache under its expected hash, with retries and progress.
pub(crate) fn download(
    cache: &Cache,
    http: &Http,
    url: &str,
    sha256: &str,
    size: u64,
    report: Reporter,
) -> Result<PathBuf, DebianError> {
    report.line(&format!("fetching {url}"));
    let name = url.rsplit('/').next().unwrap_or(url);
    let bar = report.bytes_bar(size, name);
    let result = retry(url, || {
        bar.set_position(0);
        cache.store(sha256, size, url, |sink| {
            http.download(url, sink, size, &|n| bar.inc(n))
        })
    });
    bar.finish_and_clear();
    result
}

fn decompress_xz(path: &Path, url: &str) -> Result<String, DebianError> {
    let file = std::fs::File::open(path).ctx("opening", path)?;
    let mut text = String::new();
    crate::pipe::xz_reader(file)
        .ctx("reading", path)?
        .read_to_string(&mut text)
        .map_err(|e| DebianError::Parse {
            what: format!("{url} (cached as {})", path.display()),
            reason: format!("cannot decompress: {e}"),
        })?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let a = Archive::bookworm("http://mirror.invalid/debian/");
        assert_eq!(
            a.url("/pool/main/x.deb"),
            "http://mirror.invalid/debian/pool/main/x.deb"
        );
        assert_eq!(a.label(), "bookworm/main");
    }

    #[test]
    fn unsigned_or_missing_keyring_is_refused() {
        let keyring = Path::new(DEBIAN_KEYRING);
        if keyring.is_file() {
            let err = verify(b"Suite: bookworm\n", keyring, "u").unwrap_err();
            assert!(matches!(err, DebianError::BadSignature { .. }), "{err}");
        }
        let err = verify(b"x", Path::new("/nonexistent.gpg"), "u").unwrap_err();
        assert!(
            err.to_string().contains("install debian-archive-keyring"),
            "{err}"
        );
    }
}
