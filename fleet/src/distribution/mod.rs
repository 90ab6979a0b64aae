//! The read side of the OCI distribution API: manifests and blobs of a repository, from its
//! registry or that registry's mirrors, with HTTP basic and bearer-token authentication.
//!
//! Nothing a registry sends is trusted: every answer has a size cap ([`MANIFEST_MAX`],
//! [`TOKEN_MAX`], a blob's own size), every manifest fetched by digest must hash to it, and a
//! stalled connection fails after [`READ_TIMEOUT`]; the caller sets the total deadline of a
//! pull. Plain HTTP is used only for registries marked `insecure`; credentials are sent only to
//! the registry they belong to, and a token server reached over plain HTTP gets them only when
//! the registry itself is insecure. Redirects to another host (blob storage) drop the
//! `Authorization` header (reqwest's policy).
//!
//! We wrote this small client rather than use `oci-client`, which reads manifests and tokens
//! whole without a size cap; reference parsing (with Docker's defaults for short names) comes
//! from `oci-spec`.

pub mod auth;

use crate::etcd::Credentials;
use auth::Challenge;
use base64::Engine;
pub use oci_spec::distribution::Reference;
use reqwest::{header, StatusCode};
use std::collections::BTreeMap;
use std::time::Duration;

/// The largest manifest or index accepted (containerd's limit too).
pub const MANIFEST_MAX: u64 = 4 << 20;
/// The largest image config accepted.
pub const CONFIG_MAX: u64 = 16 << 20;
/// The largest token server answer accepted.
pub const TOKEN_MAX: u64 = 1 << 20;
/// How much of an error answer is kept for the message.
const ERROR_BODY_MAX: u64 = 4 << 10;
/// How long a connection may stay silent before the request fails (and a blob resumes).
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The manifest media types a pull accepts, indexes first.
pub const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
pub const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// What went wrong reading from a registry.
#[derive(Debug, thiserror::Error)]
pub enum DistributionError {
    /// The image reference does not parse.
    #[error("image reference {reference:?}: {message}")]
    Reference { reference: String, message: String },
    /// The request failed (connection, TLS, timeout).
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    /// The registry answered with an error status.
    #[error("{url}: HTTP {status}{detail}")]
    Status {
        url: String,
        status: u16,
        detail: String,
    },
    /// An answer was larger than allowed.
    #[error("{url}: {what} is larger than {cap} bytes; refused")]
    TooLarge {
        url: String,
        what: &'static str,
        cap: u64,
    },
    /// Content does not match the digest it was asked by.
    #[error("{what}: content hashes to {got}, not {expected}; refused")]
    Digest {
        what: String,
        expected: String,
        got: String,
    },
    /// The registry wants credentials we do not have, or refused them.
    #[error("registry {registry}: {message}")]
    Auth { registry: String, message: String },
    /// No endpoint answered; each one's error.
    #[error("{}", .0.join("; "))]
    All(Vec<String>),
}

/// How the machine reaches one registry host (`[registries."host:port"]` in fleet.toml).
#[derive(Debug, Clone, Default)]
pub struct HostSettings {
    /// Plain HTTP (and no certificate checks).
    pub insecure: bool,
    /// Hosts tried first, in order, for this registry's repositories.
    pub mirrors: Vec<String>,
    pub credentials: Option<Credentials>,
    /// A CA (PEM) trusted for this host besides the system's.
    pub ca_pem: Option<Vec<u8>>,
}

/// Every registry the machine has settings for; any other is reached over HTTPS, anonymously.
#[derive(Debug, Clone, Default)]
pub struct Registries {
    pub hosts: BTreeMap<String, HostSettings>,
}

/// Parses an image reference (`host:port/repo:tag`, `repo@sha256:...`; short names get Docker's
/// defaults).
pub fn parse_reference(s: &str) -> Result<Reference, DistributionError> {
    s.parse::<Reference>()
        .map_err(|e| DistributionError::Reference {
            reference: s.to_string(),
            message: e.to_string(),
        })
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Whether `d` is `sha256:` and 64 lower-case hex digits (the only digests we accept: they
/// name ingest refs and files).
pub fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// One host serving a repository: the registry itself or a mirror.
#[derive(Debug)]
struct Endpoint {
    host: String,
    base: String,
    insecure: bool,
    credentials: Option<Credentials>,
    http: reqwest::Client,
    /// The `Authorization` value that worked last (a token, or basic credentials).
    authorization: tokio::sync::Mutex<Option<String>>,
}

/// A manifest or index as fetched.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub media_type: String,
    pub digest: String,
    pub bytes: Vec<u8>,
}

/// A repository on its endpoints (mirrors first, the registry last).
#[derive(Debug)]
pub struct Repository {
    pub reference: Reference,
    endpoints: Vec<Endpoint>,
}

impl Registries {
    /// The repository of `reference` on its mirrors and registry.
    pub fn repository(&self, reference: &Reference) -> Result<Repository, DistributionError> {
        let registry = reference.resolve_registry().to_string();
        let settings = self
            .hosts
            .get(reference.registry())
            .or(self.hosts.get(&registry));
        let mut hosts: Vec<String> = settings.map(|s| s.mirrors.clone()).unwrap_or_default();
        hosts.push(registry);
        let endpoints = hosts
            .into_iter()
            .map(|h| self.endpoint(&h))
            .collect::<Result<_, _>>()?;
        Ok(Repository {
            reference: reference.clone(),
            endpoints,
        })
    }

    fn endpoint(&self, host: &str) -> Result<Endpoint, DistributionError> {
        let s = self.hosts.get(host).cloned().unwrap_or_default();
        let base = format!("{}://{host}", if s.insecure { "http" } else { "https" });
        let fail = |message: String| DistributionError::Http {
            url: base.clone(),
            message,
        };
        let mut b = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT);
        if let Some(pem) = &s.ca_pem {
            let cert = reqwest::Certificate::from_pem(pem).map_err(|e| fail(format!("ca: {e}")))?;
            b = b.add_root_certificate(cert);
        }
        let http = b.build().map_err(|e| fail(e.to_string()))?;
        Ok(Endpoint {
            host: host.to_string(),
            base,
            insecure: s.insecure,
            credentials: s.credentials,
            http,
            authorization: tokio::sync::Mutex::new(None),
        })
    }
}

impl Repository {
    /// The manifest or index `tag_or_digest` points to (checked against it when a digest), at
    /// most [`MANIFEST_MAX`] bytes.
    pub async fn manifest(&self, tag_or_digest: &str) -> Result<Fetched, DistributionError> {
        let path = format!(
            "/v2/{}/manifests/{tag_or_digest}",
            self.reference.repository()
        );
        let accept = INDEX_TYPES
            .iter()
            .chain(MANIFEST_TYPES.iter())
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        self.each(|e| {
            let (path, accept) = (path.clone(), accept.clone());
            async move {
                let resp = self.get(e, &path, Some(&accept), 0).await?;
                let media_type = resp
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
                    .unwrap_or_default();
                let url = resp.url().to_string();
                let bytes = read_capped(&url, resp, MANIFEST_MAX, "the manifest").await?;
                let digest = sha256_digest(&bytes);
                if tag_or_digest.contains(':') && digest != tag_or_digest {
                    return Err(DistributionError::Digest {
                        what: format!("manifest {}@{tag_or_digest}", self.reference.repository()),
                        expected: tag_or_digest.to_string(),
                        got: digest,
                    });
                }
                Ok(Fetched {
                    media_type,
                    digest,
                    bytes,
                })
            }
        })
        .await
    }

    /// A small blob (an image config) whole, checked against its digest.
    pub async fn small_blob(&self, digest: &str, cap: u64) -> Result<Vec<u8>, DistributionError> {
        let bytes = self
            .each(|e| async move {
                let resp = self.get(e, &self.blob_path(digest), None, 0).await?;
                let url = resp.url().to_string();
                read_capped(&url, resp, cap, "the blob").await
            })
            .await?;
        let got = sha256_digest(&bytes);
        if got != digest {
            return Err(DistributionError::Digest {
                what: format!("blob {}@{digest}", self.reference.repository()),
                expected: digest.to_string(),
                got,
            });
        }
        Ok(bytes)
    }

    /// A blob's answer from byte `from` on (a `Range` request when `from > 0`), and the offset
    /// its body starts at: `from` when the registry honoured the range, 0 when it sent it all.
    pub async fn blob(
        &self,
        digest: &str,
        from: u64,
    ) -> Result<(reqwest::Response, u64), DistributionError> {
        self.each(|e| async move {
            let resp = self.get(e, &self.blob_path(digest), None, from).await?;
            let start = if resp.status() == StatusCode::PARTIAL_CONTENT {
                from
            } else {
                0
            };
            Ok((resp, start))
        })
        .await
    }

    fn blob_path(&self, digest: &str) -> String {
        format!("/v2/{}/blobs/{digest}", self.reference.repository())
    }

    /// Tries each endpoint in order; the first answer wins, else every error.
    async fn each<'a, T, F, Fut>(&'a self, f: F) -> Result<T, DistributionError>
    where
        F: Fn(&'a Endpoint) -> Fut,
        Fut: std::future::Future<Output = Result<T, DistributionError>>,
    {
        let mut errors = Vec::new();
        for e in &self.endpoints {
            match f(e).await {
                Ok(t) => return Ok(t),
                // Content that does not match its digest is refused, not retried elsewhere.
                Err(d @ DistributionError::Digest { .. }) => return Err(d),
                Err(err) => {
                    log::debug!("{}: {err}", e.host);
                    errors.push(err.to_string());
                }
            }
        }
        Err(match errors.len() {
            1 => DistributionError::All(errors),
            _ => DistributionError::All(
                errors
                    .into_iter()
                    .enumerate()
                    .map(|(i, e)| format!("[{}] {e}", i + 1))
                    .collect(),
            ),
        })
    }

    /// A GET with the endpoint's authorization, answering one 401 challenge.
    async fn get(
        &self,
        e: &Endpoint,
        path: &str,
        accept: Option<&str>,
        from: u64,
    ) -> Result<reqwest::Response, DistributionError> {
        let url = format!("{}{path}", e.base);
        for attempt in 0..2 {
            let mut req = e.http.get(&url);
            if let Some(a) = accept {
                req = req.header(header::ACCEPT, a);
            }
            if from > 0 {
                req = req.header(header::RANGE, format!("bytes={from}-"));
            }
            if let Some(auth) = e.authorization.lock().await.clone() {
                req = req.header(header::AUTHORIZATION, auth);
            }
            let resp = req.send().await.map_err(|err| DistributionError::Http {
                url: url.clone(),
                message: error_chain(&err),
            })?;
            if resp.status() == StatusCode::UNAUTHORIZED && attempt == 0 {
                let challenge = resp
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(auth::parse_challenge);
                self.authenticate(e, challenge).await?;
                continue;
            }
            return check_status(&url, resp).await;
        }
        Err(DistributionError::Auth {
            registry: e.host.clone(),
            message: "refused the credentials (HTTP 401 after authenticating)".into(),
        })
    }

    /// Answers a challenge: sets the endpoint's `Authorization`.
    async fn authenticate(
        &self,
        e: &Endpoint,
        challenge: Option<Challenge>,
    ) -> Result<(), DistributionError> {
        let auth_err = |message: String| DistributionError::Auth {
            registry: e.host.clone(),
            message,
        };
        let basic = e.credentials.as_ref().map(|c| {
            let pair = format!("{}:{}", c.user, c.password);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        let value = match challenge {
            None => {
                return Err(auth_err(
                    "answered 401 without a challenge we understand (Basic or Bearer)".into(),
                ))
            }
            Some(Challenge::Basic) => basic.ok_or_else(|| {
                auth_err(format!(
                    "asks for credentials: give username and password_file under \
                     [registries.\"{}\"] in fleet.toml",
                    e.host
                ))
            })?,
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let plain = realm.starts_with("http://");
                if !(realm.starts_with("https://") || plain && e.insecure) {
                    return Err(auth_err(format!(
                        "token realm {realm:?} is not https:// (plain HTTP only for an insecure registry)"
                    )));
                }
                let scope = scope
                    .unwrap_or_else(|| format!("repository:{}:pull", self.reference.repository()));
                let mut query = vec![("scope", scope)];
                query.extend(service.map(|s| ("service", s)));
                let mut req = e.http.get(&realm).query(&query);
                if let Some(b) = &basic {
                    req = req.header(header::AUTHORIZATION, b);
                }
                let resp = req.send().await.map_err(|err| DistributionError::Http {
                    url: realm.clone(),
                    message: error_chain(&err),
                })?;
                if matches!(resp.status().as_u16(), 401 | 403) {
                    return Err(auth_err(format!(
                        "the token server {realm} refused {} (HTTP {})",
                        if basic.is_some() {
                            "the credentials"
                        } else {
                            "an anonymous pull: give username and password_file"
                        },
                        resp.status().as_u16()
                    )));
                }
                let resp = check_status(&realm, resp).await?;
                let body = read_capped(&realm, resp, TOKEN_MAX, "the token answer").await?;
                let token = auth::token_of(&body)
                    .ok_or_else(|| auth_err(format!("the token server {realm} sent no token")))?;
                format!("Bearer {token}")
            }
        };
        *e.authorization.lock().await = Some(value);
        Ok(())
    }
}

/// The error's message with its sources (reqwest hides the cause in them).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The answer if it is a success; otherwise an error with the start of its body.
async fn check_status(
    url: &str,
    resp: reqwest::Response,
) -> Result<reqwest::Response, DistributionError> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let body = read_capped(url, resp, ERROR_BODY_MAX, "the error")
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let text: String = text.chars().filter(|c| !c.is_control()).take(300).collect();
    Err(DistributionError::Status {
        url: url.to_string(),
        status,
        detail: if text.is_empty() {
            String::new()
        } else {
            format!(": {text}")
        },
    })
}

/// Reads a whole answer of at most `cap` bytes.
pub async fn read_capped(
    url: &str,
    mut resp: reqwest::Response,
    cap: u64,
    what: &'static str,
) -> Result<Vec<u8>, DistributionError> {
    let too_large = || DistributionError::TooLarge {
        url: url.to_string(),
        what,
        cap,
    };
    if resp.content_length().is_some_and(|n| n > cap) {
        return Err(too_large());
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| DistributionError::Http {
        url: url.to_string(),
        message: error_chain(&e),
    })? {
        if (out.len() + chunk.len()) as u64 > cap {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
