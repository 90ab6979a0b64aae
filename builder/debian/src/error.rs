//! The crate's error type. Each variant's message says what failed, on what, and, where there
//! is one, what to do about it.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while finding, resolving, fetching and extracting packages.
#[derive(Debug, thiserror::Error)]
pub enum DebianError {
    /// A file-system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("reading", "writing", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },

    /// No usable apt source serves the wanted suite.
    #[error(
        "no `deb` source for suite {suite} (http or https) in {dir}/sources.list or \
         {dir}/sources.list.d/; name a mirror explicitly"
    )]
    NoMirror {
        /// The apt configuration directory searched.
        dir: PathBuf,
        /// The suite that was wanted.
        suite: String,
    },

    /// The cache directory could not be located.
    #[error("cannot locate the cache directory: neither XDG_CACHE_HOME nor HOME is set")]
    NoCacheDir,

    /// An HTTP request failed (after retries, for transient failures).
    #[error("fetching {url}: {reason}")]
    Http {
        /// The URL.
        url: String,
        /// The HTTP status or transport error.
        reason: String,
        /// Whether trying again might help (a dropped connection, a 5xx answer).
        transient: bool,
    },

    /// gpgv could not be run at all.
    #[error("running gpgv to check {url}: {source}; install Debian's gpgv package")]
    GpgvMissing {
        /// The InRelease URL.
        url: String,
        /// The spawn error.
        source: io::Error,
    },

    /// The InRelease signature did not verify against the keyring.
    #[error("signature check of {url} with keyring {keyring} failed: {detail}")]
    BadSignature {
        /// The InRelease URL.
        url: String,
        /// The keyring used.
        keyring: PathBuf,
        /// What gpgv said.
        detail: String,
    },

    /// A signed InRelease names another suite than the one asked for.
    #[error("{url} is signed for suite {found}, not {wanted}")]
    WrongSuite {
        /// The InRelease URL.
        url: String,
        /// Its Suite/Codename.
        found: String,
        /// The wanted suite.
        wanted: String,
    },

    /// An index file is not listed in the signed InRelease.
    #[error("{file} is not listed in the SHA256 section of the signed {url}")]
    NotInRelease {
        /// The path relative to dists/SUITE.
        file: String,
        /// The InRelease URL.
        url: String,
    },

    /// Downloaded or cached data does not match its expected size or hash.
    #[error(
        "{what}: expected {expected_size} bytes with sha256 {expected_sha256}, \
         got {actual_size} bytes with sha256 {actual_sha256}; refusing it"
    )]
    HashMismatch {
        /// The URL or file.
        what: String,
        /// Expected sha256 (hex).
        expected_sha256: String,
        /// Actual sha256 (hex).
        actual_sha256: String,
        /// Expected size.
        expected_size: u64,
        /// Actual size.
        actual_size: u64,
    },

    /// A control file, index or sources file is malformed.
    #[error("parsing {what}: {reason}")]
    Parse {
        /// The file or URL.
        what: String,
        /// What is wrong.
        reason: String,
    },

    /// A requested package does not exist in the archive.
    #[error("package {name} is not in {archive} (for {arch} or all); check its spelling")]
    MissingPackage {
        /// The requested name.
        name: String,
        /// `suite/components`.
        archive: String,
        /// The architecture.
        arch: String,
    },

    /// A requested name is only virtual and several packages provide it.
    #[error("{name} is a virtual package provided by {providers}; request one of them")]
    AmbiguousVirtual {
        /// The requested name.
        name: String,
        /// The providers, comma separated.
        providers: String,
    },

    /// A dependency cannot be satisfied.
    #[error("{chain} depends on {dependency} which no package in {archive} satisfies")]
    Unsatisfiable {
        /// The chain of packages that led here, `a -> b -> c`.
        chain: String,
        /// The dependency clause as written in the index.
        dependency: String,
        /// `suite/components`.
        archive: String,
    },

    /// A lock file cannot be read or written.
    #[error("lock file {path}: {reason}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A .deb file is malformed.
    #[error("{deb}: {reason}")]
    BadDeb {
        /// The .deb file.
        deb: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A .deb entry would be written outside the destination.
    #[error("{deb}: entry {entry} would be written outside {dest}; refusing it")]
    UnsafePath {
        /// The .deb file.
        deb: PathBuf,
        /// The entry path as in the archive.
        entry: String,
        /// The destination directory.
        dest: PathBuf,
    },
}

/// Attaches a path and action to an I/O result.
pub(crate) trait IoContext<T> {
    fn ctx(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T, DebianError>;
}

impl<T> IoContext<T> for Result<T, io::Error> {
    fn ctx(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T, DebianError> {
        self.map_err(|source| DebianError::Io {
            action,
            path: path.into(),
            source,
        })
    }
}
