//! Debian packages for the image builder, without root: find the host's mirror, resolve a
//! dependency closure from the signed archive indexes, pin it in a lock, download and verify
//! every `.deb` into a cache addressed by sha256, and extract data archives into a merged-/usr
//! tree without running maintainer scripts.
//!
//! ```no_run
//! # fn main() -> Result<(), caisson_debian::DebianError> {
//! use caisson_debian::*;
//! let archive = Archive::bookworm(host_mirror(HOST_APT_DIR.as_ref(), "bookworm")?);
//! let cache = Cache::from_env()?;
//! let lock = resolve(&archive, &cache, &["busybox-static".to_string()], true)?;
//! for deb in fetch(&archive, &cache, &lock, true)? {
//!     extract(&deb, "rootfs".as_ref())?;
//! }
//! # Ok(())
//! # }
//! ```

mod archive;
mod cache;
mod deb822;
mod error;
mod extract;
mod fetch;
mod http;
pub mod index;
mod lock;
mod pipe;
mod progress;
pub mod resolve;
mod sources;
pub mod version;

pub use archive::{Archive, DEBIAN_KEYRING};
pub use cache::{hash_file, Cache, Sink};
pub use error::DebianError;
pub use extract::{
    extract, extract_with, merged_usr_skeleton, EntryKind, ExtractOptions, ExtractedFile,
};
pub use fetch::{fetch, PARALLEL};
pub use lock::{Lock, LockedPackage};
pub use resolve::{resolve, resolve_with_keyring};
pub use sources::{host_mirror, HOST_APT_DIR};
