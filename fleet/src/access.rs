//! Who may do what in the fleet's keyspace: the etcd roles and users that
//! `caisson-fleet access` makes. The key layout is [`crate::registry::Keys`]'s; the grants follow
//! it here and nowhere else.
//!
//! | role | may |
//! |---|---|
//! | `caisson-operator` | read and write everything under the prefix (the `caisson-fleet` CLI) |
//! | `caisson-leader` | write the leader key, every assignment and the volumes' pins (`volumes/`); read machines and statuses |
//! | `caisson-machine-<id>` | write its own record, statuses, logs, reboot-lock slot and service registrations (`services/<id>/`), the subnet claims (`network/subnets/`) and its route report (`network/routes/<id>`); read the units, its own assignment, the leader key, the machines, the reboot lock, the volume purges (`purge/`), the network's config and every registration (`services/`) |
//!
//! A machine's user is `caisson-machine-<id>` with its own role, and `caisson-leader` too when
//! it may schedule (a machine without it never campaigns). Only the operator writes units and
//! the network's config; only a leader writes assignments; a machine cannot touch another
//! machine's keys or read another machine's logs, with one exception: the subnet claims.
//! A subnet's key is named by the subnet (`network/subnets/10.42.3.0-24`) so that a claim is a
//! transaction on the key being absent, which is what makes two claims of one subnet
//! impossible; etcd's roles grant key ranges, not owners, so every machine may write the
//! whole `network/subnets/` range. A machine's credentials can therefore disturb other
//! machines' subnet claims (delete or overwrite them: their routes go until the owner's agent
//! notices, within a minute, and claims again), and nothing else.

use crate::etcd::{Client, EtcdError, Perm, Permission};
use crate::registry::{self, Keys};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// The operator's role.
pub const OPERATOR_ROLE: &str = "caisson-operator";
/// The role of machines that may lead.
pub const LEADER_ROLE: &str = "caisson-leader";
/// etcd's administrator, which must exist before authentication can be turned on.
pub const ROOT: &str = "root";

/// What went wrong setting up users and roles.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("{0:?} is not a machine id (1-64 of A-Z a-z 0-9 . _ -)")]
    BadId(String),
    #[error("{0:?} is not a user name (1-64 of A-Z a-z 0-9 . _ -)")]
    BadUser(String),
    #[error("password file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("password file {path}: {why}")]
    BadPasswordFile { path: String, why: String },
}

/// The role and user name of machine `id`.
pub fn machine_user(id: &str) -> String {
    format!("caisson-machine-{id}")
}

/// Everything under the prefix.
pub fn operator_permissions(keys: &Keys) -> Vec<Permission> {
    vec![Permission::new(Perm::ReadWrite, &keys.prefix, true)]
}

/// The leader key, every assignment; what scheduling reads.
pub fn leader_permissions(keys: &Keys) -> Vec<Permission> {
    sorted(vec![
        Permission::new(Perm::ReadWrite, keys.leader(), false),
        Permission::new(Perm::ReadWrite, keys.assigns(), true),
        Permission::new(Perm::ReadWrite, keys.pins(), true),
        Permission::new(Perm::Read, keys.machines(), true),
        Permission::new(Perm::Read, keys.units(), true),
        Permission::new(Perm::Read, keys.statuses(), true),
    ])
}

/// Machine `id`'s own keys, and what its agent reads.
pub fn machine_permissions(keys: &Keys, id: &str) -> Vec<Permission> {
    let lock = keys.lock();
    sorted(vec![
        Permission::new(Perm::ReadWrite, keys.machine(id), false),
        Permission::new(Perm::ReadWrite, format!("{}{id}/", keys.statuses()), true),
        Permission::new(Perm::ReadWrite, format!("{}{id}/", keys.all_logs()), true),
        Permission::new(Perm::ReadWrite, crate::lock::holder_key(&lock, id), false),
        Permission::new(Perm::Read, lock, true),
        Permission::new(Perm::Read, keys.assign(id), false),
        Permission::new(Perm::Read, keys.units(), true),
        Permission::new(Perm::Read, keys.leader(), false),
        Permission::new(Perm::Read, keys.machines(), true),
        Permission::new(Perm::Read, keys.purges(), true),
        Permission::new(Perm::Read, keys.network_config(), false),
        // Claims are transactions on the subnet's key: every machine writes the whole range.
        Permission::new(Perm::ReadWrite, keys.subnets(), true),
        Permission::new(Perm::ReadWrite, keys.route_report(id), false),
        Permission::new(Perm::Read, keys.services(), true),
        Permission::new(Perm::ReadWrite, keys.machine_services(id), true),
    ])
}

fn sorted(mut v: Vec<Permission>) -> Vec<Permission> {
    v.sort();
    v
}

/// Makes the root user (if missing), the operator and leader roles, the operator's user, and
/// turns authentication on. Idempotent: existing users get the given passwords again and the
/// roles exactly their grants.
pub async fn init(
    client: &Client,
    keys: &Keys,
    root_password: &str,
    operator: &str,
    operator_password: &str,
) -> Result<(), AccessError> {
    if !registry::valid_id(operator) {
        return Err(AccessError::BadUser(operator.into()));
    }
    client.user_add(ROOT, root_password).await?;
    client.role_add(ROOT).await?;
    client.user_grant_role(ROOT, ROOT).await?;
    client
        .role_set(OPERATOR_ROLE, &operator_permissions(keys))
        .await?;
    client
        .role_set(LEADER_ROLE, &leader_permissions(keys))
        .await?;
    client.user_add(operator, operator_password).await?;
    client.user_grant_role(operator, OPERATOR_ROLE).await?;
    client.auth_enable().await?;
    Ok(())
}

/// Makes machine `id`'s role and user (with `password`), and gives it the leader role when
/// `leader`. Idempotent.
pub async fn add_machine(
    client: &Client,
    keys: &Keys,
    id: &str,
    password: &str,
    leader: bool,
) -> Result<String, AccessError> {
    if !registry::valid_id(id) {
        return Err(AccessError::BadId(id.into()));
    }
    let user = machine_user(id);
    client
        .role_set(&user, &machine_permissions(keys, id))
        .await?;
    client.user_add(&user, password).await?;
    client.user_grant_role(&user, &user).await?;
    if leader {
        client.user_grant_role(&user, LEADER_ROLE).await?;
    }
    Ok(user)
}

/// The password in `path`, or, when the file does not exist, a new random one written there
/// (mode 0600, never over an existing file). An existing file must be 0600 or stricter.
pub fn password_file(path: &Path) -> Result<String, AccessError> {
    let io = |source| AccessError::Io {
        path: path.display().to_string(),
        source,
    };
    let bad = |why: &str| AccessError::BadPasswordFile {
        path: path.display().to_string(),
        why: why.into(),
    };
    match std::fs::metadata(path) {
        Ok(meta) => {
            if meta.mode() & 0o077 != 0 {
                return Err(bad("other users may read it; chmod 600 it"));
            }
            let text = std::fs::read_to_string(path).map_err(io)?;
            let pw = text.trim_end_matches(['\n', '\r']);
            if pw.is_empty() || pw.contains(['\n', '\r']) {
                return Err(bad("it must hold one non-empty line"));
            }
            Ok(pw.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 24];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
                .map_err(io)?;
            let pw = hex::encode(bytes);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            f.write_all(format!("{pw}\n").as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(io)?;
            Ok(pw)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `perms` allow `want` on `key` (the way etcd matches a key against ranges).
    fn allows(perms: &[Permission], key: &str, write: bool) -> bool {
        perms.iter().any(|p| {
            let covers = if p.prefix {
                key.starts_with(&p.key)
            } else {
                key == p.key
            };
            let kind = match p.perm {
                Perm::ReadWrite => true,
                Perm::Write => write,
                Perm::Read => !write,
            };
            covers && kind
        })
    }

    #[test]
    fn a_machine_writes_only_its_own_keys() {
        let k = Keys::new("/f/");
        let m = machine_permissions(&k, "m1");
        for own in [
            k.machine("m1"),
            k.status("m1", "web"),
            k.logs("m1", "web"),
            crate::lock::holder_key(&k.lock(), "m1"),
        ] {
            assert!(allows(&m, &own, true), "{own}");
        }
        for other in [
            k.machine("m2"),
            k.machine("m10"),
            k.status("m2", "web"),
            k.status("m10", "web"),
            k.logs("m2", "web"),
            k.unit("web"),
            k.assign("m1"),
            k.leader(),
            k.pin("web"),
            k.purge("web"),
            k.network_config(),
            k.service("m2", "web"),
            k.service("m10", "web"),
            format!("{}m1", k.services()),
            k.route_report("m2"),
            k.route_report("m10"),
            crate::lock::holder_key(&k.lock(), "m2"),
            crate::lock::max_key(&k.lock()),
        ] {
            assert!(!allows(&m, &other, true), "{other}");
        }
        assert!(allows(&m, &k.service("m1", "web"), true));
        assert!(allows(&m, &k.route_report("m1"), true));
        let subnet = "10.42.3.0/24".parse().unwrap();
        assert!(
            allows(&m, &k.subnet(&subnet), true),
            "claims are transactions on the subnet's key"
        );
        for read in [k.network_config(), k.subnets(), k.service("m2", "web")] {
            assert!(allows(&m, &read, false), "{read}");
        }
        let l = leader_permissions(&k);
        assert!(!allows(&l, &k.network_config(), true));
        assert!(allows(&operator_permissions(&k), &k.network_config(), true));
        assert!(allows(&m, &k.unit("web"), false));
        assert!(
            allows(&m, &k.purge("web"), false),
            "a machine reads the purges"
        );
        assert!(allows(&m, &k.assign("m1"), false));
        assert!(!allows(&m, &k.assign("m2"), false));
        assert!(
            !allows(&m, &k.logs("m2", "web"), false),
            "no other machine's logs"
        );
        let l = leader_permissions(&k);
        assert!(allows(&l, &k.assign("m2"), true) && allows(&l, &k.leader(), true));
        assert!(!allows(&l, &k.unit("web"), true));
        assert!(
            allows(&l, &k.pin("web"), true),
            "the leader records the pins"
        );
        assert!(
            !allows(&l, &k.purge("web"), true),
            "only the operator asks for a purge"
        );
        assert!(allows(&operator_permissions(&k), &k.purge("web"), true));
        assert!(allows(&operator_permissions(&k), &k.unit("web"), true));
    }

    #[test]
    fn passwords_are_made_once_and_kept_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        let a = password_file(&p).unwrap();
        assert_eq!(a.len(), 48);
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(password_file(&p).unwrap(), a);
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
        let e = password_file(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600") && !e.contains(&a), "{e}");
        assert!(matches!(
            futures_util::FutureExt::now_or_never(add_machine(
                &Client::new(&["http://127.0.0.1:1"]).unwrap(),
                &Keys::new("/f/"),
                "a/b",
                "x",
                false
            )),
            Some(Err(AccessError::BadId(_)))
        ));
    }
}
