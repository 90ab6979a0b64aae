//! User and group names to ids, read from `/etc/passwd` and `/etc/group` directly: the init is
//! linked statically and must not rely on NSS.

use std::path::Path;

/// A name that is neither in the files nor a number.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("unknown user {0:?} (not in /etc/passwd)")]
    User(String),
    #[error("unknown group {0:?} (not in /etc/group)")]
    Group(String),
}

fn lookup(file_text: &str, name: &str) -> Option<(u32, u32)> {
    file_text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() >= 3 && f[0] == name {
            let id = f[2].parse().ok()?;
            let gid = f.get(3).and_then(|g| g.parse().ok()).unwrap_or(id);
            Some((id, gid))
        } else {
            None
        }
    })
}

/// The uid and primary gid of `user` (a name or a number), under `root`.
pub fn user(root: &Path, user: &str) -> Result<(u32, u32), UserError> {
    let text = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
    if let Some(found) = lookup(&text, user) {
        return Ok(found);
    }
    user.parse::<u32>()
        .map(|n| (n, n))
        .map_err(|_| UserError::User(user.to_string()))
}

/// The gid of `group` (a name or a number), under `root`.
pub fn group(root: &Path, group: &str) -> Result<u32, UserError> {
    let text = std::fs::read_to_string(root.join("etc/group")).unwrap_or_default();
    if let Some((gid, _)) = lookup(&text, group) {
        return Ok(gid);
    }
    group
        .parse::<u32>()
        .map_err(|_| UserError::Group(group.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_and_numbers() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("etc")).unwrap();
        std::fs::write(
            tmp.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\netcd:x:105:110::/var/lib/etcd:/usr/sbin/nologin\n",
        )
        .unwrap();
        std::fs::write(tmp.path().join("etc/group"), "root:x:0:\netcd:x:110:\n").unwrap();
        assert_eq!(user(tmp.path(), "etcd"), Ok((105, 110)));
        assert_eq!(user(tmp.path(), "1000"), Ok((1000, 1000)));
        assert_eq!(group(tmp.path(), "etcd"), Ok(110));
        assert!(user(tmp.path(), "nobody-here").is_err());
        assert!(group(tmp.path(), "nope").is_err());
    }
}
