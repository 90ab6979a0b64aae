//! Signing keys and manifest signatures, in minisign's formats: `caisson keygen` writes a key pair
//! that the `minisign` tool also reads, `caisson publish` signs the manifest's exact bytes, and a
//! machine checks them against the public keys baked into its image.

use crate::bundle::Manifest;
use crate::version;
use std::io::Cursor;
use std::path::{Path, PathBuf};

/// The file names `caisson keygen` writes.
pub const SECRET_KEY_FILE: &str = "caisson.key";
pub const PUBLIC_KEY_FILE: &str = "caisson.pub";
/// The extension of a detached signature beside the file it signs.
pub const SIG_EXT: &str = "minisig";

/// A key or signature problem.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a minisign key: {why}")]
    BadKey { path: PathBuf, why: String },
    #[error("{path} already exists: refusing to overwrite a key (remove it first)")]
    Exists { path: PathBuf },
    #[error("generating or using a key failed: {0}")]
    Crypto(String),
    #[error("no public keys in {dir}: the image cannot verify any update")]
    NoKeys { dir: PathBuf },
    #[error("signature {sig}: {why}")]
    BadSignatureFile { sig: PathBuf, why: String },
    #[error(
        "manifest {manifest} is signed by key {keyid}, which is not one of this machine's keys ({known})"
    )]
    UnknownKey {
        manifest: PathBuf,
        keyid: String,
        known: String,
    },
    #[error(
        "manifest {manifest}: the signature does not match its content (tampered or corrupted)"
    )]
    BadSignature { manifest: PathBuf },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SignError {
    let path = path.to_path_buf();
    move |source| SignError::Io { op, path, source }
}

fn crypto(e: impl std::fmt::Display) -> SignError {
    SignError::Crypto(e.to_string())
}

/// Writes a new unencrypted key pair (`caisson.key`, mode 0600, and `caisson.pub`) into `dir`.
/// Returns the paths and the key id.
pub fn keygen(dir: &Path) -> Result<(PathBuf, PathBuf, String), SignError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let sk_path = dir.join(SECRET_KEY_FILE);
    let pk_path = dir.join(PUBLIC_KEY_FILE);
    for p in [&sk_path, &pk_path] {
        if p.exists() {
            return Err(SignError::Exists { path: p.clone() });
        }
    }
    let kp = minisign::KeyPair::generate_unencrypted_keypair().map_err(crypto)?;
    let keyid = key_id(kp.pk.keynum());
    let sk_text = kp
        .sk
        .to_box(Some(&format!("caisson secret key {keyid}")))
        .map_err(crypto)?
        .into_string();
    let pk_text = kp.pk.to_box().map_err(crypto)?.into_string();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&sk_path)
        .map_err(io_err("creating", &sk_path))?;
    std::io::Write::write_all(&mut f, sk_text.as_bytes()).map_err(io_err("writing", &sk_path))?;
    std::fs::write(&pk_path, pk_text).map_err(io_err("writing", &pk_path))?;
    Ok((sk_path, pk_path, keyid))
}

fn key_id(keynum: &[u8]) -> String {
    let mut b = keynum.to_vec();
    b.reverse();
    hex::encode_upper(b)
}

/// A secret key read from a file.
pub struct SecretKey(minisign::SecretKey);

impl SecretKey {
    pub fn load(path: &Path) -> Result<SecretKey, SignError> {
        let text = std::fs::read_to_string(path).map_err(io_err("reading", path))?;
        let bad = |why: String| SignError::BadKey {
            path: path.to_path_buf(),
            why,
        };
        let sk_box = minisign::SecretKeyBox::from_string(&text).map_err(|e| bad(e.to_string()))?;
        let sk = sk_box
            .into_unencrypted_secret_key()
            .map_err(|e| bad(format!("{e} (caisson signs with unencrypted keys)")))?;
        Ok(SecretKey(sk))
    }

    /// Signs `data`; returns the `.minisig` text.
    pub fn sign(&self, data: &[u8], trusted_comment: &str) -> Result<String, SignError> {
        let sig = minisign::sign(
            None,
            &self.0,
            Cursor::new(data),
            Some(trusted_comment),
            Some("signature from caisson publish"),
        )
        .map_err(crypto)?;
        Ok(sig.into_string())
    }
}

/// The public keys a machine trusts.
pub struct Keyring {
    keys: Vec<(String, minisign::PublicKey)>,
    dir: PathBuf,
}

impl Keyring {
    /// Every `*.pub` file in `dir` (the image's `/usr/lib/caisson/update-keys/`).
    pub fn load(dir: &Path) -> Result<Keyring, SignError> {
        let mut keys = Vec::new();
        let rd = std::fs::read_dir(dir).map_err(io_err("listing", dir))?;
        let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        paths.sort();
        for p in paths
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "pub"))
        {
            keys.push(load_public(p)?);
        }
        if keys.is_empty() {
            return Err(SignError::NoKeys {
                dir: dir.to_path_buf(),
            });
        }
        Ok(Keyring {
            keys,
            dir: dir.to_path_buf(),
        })
    }

    /// Checks `sig_text` over `data`; `manifest` names the file in messages. Returns the key id.
    pub fn verify(
        &self,
        data: &[u8],
        sig_text: &str,
        manifest: &Path,
    ) -> Result<String, SignError> {
        let sig_path = sig_path(manifest);
        let sig = minisign::SignatureBox::from_string(sig_text).map_err(|e| {
            SignError::BadSignatureFile {
                sig: sig_path.clone(),
                why: e.to_string(),
            }
        })?;
        let keyid = key_id(sig.keynum());
        let Some((_, pk)) = self.keys.iter().find(|(id, _)| *id == keyid) else {
            let known: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
            return Err(SignError::UnknownKey {
                manifest: manifest.to_path_buf(),
                keyid,
                known: format!("{} in {}", known.join(", "), self.dir.display()),
            });
        };
        minisign::verify(pk, &sig, Cursor::new(data), true, false, false).map_err(|_| {
            SignError::BadSignature {
                manifest: manifest.to_path_buf(),
            }
        })?;
        Ok(keyid)
    }
}

fn load_public(path: &Path) -> Result<(String, minisign::PublicKey), SignError> {
    let text = std::fs::read_to_string(path).map_err(io_err("reading", path))?;
    let bad = |why: String| SignError::BadKey {
        path: path.to_path_buf(),
        why,
    };
    let pk = minisign::PublicKeyBox::from_string(&text)
        .and_then(|b| b.into_public_key())
        .or_else(|_| minisign::PublicKey::from_base64(text.trim()))
        .map_err(|e| bad(e.to_string()))?;
    Ok((key_id(pk.keynum()), pk))
}

/// `<file>.minisig`.
pub fn sig_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(SIG_EXT);
    file.with_file_name(name)
}

/// What a machine has installed, against which a manifest is judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub image: String,
    pub version: String,
    pub arch: String,
}

/// Why a correctly signed manifest is still refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("the update is for image {got:?}, this machine runs {want:?}")]
    WrongImage { got: String, want: String },
    #[error("the update is for architecture {got}, this machine is {want}")]
    WrongArch { got: String, want: String },
    #[error("the manifest of {version} expired at {expires_at} (now {now}): republish it")]
    Expired {
        version: String,
        expires_at: u64,
        now: u64,
    },
    #[error("{got} is not newer than the installed {installed}: refusing a downgrade")]
    Downgrade { got: String, installed: String },
    #[error("{got} can only be installed over {min} or newer; this machine runs {installed}")]
    TooOld {
        got: String,
        min: String,
        installed: String,
    },
}

/// Checks a verified manifest against the machine: image, architecture, expiry, no downgrade,
/// minimum version.
pub fn check(m: &Manifest, installed: &Installed, now: u64) -> Result<(), Refusal> {
    if m.image != installed.image {
        return Err(Refusal::WrongImage {
            got: m.image.clone(),
            want: installed.image.clone(),
        });
    }
    if m.arch != installed.arch {
        return Err(Refusal::WrongArch {
            got: m.arch.clone(),
            want: installed.arch.clone(),
        });
    }
    if let Some(expires_at) = m.expires_at {
        if now >= expires_at {
            return Err(Refusal::Expired {
                version: m.version.clone(),
                expires_at,
                now,
            });
        }
    }
    if !version::newer(&m.version, &installed.version) {
        return Err(Refusal::Downgrade {
            got: m.version.clone(),
            installed: installed.version.clone(),
        });
    }
    if let Some(min) = &m.min_version {
        if version::newer(min, &installed.version) {
            return Err(Refusal::TooOld {
                got: m.version.clone(),
                min: min.clone(),
                installed: installed.version.clone(),
            });
        }
    }
    Ok(())
}

/// Reads a manifest and its signature from disk and verifies them against `keys`.
pub fn load_verified(path: &Path, keys: &Keyring) -> Result<(Manifest, String), crate::Error> {
    let bytes = std::fs::read(path).map_err(io_err("reading", path))?;
    let sp = sig_path(path);
    let sig = std::fs::read_to_string(&sp).map_err(io_err("reading the signature", &sp))?;
    verify_bytes(&bytes, &sig, path, keys)
}

/// Verifies manifest bytes and signature text, then parses them. Returns the key id too.
pub fn verify_bytes(
    bytes: &[u8],
    sig: &str,
    path: &Path,
    keys: &Keyring,
) -> Result<(Manifest, String), crate::Error> {
    let keyid = keys.verify(bytes, sig, path)?;
    let m = Manifest::parse(bytes, path)?;
    Ok((m, keyid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::tests::sample_manifest;

    #[test]
    fn sign_verify_and_a_flipped_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (sk, _pk, id) = keygen(&dir.path().join("keys")).unwrap();
        assert_eq!(id.len(), 16);
        assert!(matches!(
            keygen(&dir.path().join("keys")),
            Err(SignError::Exists { .. })
        ));
        let ring = Keyring::load(&dir.path().join("keys")).unwrap();
        let data = sample_manifest().to_json().into_bytes();
        let sig = SecretKey::load(&sk).unwrap().sign(&data, "v1").unwrap();
        let p = Path::new("m.json");
        assert_eq!(ring.verify(&data, &sig, p).unwrap(), id);
        let (m, _) = verify_bytes(&data, &sig, p, &ring).unwrap();
        assert_eq!(m, sample_manifest());
        for i in [0, data.len() / 2, data.len() - 2] {
            let mut bad = data.clone();
            bad[i] ^= 1;
            let err = ring.verify(&bad, &sig, p).unwrap_err();
            assert!(matches!(err, SignError::BadSignature { .. }), "{err}");
        }
    }

    #[test]
    fn an_unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (sk, _, _) = keygen(&dir.path().join("a")).unwrap();
        keygen(&dir.path().join("b")).unwrap();
        let ring = Keyring::load(&dir.path().join("b")).unwrap();
        let sig = SecretKey::load(&sk).unwrap().sign(b"x", "c").unwrap();
        let err = ring.verify(b"x", &sig, Path::new("m.json")).unwrap_err();
        assert!(matches!(err, SignError::UnknownKey { .. }), "{err}");
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(matches!(
            Keyring::load(&empty),
            Err(SignError::NoKeys { .. })
        ));
    }

    #[test]
    fn refusals() {
        let mut m = sample_manifest();
        m.version = "1.1.0".into();
        let inst = Installed {
            image: "host".into(),
            version: "1.0.0".into(),
            arch: m.arch.clone(),
        };
        assert_eq!(check(&m, &inst, 100), Ok(()));
        let mut old = inst.clone();
        old.version = "1.2.0".into();
        assert!(matches!(
            check(&m, &old, 100),
            Err(Refusal::Downgrade { .. })
        ));
        old.version = "1.1.0".into();
        assert!(matches!(
            check(&m, &old, 100),
            Err(Refusal::Downgrade { .. })
        ));
        let mut other = inst.clone();
        other.image = "minimal".into();
        assert!(matches!(
            check(&m, &other, 100),
            Err(Refusal::WrongImage { .. })
        ));
        other = inst.clone();
        other.arch = "aarch64".into();
        assert!(matches!(
            check(&m, &other, 100),
            Err(Refusal::WrongArch { .. })
        ));
        m.expires_at = Some(50);
        assert!(matches!(
            check(&m, &inst, 100),
            Err(Refusal::Expired { .. })
        ));
        m.expires_at = None;
        m.min_version = Some("1.0.5".into());
        assert!(matches!(check(&m, &inst, 100), Err(Refusal::TooOld { .. })));
    }
}
