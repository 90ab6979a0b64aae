//! First-boot provisioning for Caisson machines, as Ignition is for Fedora CoreOS and user data
//! for Bottlerocket: one image, many machines, each made itself by a config it finds on its first
//! boot. The schema and its validation ([`config`], documented in CONFIG.md), what a config
//! writes ([`plan`]), the transactional, once-only [`apply`], where a config comes from
//! ([`source`]) and what runs on every boot afterwards ([`boot`]).

pub mod apply;
pub mod boot;
pub mod config;
pub mod credentials;
pub mod drive;
pub mod fat;
pub mod plan;
pub mod source;

pub use apply::{apply, check, looked, record_nothing, recorded, ApplyError, Outcome, RECORD};
pub use config::{Config, ConfigError};
pub use plan::{Checks, NoChecks, Plan};

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests_fleet;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests_owners;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests_registries;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests_fat;
