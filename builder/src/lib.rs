//! The Caisson image builder: `caisson build`, `lock`, `inspect` and `run`.

pub mod spec;
