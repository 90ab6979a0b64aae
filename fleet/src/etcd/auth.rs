//! etcd authentication: the user's token (fetched on first use, renewed when etcd forgets it)
//! and the administration calls that make users and roles (root only).

use super::wire::{b64, RawHeaderOnly};
use super::{error_message, read_capped, Client, EtcdError, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::Deserialize;
use serde_json::json;

/// What a role may do with a key range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Perm {
    Read,
    Write,
    ReadWrite,
}

impl Perm {
    fn wire(self) -> &'static str {
        match self {
            Perm::Read => "READ",
            Perm::Write => "WRITE",
            Perm::ReadWrite => "READWRITE",
        }
    }
}

/// One grant of a role: `perm` on `key`, or on every key starting with `key` when `prefix`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Permission {
    pub perm: Perm,
    pub key: String,
    pub prefix: bool,
}

impl Permission {
    pub fn new(perm: Perm, key: impl Into<String>, prefix: bool) -> Permission {
        Permission {
            perm,
            key: key.into(),
            prefix,
        }
    }

    fn range_end(&self) -> Option<Vec<u8>> {
        self.prefix.then(|| super::prefix_end(self.key.as_bytes()))
    }
}

#[derive(Deserialize)]
struct RawToken {
    token: String,
}

#[derive(Deserialize, Default)]
struct RawPerm {
    #[serde(rename = "permType", default)]
    perm_type: Option<String>,
    #[serde(default)]
    key: String,
    #[serde(default)]
    range_end: String,
}

#[derive(Deserialize, Default)]
struct RawRole {
    #[serde(default)]
    perm: Vec<RawPerm>,
}

/// The answer of etcd's gateway for a name that is already taken.
fn exists(e: &EtcdError) -> bool {
    matches!(e, EtcdError::Api { message, .. } if message.contains("already exists"))
}

impl Client {
    /// The token to send to `endpoint`: `None` without credentials; otherwise the cached one,
    /// or a new one from etcd.
    pub(super) async fn token(&self, endpoint: &str) -> Result<Option<String>> {
        let Some(creds) = &self.inner.credentials else {
            return Ok(None);
        };
        if let Some(t) = self.cached_token() {
            return Ok(Some(t));
        }
        let _one = self.inner.authenticating.lock().await;
        if let Some(t) = self.cached_token() {
            return Ok(Some(t));
        }
        let path = "/v3/auth/authenticate";
        let body = json!({ "name": creds.user, "password": creds.password });
        let resp = self
            .inner
            .http
            .post(format!("{endpoint}{path}"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .timeout(self.inner.timeout)
            .send()
            .await
            .map_err(|source| EtcdError::Unreachable {
                path: path.into(),
                endpoint: endpoint.into(),
                tried: 1,
                source,
            })?;
        let status = resp.status();
        let bytes = read_capped(resp, 64 << 10)
            .await
            .map_err(|_| EtcdError::TooLarge {
                endpoint: endpoint.into(),
                path: path.into(),
                cap: 64 << 10,
            })?;
        if !status.is_success() {
            let message = error_message(&bytes);
            if message.contains("authentication is not enabled") {
                return Err(EtcdError::AuthNotEnabled {
                    endpoint: endpoint.into(),
                });
            }
            return Err(EtcdError::Auth {
                endpoint: endpoint.into(),
                user: creds.user.clone(),
                message,
            });
        }
        let raw: RawToken = serde_json::from_slice(&bytes).map_err(|source| EtcdError::Decode {
            endpoint: endpoint.into(),
            path: path.into(),
            source,
        })?;
        *self.token_slot() = Some(raw.token.clone());
        Ok(Some(raw.token))
    }

    fn token_slot(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.inner
            .token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cached_token(&self) -> Option<String> {
        self.token_slot().clone()
    }

    /// Drops `used` if it is still the cached token (another request may have renewed it).
    pub(super) fn forget_token(&self, used: Option<&str>) {
        let mut slot = self.token_slot();
        if slot.as_deref() == used {
            *slot = None;
        }
    }

    /// The user this client authenticates as, if any.
    pub fn user(&self) -> Option<&str> {
        self.inner.credentials.as_ref().map(|c| c.user.as_str())
    }

    /// Adds a user; `Ok(false)` if it exists (its password is then set to `password`).
    pub async fn user_add(&self, name: &str, password: &str) -> Result<bool> {
        let r: Result<RawHeaderOnly> = self
            .call(
                "/v3/auth/user/add",
                json!({ "name": name, "password": password }),
            )
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) if exists(&e) => {
                let _: RawHeaderOnly = self
                    .call(
                        "/v3/auth/user/changepw",
                        json!({ "name": name, "password": password }),
                    )
                    .await?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Adds a role; `Ok(false)` if it exists.
    pub async fn role_add(&self, name: &str) -> Result<bool> {
        let r: Result<RawHeaderOnly> = self
            .call("/v3/auth/role/add", json!({ "name": name }))
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) if exists(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The role's permissions, sorted.
    pub async fn role_permissions(&self, role: &str) -> Result<Vec<Permission>> {
        let raw: RawRole = self
            .call("/v3/auth/role/get", json!({ "role": role }))
            .await?;
        let mut out = Vec::with_capacity(raw.perm.len());
        for p in raw.perm {
            let key = String::from_utf8_lossy(&B64.decode(&p.key)?).into_owned();
            let end = B64.decode(&p.range_end)?;
            let perm = match p.perm_type.as_deref() {
                Some("WRITE") => Perm::Write,
                Some("READWRITE") => Perm::ReadWrite,
                _ => Perm::Read,
            };
            let prefix = !end.is_empty();
            if prefix && end != super::prefix_end(key.as_bytes()) {
                // A range this module never grants: keep it visible as a prefix grant.
                log::warn!("role {role}: range {key:?}..{end:?} is not a prefix");
            }
            out.push(Permission { perm, key, prefix });
        }
        out.sort();
        Ok(out)
    }

    /// Grants `p` to `role`.
    pub async fn role_grant(&self, role: &str, p: &Permission) -> Result<()> {
        let mut perm = json!({ "permType": p.perm.wire(), "key": b64(&p.key) });
        if let Some(end) = p.range_end() {
            perm["range_end"] = json!(B64.encode(end));
        }
        let _: RawHeaderOnly = self
            .call("/v3/auth/role/grant", json!({ "name": role, "perm": perm }))
            .await?;
        Ok(())
    }

    /// Takes `p`'s range away from `role`.
    pub async fn role_revoke(&self, role: &str, p: &Permission) -> Result<()> {
        let mut body = json!({ "role": role, "key": b64(&p.key) });
        if let Some(end) = p.range_end() {
            body["range_end"] = json!(B64.encode(end));
        }
        let _: RawHeaderOnly = self.call("/v3/auth/role/revoke", body).await?;
        Ok(())
    }

    /// Makes `role`'s permissions exactly `wanted` (adding the role if needed).
    pub async fn role_set(&self, role: &str, wanted: &[Permission]) -> Result<()> {
        self.role_add(role).await?;
        let have = self.role_permissions(role).await?;
        for p in have.iter().filter(|p| !wanted.contains(p)) {
            self.role_revoke(role, p).await?;
        }
        for p in wanted.iter().filter(|p| !have.contains(p)) {
            self.role_grant(role, p).await?;
        }
        Ok(())
    }

    /// Gives `role` to `user`.
    pub async fn user_grant_role(&self, user: &str, role: &str) -> Result<()> {
        let _: RawHeaderOnly = self
            .call("/v3/auth/user/grant", json!({ "user": user, "role": role }))
            .await?;
        Ok(())
    }

    /// Turns authentication on (etcd wants a `root` user with the `root` role first).
    pub async fn auth_enable(&self) -> Result<()> {
        let _: RawHeaderOnly = self.call("/v3/auth/enable", json!({})).await?;
        Ok(())
    }
}
