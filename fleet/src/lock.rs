//! The reboot semaphore: `lock/reboot/max` holds how many machines may reboot at once (one
//! when absent) and each holder has its own key, `lock/reboot/holders/<id>`, so that a machine's etcd
//! role can take and give back its own slot and no one else's. A slot is taken by a
//! transaction that compares the whole `lock/reboot/` range against the revision it was read
//! at, so two machines cannot both take the last slot. The updater's `etcd-lock` strategy asks
//! the agent to reboot; the agent takes a slot first ([`RebootLock::acquire`]) and gives it
//! back once the machine is back at steady state: the boot has settled (the updater's
//! `caisson_layout::paths::BOOT_SETTLED`; see `Agent::release_when_settled`).

use crate::etcd::{Client, Compare, EtcdError, Op};
use serde::{Deserialize, Serialize};

/// What went wrong with the reboot lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The `max` key holds something that is not a count.
    #[error("reboot lock key {key:?} holds {value:?}, not a count of machines")]
    Corrupt { key: String, value: String },
    /// `max` must be at least 1.
    #[error("reboot lock max must be at least 1, not {0}")]
    BadMax(u32),
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

/// The reboot lock's keys under a fleet prefix (everything starting with this).
pub fn key(prefix: &str) -> String {
    format!("{prefix}lock/reboot/")
}

/// The key of `max` under the lock's keys.
pub fn max_key(lock: &str) -> String {
    format!("{lock}max")
}

/// Where the holders' keys live under the lock's keys.
pub fn holders_key(lock: &str) -> String {
    format!("{lock}holders/")
}

/// The key of `id`'s slot under the lock's keys.
pub fn holder_key(lock: &str, id: &str) -> String {
    format!("{lock}holders/{id}")
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
        for attempt in 0..MAX_TRIES {
            let (mut s, rev) = self.read().await?;
            if s.holders.iter().any(|h| h == id) {
                return Ok(true);
            }
            if !s.acquire(id) {
                return Ok(false);
            }
            let r = self
                .client
                .txn(
                    &[Compare::unchanged_since(&self.key, rev)],
                    &[Op::put(
                        holder_key(&self.key, id),
                        crate::registry::now_s().to_string(),
                    )],
                    &[],
                )
                .await?;
            if r.succeeded {
                return Ok(true);
            }
            let pause = 5 + u64::from(attempt) * 7 % 40;
            tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        }
        Err(LockError::Contended {
            key: self.key.clone(),
            tries: MAX_TRIES,
        })
    }

    /// Gives back `id`'s slot; `Ok(true)` if it held one. Idempotent.
    pub async fn release(&self, id: &str) -> Result<bool, LockError> {
        Ok(self
            .client
            .delete(&holder_key(&self.key, id), false)
            .await?
            > 0)
    }

    /// Sets how many machines may hold the lock at once (existing holders keep theirs).
    pub async fn set_max(&self, max: u32) -> Result<(), LockError> {
        if max == 0 {
            return Err(LockError::BadMax(max));
        }
        self.client
            .put(&max_key(&self.key), max.to_string(), 0)
            .await?;
        Ok(())
    }

    /// The semaphore and the revision it was read at.
    async fn read(&self) -> Result<(Semaphore, i64), LockError> {
        let r = self.client.range(&self.key, true).await?;
        let mut s = Semaphore::default();
        let (max, holders) = (max_key(&self.key), holders_key(&self.key));
        for kv in &r.kvs {
            if kv.key == max {
                s.max = kv
                    .value_str()
                    .trim()
                    .parse()
                    .ok()
                    .filter(|&n: &u32| n > 0)
                    .ok_or_else(|| LockError::Corrupt {
                        key: kv.key.clone(),
                        value: kv.value_str(),
                    })?;
            } else if let Some(id) = kv.key.strip_prefix(&holders) {
                s.holders.push(id.to_string());
            }
        }
        Ok((s, r.revision))
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
