//! Caisson over-the-air updates: the bundle and manifest format, signatures, the machine's slots
//! and boot entries, download with resume and delta, the ordered write into the inactive slot,
//! rollback records, waves, reboot coordination, and the channel tools the builder calls
//! (`keygen`, `publish`, `serve`).

pub mod agent;
pub mod apply;
pub mod bundle;
pub mod channel;
pub mod chunk_cache;
pub mod config;
pub mod download;
pub mod failed_slot;
pub mod machine;
pub mod reboot;
pub mod record;
pub mod sign;
pub mod slots;
mod sys;
pub mod version;
pub mod waves;

use caisson_layout::Slot;
use std::path::PathBuf;

/// Every error of the library, gathered.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bundle(#[from] bundle::BundleError),
    #[error(transparent)]
    Sign(#[from] sign::SignError),
    #[error("refused: {0}")]
    Refused(#[from] sign::Refusal),
    #[error(transparent)]
    Slot(#[from] slots::SlotError),
    #[error(transparent)]
    Apply(#[from] apply::ApplyError),
    #[error(transparent)]
    Download(#[from] download::DownloadError),
    #[error(transparent)]
    Record(#[from] record::RecordError),
    #[error(transparent)]
    Channel(#[from] channel::ChannelError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Reboot(#[from] reboot::RebootError),
    #[error("this does not look like a running Caisson machine: {0}")]
    NotCaisson(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} was rolled back on this machine before: it is not installed again")]
    Rejected(String),
    #[error("nothing to roll back to: slot {slot} {why}")]
    NothingToRollBackTo { slot: Slot, why: String },
    #[error("no channel: set channel_url in {0}")]
    NoChannel(String),
}
