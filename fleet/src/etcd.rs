//! An etcd v3 client over etcd's JSON gateway (`/v3/...`): range, put, delete, transactions,
//! leases with keepalive, and watches that resume from a revision after a dropped stream.
//!
//! Keys and values travel base64-encoded; 64-bit integers travel as JSON strings. Several
//! endpoints may be given: a request that cannot reach one (connection refused, timeout, etcd
//! unavailable) moves on to the next, and the client keeps using the one that answered.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// What a comparison looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The key's last modification revision (0: the key does not exist).
    ModRevision(i64),
    /// The key's creation revision (0: the key does not exist).
    CreateRevision(i64),
    /// The key's version (number of puts since creation; 0: absent).
    Version(i64),
    /// The key's value.
    Value(Vec<u8>),
}

/// A comparison in a transaction: `key`'s target `op` the given value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub op: CmpOp,
    pub target: Target,
}

/// How a comparison compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

impl Compare {
    /// `key` is absent.
    pub fn absent(key: impl Into<String>) -> Compare {
        Compare {
            key: key.into(),
            op: CmpOp::Equal,
            target: Target::CreateRevision(0),
        }
    }

    /// `key` was last changed at `rev` (0: `key` is absent).
    pub fn mod_revision(key: impl Into<String>, rev: i64) -> Compare {
        Compare {
            key: key.into(),
            op: CmpOp::Equal,
            target: Target::ModRevision(rev),
        }
    }

    /// `key` holds exactly `value`.
    pub fn value(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Compare {
        Compare {
            key: key.into(),
            op: CmpOp::Equal,
            target: Target::Value(value.into()),
        }
    }

    fn to_json(&self) -> Value {
        let result = match self.op {
            CmpOp::Equal => "EQUAL",
            CmpOp::NotEqual => "NOT_EQUAL",
            CmpOp::Greater => "GREATER",
            CmpOp::Less => "LESS",
        };
        let mut v = json!({ "result": result, "key": b64(&self.key) });
        let (target, field, value) = match &self.target {
            Target::ModRevision(r) => ("MOD", "mod_revision", json!(r.to_string())),
            Target::CreateRevision(r) => ("CREATE", "create_revision", json!(r.to_string())),
            Target::Version(r) => ("VERSION", "version", json!(r.to_string())),
            Target::Value(x) => ("VALUE", "value", json!(B64.encode(x))),
        };
        v["target"] = json!(target);
        v[field] = value;
        v
    }
}

/// An operation inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Put `value` at `key`, attached to `lease` (0: none).
    Put {
        key: String,
        value: Vec<u8>,
        lease: i64,
    },
    /// Delete `key` (or every key with the prefix, when `prefix`).
    Delete { key: String, prefix: bool },
    /// Read `key` (or every key with the prefix, when `prefix`).
    Get { key: String, prefix: bool },
}

impl Op {
    /// A put without a lease.
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: 0,
        }
    }

    /// A delete of one key.
    pub fn delete(key: impl Into<String>) -> Op {
        Op::Delete {
            key: key.into(),
            prefix: false,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Op::Put { key, value, lease } => json!({ "request_put": {
                "key": b64(key), "value": B64.encode(value), "lease": lease.to_string() } }),
            Op::Delete { key, prefix } => {
                json!({ "request_delete_range": range_json(key, *prefix) })
            }
            Op::Get { key, prefix } => json!({ "request_range": range_json(key, *prefix) }),
        }
    }
}

/// The answer to a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether every comparison held (and the `success` operations ran).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: i64,
    /// The results of the operations' reads, in order (empty for puts and deletes).
    pub responses: Vec<Vec<KeyValue>>,
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: i64,
    pub ttl_s: i64,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    /// A deletion: only `key` and `mod_revision` are meaningful.
    Delete(KeyValue),
}

impl Event {
    /// The key that changed.
    pub fn kv(&self) -> &KeyValue {
        match self {
            Event::Put(kv) | Event::Delete(kv) => kv,
        }
    }
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
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.inner.endpoints)
            .finish()
    }
}

impl Client {
    /// A client for these endpoints (`http://host:port`), tried in order on failure.
    pub fn new<S: AsRef<str>>(endpoints: &[S]) -> Result<Client> {
        Client::with_timeout(endpoints, Duration::from_secs(5))
    }

    /// A client whose unary requests give up on an endpoint after `timeout`.
    pub fn with_timeout<S: AsRef<str>>(endpoints: &[S], timeout: Duration) -> Result<Client> {
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
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2).min(timeout))
            .tcp_keepalive(Duration::from_secs(5))
            .no_proxy()
            .build()
            .map_err(EtcdError::Client)?;
        Ok(Client {
            inner: Arc::new(Inner {
                endpoints,
                http,
                preferred: AtomicUsize::new(0),
                timeout,
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
    /// JSON requests one after the other.
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
            let mut req = self
                .inner
                .http
                .post(format!("{endpoint}{path}"))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            match req.send().await {
                Ok(resp) if unavailable(resp.status()) => {
                    let status = resp.status().as_u16();
                    let message = resp.text().await.unwrap_or_default();
                    log::warn!("etcd {endpoint} unavailable for {path}: HTTP {status}: {message}");
                    last = Some(Err(EtcdError::Api {
                        endpoint: endpoint.clone(),
                        path: path.to_string(),
                        status,
                        message,
                    }));
                }
                Ok(resp) => {
                    self.inner.preferred.store(idx, Ordering::Relaxed);
                    return Ok((endpoint.clone(), resp));
                }
                Err(e) => {
                    log::debug!("etcd {endpoint} failed {path}: {e}");
                    last = Some(Ok((endpoint.clone(), e)));
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
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| EtcdError::Unreachable {
                path: path.to_string(),
                endpoint: endpoint.clone(),
                tried: 1,
                source,
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
        Watch {
            client: self.clone(),
            targets: keys
                .iter()
                .map(|&(key, prefix)| Watched {
                    key: key.to_string(),
                    prefix,
                    next_revision: start_revision,
                })
                .collect(),
            stream: None,
            buf: Vec::new(),
            backoff: Duration::from_millis(100),
        }
    }
}

/// One key or prefix of a [`Watch`], and the revision it resumes from.
struct Watched {
    key: String,
    prefix: bool,
    next_revision: i64,
}

/// A watch that survives dropped streams: it reconnects (to any endpoint) and resumes each of
/// its keys from the revision after the last change it delivered for it, so no change is lost
/// or seen twice.
pub struct Watch {
    client: Client,
    targets: Vec<Watched>,
    stream: Option<(String, reqwest::Response)>,
    buf: Vec<u8>,
    backoff: Duration,
}

impl Watch {
    /// The revision the (first) key's watch resumes from when the stream drops.
    pub fn next_revision(&self) -> i64 {
        self.targets.first().map_or(0, |t| t.next_revision)
    }

    /// Drops the current stream (as a network failure would); the next call reconnects.
    pub fn disconnect(&mut self) {
        self.stream = None;
        self.buf.clear();
    }

    /// The next batch of changes (never empty). Waits as long as it takes; retries dropped
    /// streams and unreachable endpoints forever with a backoff up to 2 s, and fails only when
    /// the revision to resume from was compacted or etcd rejects the watch.
    pub async fn next(&mut self) -> Result<Vec<Event>> {
        self.next_tagged().await.map(|(_, events)| events)
    }

    /// [`Watch::next`], with the index (in [`Client::watch_all`]'s keys) of the key the
    /// changes belong to.
    pub async fn next_tagged(&mut self) -> Result<(usize, Vec<Event>)> {
        loop {
            if let Some(line) = self.take_line() {
                if let Some(tagged) = self.handle(&line)? {
                    return Ok(tagged);
                }
                continue;
            }
            match self.stream.as_mut() {
                None => self.connect().await?,
                Some((endpoint, resp)) => match resp.chunk().await {
                    Ok(Some(bytes)) => self.buf.extend_from_slice(&bytes),
                    Ok(None) => {
                        log::info!("etcd watch stream from {endpoint} ended; resuming");
                        self.disconnect();
                    }
                    Err(e) => {
                        log::info!("etcd watch stream from {endpoint} failed: {e}; resuming");
                        self.disconnect();
                    }
                },
            }
        }
    }

    fn take_line(&mut self) -> Option<Vec<u8>> {
        let pos = self.buf.iter().position(|&b| b == b'\n')?;
        let line: Vec<u8> = self.buf.drain(..=pos).collect();
        Some(line)
    }

    /// What the stream's events and errors are about, for messages.
    fn keys(&self) -> String {
        let keys: Vec<&str> = self.targets.iter().map(|t| t.key.as_str()).collect();
        format!("{keys:?}")
    }

    /// One create request per key, in one body; watch ids are the keys' indexes plus one
    /// (etcd assigns a given non-zero id).
    fn create_requests(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for (i, t) in self.targets.iter().enumerate() {
            let mut req = range_json(&t.key, t.prefix);
            if t.next_revision > 0 {
                req["start_revision"] = json!(t.next_revision.to_string());
            }
            req["watch_id"] = json!((i + 1).to_string());
            body.extend_from_slice(json!({ "create_request": req }).to_string().as_bytes());
            body.push(b'\n');
        }
        body
    }

    async fn connect(&mut self) -> Result<()> {
        let body = self.create_requests();
        match self.client.send_raw("/v3/watch", body, None).await {
            Ok((endpoint, resp)) if resp.status().is_success() => {
                self.stream = Some((endpoint, resp));
                self.buf.clear();
                self.backoff = Duration::from_millis(100);
                Ok(())
            }
            Ok((endpoint, resp)) => {
                let status = resp.status().as_u16();
                let message = resp.text().await.unwrap_or_default();
                Err(EtcdError::Api {
                    endpoint,
                    path: "/v3/watch".into(),
                    status,
                    message,
                })
            }
            Err(e) => {
                log::warn!(
                    "etcd watch on {}: {e}; retrying in {:?}",
                    self.keys(),
                    self.backoff
                );
                tokio::time::sleep(self.backoff).await;
                self.backoff = (self.backoff * 2).min(Duration::from_secs(2));
                Ok(())
            }
        }
    }

    /// Handles one line of the stream; `Some` when it carries events, with their key's index.
    fn handle(&mut self, line: &[u8]) -> Result<Option<(usize, Vec<Event>)>> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        let endpoint = self
            .stream
            .as_ref()
            .map(|s| s.0.clone())
            .unwrap_or_default();
        let msg: RawWatchLine =
            serde_json::from_slice(line).map_err(|source| EtcdError::Decode {
                endpoint: endpoint.clone(),
                path: "/v3/watch".into(),
                source,
            })?;
        if let Some(err) = msg.error {
            log::info!("etcd watch stream from {endpoint} reported {err}; resuming");
            self.disconnect();
            return Ok(None);
        }
        let Some(r) = msg.result else { return Ok(None) };
        // Ids are indexes plus one. An etcd that ignores given ids (before 3.4) numbers from 0:
        // that is understood for a single key only; with several, the stream is reconnected.
        let index = match usize::try_from(r.watch_id) {
            Ok(id) if (1..=self.targets.len()).contains(&id) => id - 1,
            Ok(0) if self.targets.len() == 1 => 0,
            _ => {
                log::warn!(
                    "etcd watch stream from {endpoint}: unknown watch id {}; resuming",
                    r.watch_id
                );
                self.disconnect();
                return Ok(None);
            }
        };
        let target = &mut self.targets[index];
        if r.compact_revision > 0 {
            return Err(EtcdError::Compacted {
                key: target.key.clone(),
                compact_revision: r.compact_revision,
            });
        }
        if r.canceled {
            log::info!("etcd canceled the watch on {:?}; resuming", target.key);
            self.disconnect();
            return Ok(None);
        }
        if target.next_revision == 0 && r.header.revision > 0 {
            target.next_revision = r.header.revision + 1;
        }
        if r.events.is_empty() {
            return Ok(None);
        }
        let mut events = Vec::with_capacity(r.events.len());
        for e in r.events {
            let kv = e.kv.decode()?;
            target.next_revision = target.next_revision.max(kv.mod_revision + 1);
            events.push(if e.kind == "DELETE" {
                Event::Delete(kv)
            } else {
                Event::Put(kv)
            });
        }
        Ok(Some((index, events)))
    }
}

/// Errors worth trying another endpoint for: etcd (or a proxy) unavailable.
fn unavailable(status: reqwest::StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

fn error_message(bytes: &[u8]) -> String {
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

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

/// The JSON of a key or a prefix range.
fn range_json(key: &str, prefix: bool) -> Value {
    let mut v = json!({ "key": b64(key) });
    if prefix {
        v["range_end"] = json!(B64.encode(prefix_end(key.as_bytes())));
    }
    v
}

/// The first key after every key that starts with `prefix` (`\0`: the whole keyspace).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// etcd's gateway sends 64-bit integers as strings and omits zero values.
fn int64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        S(String),
        I(i64),
    }
    match N::deserialize(d)? {
        N::I(i) => Ok(i),
        N::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

#[derive(Deserialize, Default)]
struct RawHeader {
    #[serde(default, deserialize_with = "int64")]
    revision: i64,
}

#[derive(Deserialize, Default)]
struct RawHeaderOnly {
    #[serde(default)]
    header: RawHeader,
}

#[derive(Deserialize, Default)]
struct RawKv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "int64")]
    create_revision: i64,
    #[serde(default, deserialize_with = "int64")]
    mod_revision: i64,
    #[serde(default, deserialize_with = "int64")]
    version: i64,
    #[serde(default, deserialize_with = "int64")]
    lease: i64,
}

impl RawKv {
    fn decode(self) -> Result<KeyValue> {
        Ok(KeyValue {
            key: String::from_utf8_lossy(&B64.decode(self.key)?).into_owned(),
            value: B64.decode(self.value)?,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        })
    }
}

#[derive(Deserialize, Default)]
struct RawRange {
    #[serde(default)]
    header: RawHeader,
    #[serde(default)]
    kvs: Vec<RawKv>,
}

impl RawRange {
    fn decode(self) -> Result<RangeResponse> {
        Ok(RangeResponse {
            revision: self.header.revision,
            kvs: self
                .kvs
                .into_iter()
                .map(RawKv::decode)
                .collect::<Result<_>>()?,
        })
    }
}

#[derive(Deserialize, Default)]
struct RawDelete {
    #[serde(default, deserialize_with = "int64")]
    deleted: i64,
}

#[derive(Deserialize, Default)]
struct RawTxnOp {
    #[serde(default)]
    response_range: Option<RawRange>,
}

#[derive(Deserialize, Default)]
struct RawTxn {
    #[serde(default)]
    header: RawHeader,
    #[serde(default)]
    succeeded: bool,
    #[serde(default)]
    responses: Vec<RawTxnOp>,
}

#[derive(Deserialize, Default)]
struct RawLease {
    #[serde(rename = "ID", default, deserialize_with = "int64")]
    id: i64,
    #[serde(rename = "TTL", default, deserialize_with = "int64")]
    ttl: i64,
}

#[derive(Deserialize, Default)]
struct RawKeepAlive {
    #[serde(default)]
    result: Option<RawLease>,
}

#[derive(Deserialize, Default)]
struct RawEvent {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    kv: RawKv,
}

#[derive(Deserialize, Default)]
struct RawWatchResult {
    #[serde(default)]
    header: RawHeader,
    #[serde(default, deserialize_with = "int64")]
    watch_id: i64,
    #[serde(default)]
    canceled: bool,
    #[serde(default, deserialize_with = "int64")]
    compact_revision: i64,
    #[serde(default)]
    events: Vec<RawEvent>,
}

#[derive(Deserialize, Default)]
struct RawWatchLine {
    #[serde(default)]
    result: Option<RawWatchResult>,
    #[serde(default)]
    error: Option<Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn decodes_gateway_json() {
        let text = r#"{"header":{"revision":"7"},"kvs":[{"key":"YQ==","value":"eA==",
            "create_revision":"2","mod_revision":"7","version":"3"}],"count":"1"}"#;
        let r: RawRange = serde_json::from_str(text).unwrap();
        let r = r.decode().unwrap();
        assert_eq!(r.revision, 7);
        assert_eq!(r.kvs[0].key, "a");
        assert_eq!(r.kvs[0].value, b"x");
        assert_eq!(r.kvs[0].lease, 0);
        let w: RawWatchLine = serde_json::from_str(
            r#"{"result":{"header":{"revision":"9"},"events":[{"type":"DELETE","kv":{"key":"YQ==","mod_revision":"9"}}]}}"#,
        )
        .unwrap();
        assert_eq!(w.result.unwrap().events[0].kind, "DELETE");
    }

    #[test]
    fn compare_json() {
        let c = Compare::mod_revision("k", 5).to_json();
        assert_eq!(c["target"], "MOD");
        assert_eq!(c["mod_revision"], "5");
        assert_eq!(Compare::absent("k").to_json()["create_revision"], "0");
    }

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
