//! Credentials in a machine config: a [`Secret`] that no message, log or `Debug` shows, and the
//! PEM checks of `[fleet.tls]`. A leaf module: the schema ([`crate::config`]) uses it.
//!
//! Every message here says what is wrong in general terms and never quotes the value: a key
//! or a password must not reach the console, a log or an error, not even one byte of it.

use serde::Deserialize;

/// A secret text (a private key, a password): compared and cloned as usual, never shown.
/// A value of another type than a string is kept as such (without its value) so that
/// validation can refuse it by its field, without quoting it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Option<String>);

/// Why a secret is not text: the value is never quoted.
pub const NOT_TEXT: &str = "must be a string in quotes (the value is not shown)";

impl Secret {
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(Some(text.into()))
    }

    /// The text, or why there is none.
    pub fn text(&self) -> Result<&str, &'static str> {
        self.0.as_deref().ok_or(NOT_TEXT)
    }

    /// The text itself, for writing it to its file after validation; never for a message.
    pub fn expose(&self) -> &str {
        self.0.as_deref().unwrap_or_default()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(t) => write!(f, "Secret({} bytes)", t.len()),
            None => write!(f, "Secret(not text)"),
        }
    }
}

/// Any TOML value is taken, and anything but a string is refused later by its field (serde's
/// own "invalid type" message would quote a number or a boolean, without the field).
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        match toml::Value::deserialize(d)? {
            toml::Value::String(s) => Ok(Secret(Some(s))),
            _ => Ok(Secret(None)),
        }
    }
}

/// What a PEM block must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemKind {
    /// `CERTIFICATE` blocks only (a CA bundle, a client certificate): such a file is written
    /// readable by all, so a private key in it is refused.
    Certificate,
    /// One unencrypted private key: PKCS#8 `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`.
    PrivateKey,
}

/// Why a PEM text was refused: each message names no byte of the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    /// No `-----BEGIN <label>-----` line of the expected kind.
    #[error("not PEM text of the right kind: expected a {0} block (-----BEGIN {0}----- ... -----END {0}-----)")]
    Missing(&'static str),
    /// A BEGIN line without its END line.
    #[error("a PEM block has no matching -----END ...----- line (cut short?)")]
    Unterminated,
    /// A private key in a file meant for certificates.
    #[error("holds a private key: this file is readable by all, give certificates only (the key goes in fleet.tls.key)")]
    KeyInCertificates,
    /// A passphrase-protected key, which the agent cannot open unattended.
    #[error("an encrypted private key: the agent starts unattended and has no passphrase; give it unencrypted (openssl pkcs8 -topk8 -nocrypt)")]
    Encrypted,
    /// Anything but one key block.
    #[error("must hold exactly one private key block, and nothing but PEM blocks of keys")]
    NotOneKey,
}

const KEY_LABELS: [&str; 3] = ["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"];

/// The labels of the PEM blocks in `text`, in order (`CERTIFICATE`, `PRIVATE KEY`, ...).
fn labels(text: &str) -> Result<Vec<&str>, PemError> {
    let mut out = Vec::new();
    let mut open: Option<&str> = None;
    for line in text.lines().map(str::trim) {
        let marker = |prefix: &str| {
            line.strip_prefix(prefix)
                .and_then(|l| l.strip_suffix("-----"))
        };
        match (open, marker("-----BEGIN "), marker("-----END ")) {
            (None, Some(label), _) => open = Some(label),
            (Some(label), _, Some(end)) if end == label => {
                out.push(label);
                open = None;
            }
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => return Err(PemError::Unterminated),
            _ => {}
        }
    }
    match open {
        Some(_) => Err(PemError::Unterminated),
        None => Ok(out),
    }
}

/// Checks that `text` is PEM of `kind`.
pub fn check_pem(text: &str, kind: PemKind) -> Result<(), PemError> {
    let found = labels(text)?;
    let is_key = |l: &&str| l.ends_with("PRIVATE KEY");
    match kind {
        PemKind::Certificate if found.iter().any(is_key) => Err(PemError::KeyInCertificates),
        PemKind::Certificate if !found.contains(&"CERTIFICATE") => {
            Err(PemError::Missing("CERTIFICATE"))
        }
        PemKind::Certificate => Ok(()),
        PemKind::PrivateKey if found.contains(&"ENCRYPTED PRIVATE KEY") => Err(PemError::Encrypted),
        PemKind::PrivateKey if !found.iter().any(|l| KEY_LABELS.contains(l)) => {
            Err(PemError::Missing("PRIVATE KEY"))
        }
        PemKind::PrivateKey if found.len() != 1 => Err(PemError::NotOneKey),
        PemKind::PrivateKey => Ok(()),
    }
}

/// Checks a password: not empty, one line, no control characters (it is written to a file
/// the agent reads whole).
pub fn check_password(p: &Secret) -> Result<(), String> {
    let text = p.text()?;
    if text.is_empty() {
        return Err("must not be empty".into());
    }
    if text.chars().any(char::is_control) {
        return Err(
            "must be one line: no newline, carriage return or other control character \
             (the value is not shown)"
                .into(),
        );
    }
    Ok(())
}

/// An etcd user name: 1-128 characters of `A-Z a-z 0-9 . _ -`.
pub fn check_user(u: &str) -> Result<(), String> {
    let ok = !u.is_empty()
        && u.len() <= 128
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{u:?} is not an etcd user name for a machine (1-128 characters of A-Z a-z 0-9 . _ -)"
        ))
    }
}
