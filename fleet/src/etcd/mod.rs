//! An etcd v3 client over etcd's JSON gateway (`/v3/...`): range, put, delete, transactions,
//! leases with keepalive, and watches that resume from a revision after a dropped stream.
//!
//! Keys and values travel base64-encoded; 64-bit integers travel as JSON strings. Several
//! endpoints may be given: a request that cannot reach one (connection refused, timeout, etcd
//! unavailable) moves on to the next, and the client keeps using the one that answered.

mod access;
mod auth;
mod txn;
mod watch;
mod wire;

pub use access::{Access, Credentials};
pub use auth::{Perm, Permission};

pub use txn::{CmpOp, Compare, Op, Target, TxnResponse};
pub use watch::{Event, Watch};
pub use wire::prefix_end;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wire::{b64, range_json, RawDelete, RawHeaderOnly, RawKeepAlive, RawLease, RawRange, RawTxn};

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The configuration names no endpoint.
    #[error("no etcd endpoints configured (set `endpoints` in /etc/caisson/fleet.toml or --etcd)")]
    NoEndpoints,
    /// An endpoint is not an `http://` or `https://` URL.
    #[error("etcd endpoint {0:?} is not an http:// or https:// URL")]
    BadEndpoint(String),
    /// The HTTP client could not be built.
    #[error("building the HTTP client for etcd: {0}")]
    Client(#[source] reqwest::Error),
    /// No endpoint answered.
    #[error(
        "no etcd endpoint answered {path} (tried {tried}); last error from {endpoint}: {source}"
    )]
    Unreachable {
        path: String,
        endpoint: String,
        tried: usize,
        #[source]
        source: reqwest::Error,
    },
    /// etcd answered with an error.
    #[error("etcd at {endpoint} refused {path}: HTTP {status}: {message}")]
    Api {
        endpoint: String,
        path: String,
        status: u16,
        message: String,
    },
    /// etcd's answer is not the JSON this client expects.
    #[error("etcd at {endpoint} answered {path} with JSON that does not parse: {source}")]
    Decode {
        endpoint: String,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// A value etcd returned is not valid base64.
    #[error("etcd returned a key or value that is not base64: {0}")]
    Base64(#[from] base64::DecodeError),
    /// The lease is gone (expired or revoked).
    #[error("etcd lease {0:x} has expired or was revoked")]
    LeaseExpired(i64),
    /// The revision a watch wanted to resume from has been compacted away.
    #[error(
        "watch on {key:?} cannot resume: revisions before {compact_revision} were compacted; \
         read the keys again and watch from the revision of that read"
    )]
    Compacted { key: String, compact_revision: i64 },
    /// A CA bundle or client certificate the TLS layer cannot use.
    #[error("etcd TLS: {what}: {why}")]
    Tls { what: &'static str, why: String },
    /// etcd refused the user's name or password (never shown).
    #[error("etcd at {endpoint} refused the credentials of user {user:?}: {message}")]
    Auth {
        endpoint: String,
        user: String,
        message: String,
    },
    /// Credentials are configured but etcd does not check them: anyone may write the fleet.
    #[error(
        "etcd at {endpoint} has authentication turned off, so anyone who reaches it controls the \
         fleet: turn it on (`caisson-fleet access init`), or drop [auth] and set insecure = true"
    )]
    AuthNotEnabled { endpoint: String },
    /// An answer larger than the client accepts.
    #[error("etcd at {endpoint} answered {path} with more than {cap} bytes")]
    TooLarge {
        endpoint: String,
        path: String,
        cap: usize,
    },
}

impl EtcdError {
    /// etcd said the user's roles do not allow the request.
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, EtcdError::Api { status: 403, .. })
    }
}

/// Result of an etcd call.
pub type Result<T, E = EtcdError> = std::result::Result<T, E>;

/// One key and its value, with etcd's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub lease: i64,
}

impl KeyValue {
    /// The value as text (lossy).
    pub fn value_str(&self) -> String {
        String::from_utf8_lossy(&self.value).into_owned()
    }
}

/// The answer to a range read: the keys and the store's revision at the time of the read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeResponse {
    pub revision: i64,
    pub kvs: Vec<KeyValue>,
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: i64,
    pub ttl_s: i64,
}

/// An etcd client over one or more endpoints. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<String>,
    http: reqwest::Client,
    preferred: AtomicUsize,
    timeout: Duration,
    credentials: Option<Credentials>,
    /// The token etcd gave for `credentials` (simple tokens are valid on one member only, and
    /// lost when it restarts: a 401 gets a new one).
    token: std::sync::Mutex<Option<String>>,
    /// One authentication at a time.
    authenticating: tokio::sync::Mutex<()>,
}

/// The largest unary answer read (a range over a big prefix stays well below it).
pub const MAX_ANSWER: usize = 64 << 20;

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.inner.endpoints)
            .finish()
    }
}

impl Client {
    /// A client for these endpoints (`http://host:port`), tried in order on failure, with no
    /// TLS settings of its own and no credentials (see [`Client::connect`]).
    pub fn new<S: AsRef<str>>(endpoints: &[S]) -> Result<Client> {
        Client::with_timeout(endpoints, Duration::from_secs(5))
    }

    /// [`Client::new`] whose unary requests give up on an endpoint after `timeout`.
    pub fn with_timeout<S: AsRef<str>>(endpoints: &[S], timeout: Duration) -> Result<Client> {
        Client::connect(endpoints, &Access::default(), timeout)
    }

    /// A client that trusts only `access`'s CA (when it names one), presents its client
    /// certificate, and authenticates as its user.
    pub fn connect<S: AsRef<str>>(
        endpoints: &[S],
        access: &Access,
        timeout: Duration,
    ) -> Result<Client> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| e.as_ref().trim_end_matches('/').to_string())
            .collect();
        if endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        if let Some(bad) = endpoints
            .iter()
            .find(|e| !e.starts_with("http://") && !e.starts_with("https://"))
        {
            return Err(EtcdError::BadEndpoint(bad.clone()));
        }
        let builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2).min(timeout))
            .tcp_keepalive(Duration::from_secs(5))
            .no_proxy();
        let http = access.apply(builder)?.build().map_err(EtcdError::Client)?;
        Ok(Client {
            inner: Arc::new(Inner {
                endpoints,
                http,
                preferred: AtomicUsize::new(0),
                timeout,
                credentials: access.credentials.clone(),
                token: std::sync::Mutex::new(None),
                authenticating: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The endpoints, in configuration order.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// Sends one request, failing over between endpoints; `timeout: None` for streams.
    async fn send(
        &self,
        path: &str,
        body: &Value,
        timeout: Option<Duration>,
    ) -> Result<(String, reqwest::Response)> {
        self.send_raw(path, body.to_string().into_bytes(), timeout)
            .await
    }

    /// [`Client::send`] with a body already serialised: a watch stream's body carries several
    /// JSON requests one after the other. With credentials, each request carries the user's
    /// token; a token etcd no longer knows (401) is replaced once per endpoint.
    async fn send_raw(
        &self,
        path: &str,
        body: Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<(String, reqwest::Response)> {
        let n = self.inner.endpoints.len();
        let start = self.inner.preferred.load(Ordering::Relaxed) % n;
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            let endpoint = &self.inner.endpoints[idx];
            let mut renewed = false;
            loop {
                let token = match self.token(endpoint).await {
                    Ok(t) => t,
                    Err(EtcdError::Unreachable { source, .. }) => {
                        last = Some(Ok((endpoint.clone(), source)));
                        break;
                    }
                    Err(e) => return Err(e),
                };
                let mut req = self
                    .inner
                    .http
                    .post(format!("{endpoint}{path}"))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone());
                if let Some(t) = &token {
                    req = req.header(reqwest::header::AUTHORIZATION, t.as_str());
                }
                if let Some(t) = timeout {
                    req = req.timeout(t);
                }
                match req.send().await {
                    Ok(resp)
                        if resp.status() == reqwest::StatusCode::UNAUTHORIZED
                            && token.is_some()
                            && !renewed =>
                    {
                        log::debug!(
                            "etcd {endpoint}: token refused for {path}; authenticating again"
                        );
                        self.forget_token(token.as_deref());
                        renewed = true;
                    }
                    Ok(resp) if unavailable(resp.status()) => {
                        let status = resp.status().as_u16();
                        let message =
                            error_message(&read_capped(resp, 4096).await.unwrap_or_default());
                        log::warn!(
                            "etcd {endpoint} unavailable for {path}: HTTP {status}: {message}"
                        );
                        last = Some(Err(EtcdError::Api {
                            endpoint: endpoint.clone(),
                            path: path.to_string(),
                            status,
                            message,
                        }));
                        break;
                    }
                    Ok(resp) => {
                        self.inner.preferred.store(idx, Ordering::Relaxed);
                        return Ok((endpoint.clone(), resp));
                    }
                    Err(e) => {
                        log::debug!("etcd {endpoint} failed {path}: {e}");
                        last = Some(Ok((endpoint.clone(), e)));
                        break;
                    }
                }
            }
        }
        match last {
            Some(Ok((endpoint, source))) => Err(EtcdError::Unreachable {
                path: path.to_string(),
                endpoint,
                tried: n,
                source,
            }),
            Some(Err(e)) => Err(e),
            None => Err(EtcdError::NoEndpoints),
        }
    }

    /// A unary call: one JSON request, one JSON answer.
    async fn call<T: DeserializeOwned>(&self, path: &str, body: Value) -> Result<T> {
        let (endpoint, resp) = self.send(path, &body, Some(self.inner.timeout)).await?;
        let status = resp.status();
        let bytes = read_capped(resp, MAX_ANSWER).await.map_err(|e| match e {
            Capped::Read(source) => EtcdError::Unreachable {
                path: path.to_string(),
                endpoint: endpoint.clone(),
                tried: 1,
                source,
            },
            Capped::TooLarge => EtcdError::TooLarge {
                endpoint: endpoint.clone(),
                path: path.to_string(),
                cap: MAX_ANSWER,
            },
        })?;
        if !status.is_success() {
            return Err(EtcdError::Api {
                endpoint,
                path: path.to_string(),
                status: status.as_u16(),
                message: error_message(&bytes),
            });
        }
        serde_json::from_slice(&bytes).map_err(|source| EtcdError::Decode {
            endpoint,
            path: path.to_string(),
            source,
        })
    }

    /// Reads one key.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let r = self.range(key, false).await?;
        Ok(r.kvs.into_iter().next())
    }

    /// Reads one key, or every key starting with `key` when `prefix`, sorted by key.
    pub async fn range(&self, key: &str, prefix: bool) -> Result<RangeResponse> {
        let raw: RawRange = self.call("/v3/kv/range", range_json(key, prefix)).await?;
        raw.decode()
    }

    /// Writes `value` at `key`, attached to `lease` (0: none). Returns the new revision.
    /// Writes one key, under `lease` unless it is 0; a lease that is gone is
    /// [`EtcdError::LeaseExpired`].
    pub async fn put(&self, key: &str, value: impl AsRef<[u8]>, lease: i64) -> Result<i64> {
        let body = json!({ "key": b64(key), "value": B64.encode(value.as_ref()),
                           "lease": lease.to_string() });
        let r: Result<RawHeaderOnly> = self.call("/v3/kv/put", body).await;
        match r {
            Ok(raw) => Ok(raw.header.revision),
            Err(EtcdError::Api { message, .. })
                if lease != 0 && message.contains("lease not found") =>
            {
                Err(EtcdError::LeaseExpired(lease))
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes one key, or every key starting with `key` when `prefix`. Returns how many.
    pub async fn delete(&self, key: &str, prefix: bool) -> Result<i64> {
        let raw: RawDelete = self
            .call("/v3/kv/deleterange", range_json(key, prefix))
            .await?;
        Ok(raw.deleted)
    }

    /// Runs `success` if every comparison holds, `failure` otherwise, atomically.
    pub async fn txn(
        &self,
        compare: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnResponse> {
        let body = json!({
            "compare": compare.iter().map(Compare::to_json).collect::<Vec<_>>(),
            "success": success.iter().map(Op::to_json).collect::<Vec<_>>(),
            "failure": failure.iter().map(Op::to_json).collect::<Vec<_>>(),
        });
        let raw: RawTxn = self.call("/v3/kv/txn", body).await?;
        let mut responses = Vec::with_capacity(raw.responses.len());
        for r in raw.responses {
            responses.push(match r.response_range {
                Some(range) => range.decode()?.kvs,
                None => Vec::new(),
            });
        }
        Ok(TxnResponse {
            succeeded: raw.succeeded,
            revision: raw.header.revision,
            responses,
        })
    }

    /// Grants a lease of `ttl_s` seconds.
    pub async fn lease_grant(&self, ttl_s: i64) -> Result<Lease> {
        let raw: RawLease = self
            .call(
                "/v3/lease/grant",
                json!({ "TTL": ttl_s.to_string(), "ID": "0" }),
            )
            .await?;
        Ok(Lease {
            id: raw.id,
            ttl_s: raw.ttl,
        })
    }

    /// Renews a lease; returns its TTL, or [`EtcdError::LeaseExpired`] when it is gone.
    pub async fn lease_keepalive(&self, id: i64) -> Result<i64> {
        let raw: RawKeepAlive = self
            .call("/v3/lease/keepalive", json!({ "ID": id.to_string() }))
            .await?;
        match raw.result {
            Some(r) if r.ttl > 0 => Ok(r.ttl),
            _ => Err(EtcdError::LeaseExpired(id)),
        }
    }

    /// Revokes a lease, deleting every key attached to it.
    pub async fn lease_revoke(&self, id: i64) -> Result<()> {
        let r: Result<Value> = self
            .call("/v3/lease/revoke", json!({ "ID": id.to_string() }))
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(EtcdError::Api { message, .. }) if message.contains("lease not found") => {
                Err(EtcdError::LeaseExpired(id))
            }
            Err(e) => Err(e),
        }
    }

    /// Watches `key` (or the prefix) from `start_revision` (0: from now on).
    pub fn watch(&self, key: &str, prefix: bool, start_revision: i64) -> Watch {
        self.watch_all(&[(key, prefix)], start_revision)
    }

    /// Watches several keys (or prefixes) on one stream, one HTTP connection: etcd's gateway
    /// reads a stream's requests one after the other from the body. [`Watch::next_tagged`] says
    /// which key a batch of changes belongs to (its index in `keys`).
    pub fn watch_all(&self, keys: &[(&str, bool)], start_revision: i64) -> Watch {
        Watch::new(self.clone(), keys, start_revision)
    }
}

/// Why an answer's body could not be read whole.
pub(super) enum Capped {
    Read(reqwest::Error),
    TooLarge,
}

/// Reads an answer's body, refusing more than `cap` bytes (the request's timeout bounds the
/// time).
pub(super) async fn read_capped(
    mut resp: reqwest::Response,
    cap: usize,
) -> std::result::Result<Vec<u8>, Capped> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(Capped::Read)? {
        if out.len() + chunk.len() > cap {
            return Err(Capped::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Errors worth trying another endpoint for: etcd (or a proxy) unavailable.
fn unavailable(status: reqwest::StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

pub(super) fn error_message(bytes: &[u8]) -> String {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => v
            .get("message")
            .or_else(|| v.get("error"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string()),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_checked() {
        assert!(matches!(
            Client::new::<&str>(&[]),
            Err(EtcdError::NoEndpoints)
        ));
        assert!(matches!(
            Client::new(&["10.0.0.1:2379"]),
            Err(EtcdError::BadEndpoint(_))
        ));
    }
}
