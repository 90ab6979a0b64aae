//! What a machine's fleet id may be. The id names etcd keys (`machines/<id>`,
//! `status/<id>/...`) and an etcd role and user (`caisson-machine-<id>`), and a role grants a
//! key prefix: an id holding `/` would let machine `a`'s prefix `status/a/` cover machine
//! `a/b`'s keys. The fleet agent and the machine config both check ids here.

/// The longest id accepted.
pub const MAX_LEN: usize = 64;

/// A fleet id that cannot name keys and a role.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a machine id (1-64 characters of A-Z a-z 0-9 . _ -, not . or ..)")]
pub struct FleetIdError(pub String);

/// Checks an id: 1-64 of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn check(id: &str) -> Result<(), FleetIdError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_LEN
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(FleetIdError(id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for good in ["web-1", "0123456789abcdef0123456789abcdef", "a.b_c"] {
            assert!(check(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
    }
}
