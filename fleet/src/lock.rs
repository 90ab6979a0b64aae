//! The reboot semaphore: one etcd key holding `{"max":N,"holders":[...]}`, changed only by
//! compare-and-swap on its revision. The updater's `etcd-lock` strategy calls [`RebootLock::acquire`]
//! before rebooting into a new version and the agent calls [`RebootLock::release`] once the machine
//! is back at steady state: the boot has settled (the updater's
//! `caisson_layout::paths::BOOT_SETTLED`; see `Agent::release_when_settled`). A missing key means
//! `max = 1` and no holders.

use crate::etcd::{Client, Compare, EtcdError, Op};
use serde::{Deserialize, Serialize};

/// What went wrong with the reboot lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The key holds something that is not a semaphore.
    #[error("reboot lock key {key:?} holds invalid JSON: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// `max` must be at least 1.
    #[error("reboot lock max must be at least 1, not {0}")]
    BadMax(u32),
    /// The blocking wrappers could not start their runtime.
    #[error("starting an async runtime for the reboot lock: {0}")]
    Runtime(#[source] std::io::Error),
    /// Too many compare-and-swap conflicts in a row.
    #[error("reboot lock {key:?} kept changing under us ({tries} tries); try again")]
    Contended { key: String, tries: u32 },
}

/// The semaphore's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Semaphore {
    pub max: u32,
    #[serde(default)]
    pub holders: Vec<String>,
}

impl Default for Semaphore {
    fn default() -> Self {
        Semaphore {
            max: 1,
            holders: Vec::new(),
        }
    }
}

impl Semaphore {
    /// Takes a slot for `id`: true if `id` holds one now (already or newly), false if full.
    pub fn acquire(&mut self, id: &str) -> bool {
        if self.holders.iter().any(|h| h == id) {
            return true;
        }
        if self.holders.len() >= self.max as usize {
            return false;
        }
        self.holders.push(id.to_string());
        true
    }

    /// Gives back `id`'s slot: true if it held one.
    pub fn release(&mut self, id: &str) -> bool {
        let before = self.holders.len();
        self.holders.retain(|h| h != id);
        before != self.holders.len()
    }
}

/// The default key of the reboot lock under a fleet prefix.
pub fn key(prefix: &str) -> String {
    format!("{prefix}lock/reboot")
}

/// The reboot semaphore in etcd.
#[derive(Debug, Clone)]
pub struct RebootLock {
    client: Client,
    key: String,
}

const MAX_TRIES: u32 = 50;

impl RebootLock {
    /// The lock at `key` (see [`key`]).
    pub fn new(client: Client, key: impl Into<String>) -> RebootLock {
        RebootLock {
            client,
            key: key.into(),
        }
    }

    /// The semaphore as it is now.
    pub async fn status(&self) -> Result<Semaphore, LockError> {
        Ok(self.read().await?.0)
    }

    /// Takes a slot for `id`. `Ok(true)`: `id` holds the lock (it may reboot); `Ok(false)`: the
    /// lock is full, try again later. Idempotent.
    pub async fn acquire(&self, id: &str) -> Result<bool, LockError> {
        self.update(|s| {
            let held = s.acquire(id);
            (held, held)
        })
        .await
    }

    /// Gives back `id`'s slot; `Ok(true)` if it held one. Idempotent.
    pub async fn release(&self, id: &str) -> Result<bool, LockError> {
        self.update(|s| {
            let had = s.release(id);
            (had, had)
        })
        .await
    }

    /// Sets how many machines may hold the lock at once (existing holders keep theirs).
    pub async fn set_max(&self, max: u32) -> Result<(), LockError> {
        if max == 0 {
            return Err(LockError::BadMax(max));
        }
        self.update(|s| {
            let changed = s.max != max;
            s.max = max;
            ((), changed)
        })
        .await
    }

    async fn read(&self) -> Result<(Semaphore, i64), LockError> {
        match self.client.get(&self.key).await? {
            None => Ok((Semaphore::default(), 0)),
            Some(kv) => {
                let s = serde_json::from_slice(&kv.value).map_err(|source| LockError::Corrupt {
                    key: self.key.clone(),
                    source,
                })?;
                Ok((s, kv.mod_revision))
            }
        }
    }

    /// Read, change in memory, write back only if nobody wrote in between; retry otherwise.
    async fn update<T>(&self, f: impl Fn(&mut Semaphore) -> (T, bool)) -> Result<T, LockError> {
        for attempt in 0..MAX_TRIES {
            let (mut s, rev) = self.read().await?;
            let (out, changed) = f(&mut s);
            if !changed {
                return Ok(out);
            }
            let value = serde_json::to_vec(&s).map_err(|source| LockError::Corrupt {
                key: self.key.clone(),
                source,
            })?;
            let r = self
                .client
                .txn(
                    &[Compare::mod_revision(&self.key, rev)],
                    &[Op::put(&self.key, value)],
                    &[],
                )
                .await?;
            if r.succeeded {
                return Ok(out);
            }
            let pause = 5 + u64::from(attempt) * 7 % 40;
            tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        }
        Err(LockError::Contended {
            key: self.key.clone(),
            tries: MAX_TRIES,
        })
    }
}

/// Blocking calls for callers without an async runtime (the updater).
pub mod blocking {
    use super::*;

    fn run<T>(f: impl std::future::Future<Output = Result<T, LockError>>) -> Result<T, LockError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(LockError::Runtime)?;
        rt.block_on(f)
    }

    /// [`RebootLock::acquire`] on the lock at [`key`]`(prefix)` through `endpoints`.
    pub fn acquire(endpoints: &[String], prefix: &str, id: &str) -> Result<bool, LockError> {
        let lock = RebootLock::new(Client::new(endpoints)?, key(prefix));
        run(lock.acquire(id))
    }

    /// [`RebootLock::release`] on the lock at [`key`]`(prefix)` through `endpoints`.
    pub fn release(endpoints: &[String], prefix: &str, id: &str) -> Result<bool, LockError> {
        let lock = RebootLock::new(Client::new(endpoints)?, key(prefix));
        run(lock.release(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semaphore_state_machine() {
        let mut s = Semaphore::default();
        assert!(s.acquire("a"));
        assert!(s.acquire("a"), "idempotent");
        assert!(!s.acquire("b"), "full at max 1");
        assert!(!s.release("b"));
        assert!(s.release("a"));
        assert!(s.acquire("b"));
        s.max = 2;
        assert!(s.acquire("c"));
        assert!(!s.acquire("d"));
        assert_eq!(s.holders, ["b", "c"]);
        // Lowering max keeps the holders but lets nobody new in until enough leave.
        s.max = 1;
        assert!(!s.acquire("d"));
        s.release("b");
        assert!(!s.acquire("d"));
        s.release("c");
        assert!(s.acquire("d"));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"{"max":1,"holders":["d"]}"#);
    }
}
