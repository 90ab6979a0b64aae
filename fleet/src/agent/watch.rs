//! The agent's etcd watches: which keys wake its loop, on one stream per set of keys.

use super::Task;
use crate::etcd::{Client, Event};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// One key an agent watches (every key under it when `prefix`), and which of its changes
/// matter.
pub(super) struct Watched {
    pub key: String,
    pub prefix: bool,
    pub wanted: fn(&Event) -> bool,
    /// Changes matter only while this is set (none: always).
    pub only_while: Option<Arc<AtomicBool>>,
}

/// Watches `keys` from revision `from`, all on one etcd stream (one connection), and sends a
/// wake-up for each batch with a change that its key's `wanted` says matters. A dropped stream
/// resumes from each key's revision (the client does that); when etcd compacted that revision
/// away or refused the watch, the task watches again from the current revision and wakes the
/// loop for a full read.
pub(super) fn spawn_watch(
    client: Client,
    keys: Vec<Watched>,
    from: i64,
    wake: mpsc::Sender<()>,
) -> Task {
    Task(tokio::spawn(async move {
        let ranges: Vec<(&str, bool)> = keys.iter().map(|k| (k.key.as_str(), k.prefix)).collect();
        let mut watch = client.watch_all(&ranges, from);
        loop {
            match watch.next_tagged().await {
                Ok((i, events)) => {
                    let wanted = keys.get(i).is_none_or(|k| {
                        k.only_while
                            .as_ref()
                            .is_none_or(|on| on.load(Ordering::SeqCst))
                            && events.iter().any(k.wanted)
                    });
                    if wanted {
                        // Full: a wake-up is already pending, which is as good.
                        let _ = wake.try_send(());
                    }
                }
                Err(e) => {
                    log::warn!("{e}; reading the fleet's state again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let from = match keys.first() {
                        Some(k) => next_revision(&client, &k.key).await,
                        None => 0,
                    };
                    watch = client.watch_all(&ranges, from);
                    let _ = wake.try_send(());
                }
            }
        }
    }))
}

/// The revision after the store's current one, for a watch that must miss nothing after a read
/// that follows it (0, "from now on", when etcd does not answer).
pub(super) async fn next_revision(client: &Client, key: &str) -> i64 {
    client.range(key, false).await.map_or(0, |r| r.revision + 1)
}

/// Changes to the leader key that matter: its deletion (the leader left or its lease expired).
pub(super) fn leader_gone(e: &Event) -> bool {
    matches!(e, Event::Delete(_))
}

/// Changes to machine records that matter to the leader: a machine registers or is gone. The
/// heartbeats that rewrite a record do not (the leader's own tick would wake it again).
pub(super) fn machine_joined_or_gone(e: &Event) -> bool {
    match e {
        Event::Delete(_) => true,
        Event::Put(kv) => kv.create_revision == kv.mod_revision,
    }
}

pub(super) fn any_change(_: &Event) -> bool {
    true
}
