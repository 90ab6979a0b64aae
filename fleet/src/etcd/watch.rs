//! Watches that resume from a revision after a dropped stream.

use super::wire::{int64, range_json, RawHeader, RawKv};
use super::{Client, EtcdError, KeyValue, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;

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
    pub(super) fn new(client: Client, keys: &[(&str, bool)], start_revision: i64) -> Watch {
        Watch {
            client,
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
                    Ok(Some(bytes)) if self.buf.len() + bytes.len() > super::MAX_ANSWER => {
                        log::warn!(
                            "etcd watch stream from {endpoint} sent a line over {} bytes; resuming",
                            super::MAX_ANSWER
                        );
                        self.disconnect();
                    }
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

#[derive(Deserialize, Default)]
pub(super) struct RawEvent {
    #[serde(rename = "type", default)]
    pub(super) kind: String,
    #[serde(default)]
    pub(super) kv: RawKv,
}

#[derive(Deserialize, Default)]
pub(super) struct RawWatchResult {
    #[serde(default)]
    pub(super) header: RawHeader,
    #[serde(default, deserialize_with = "int64")]
    pub(super) watch_id: i64,
    #[serde(default)]
    pub(super) canceled: bool,
    #[serde(default, deserialize_with = "int64")]
    pub(super) compact_revision: i64,
    #[serde(default)]
    pub(super) events: Vec<RawEvent>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawWatchLine {
    #[serde(default)]
    pub(super) result: Option<RawWatchResult>,
    #[serde(default)]
    pub(super) error: Option<Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_watch_json() {
        let w: RawWatchLine = serde_json::from_str(
            r#"{"result":{"header":{"revision":"9"},"events":[{"type":"DELETE","kv":{"key":"YQ==","mod_revision":"9"}}]}}"#,
        )
        .unwrap();
        assert_eq!(w.result.unwrap().events[0].kind, "DELETE");
    }
}
