//! Caisson over-the-air updates. For now: the bundle and manifest format, which the builder writes.

pub mod bundle;
