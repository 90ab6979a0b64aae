//! Owner and group names are looked up in the root's own /etc/passwd and /etc/group, read
//! beneath the root without following a link, and with a size cap.

use crate::apply::check;
use crate::plan::{NoChecks, ID_FILE_LIMIT};
use crate::tests::root;
use std::path::Path;

fn owned_by(owner: &str, group: &str) -> String {
    format!(
        "version = 1\n[[files]]\npath = \"/etc/app.conf\"\ncontents = \"x\"\n\
         owner = \"{owner}\"\ngroup = \"{group}\"\n"
    )
}

/// The uid and gid the plan gives `/etc/app.conf`, or the error's text.
fn ids(r: &Path, config: &str) -> Result<(u32, u32), String> {
    let plan = check(config.as_bytes(), Some(r), &NoChecks).map_err(|e| e.to_string())?;
    let e = plan.entries.iter().find(|e| e.path == "/etc/app.conf");
    Ok(e.map(|e| (e.uid, e.gid)).unwrap())
}

#[test]
fn names_resolve_from_the_roots_own_files() {
    let tmp = root();
    assert_eq!(ids(tmp.path(), &owned_by("app", "adm")), Ok((1000, 4)));
    let e = ids(tmp.path(), &owned_by("nobody", "adm")).unwrap_err();
    assert!(e.contains("no user \"nobody\" in /etc/passwd"), "{e}");
    let e = ids(tmp.path(), &owned_by("app", "wheel")).unwrap_err();
    assert!(e.contains("no group \"wheel\" in /etc/group"), "{e}");
}

#[test]
fn an_etc_passwd_that_is_a_link_out_of_the_root_is_refused_and_named() {
    let tmp = root();
    let outside = tempfile::tempdir().unwrap();
    let r = tmp.path();
    let evil = outside.path().join("passwd");
    std::fs::write(&evil, "intruder:x:0:0::/:/bin/sh\napp:x:0:0::/:/bin/sh\n").unwrap();
    std::fs::remove_file(r.join("etc/passwd")).unwrap();
    std::os::unix::fs::symlink(&evil, r.join("etc/passwd")).unwrap();
    for owner in ["intruder", "app"] {
        let e = ids(r, &owned_by(owner, "adm")).unwrap_err();
        assert!(e.contains("files[0].owner"), "{e}");
        assert!(
            e.contains(&r.join("etc/passwd").display().to_string()),
            "{e}"
        );
        assert!(e.contains("symbolic link"), "{e}");
        assert!(
            e.contains(&evil.display().to_string()),
            "the link's target: {e}"
        );
    }
}

#[test]
fn an_etc_group_that_is_a_link_is_refused_and_named() {
    let tmp = root();
    let r = tmp.path();
    std::fs::rename(r.join("etc/group"), r.join("group.real")).unwrap();
    std::os::unix::fs::symlink("../group.real", r.join("etc/group")).unwrap();
    let e = ids(r, &owned_by("app", "adm")).unwrap_err();
    assert!(e.contains("files[0].group"), "{e}");
    assert!(
        e.contains(&r.join("etc/group").display().to_string()),
        "{e}"
    );
    assert!(e.contains("symbolic link (to ../group.real)"), "{e}");
}

#[test]
fn an_etc_reached_through_a_link_is_refused_and_named() {
    let tmp = root();
    let outside = tempfile::tempdir().unwrap();
    let r = tmp.path();
    std::fs::rename(r.join("etc"), outside.path().join("etc")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("etc"), r.join("etc")).unwrap();
    let e = ids(r, &owned_by("app", "adm")).unwrap_err();
    assert!(
        e.contains(&format!("{}:", r.join("etc/passwd").display())),
        "{e}"
    );
    assert!(
        e.contains(&format!("{} is a symbolic link", r.join("etc").display())),
        "{e}"
    );
}

#[test]
fn an_etc_passwd_too_large_or_not_a_file_is_refused() {
    let tmp = root();
    let r = tmp.path();
    let mut big = String::from("app:x:1000:1000::/:/bin/false\n");
    big.push_str(&"#".repeat(ID_FILE_LIMIT as usize));
    std::fs::write(r.join("etc/passwd"), big).unwrap();
    let e = ids(r, &owned_by("app", "adm")).unwrap_err();
    assert!(
        e.contains(&format!("larger than {ID_FILE_LIMIT} bytes")),
        "{e}"
    );

    // A FIFO in its place would block a plain open for ever.
    std::fs::remove_file(r.join("etc/passwd")).unwrap();
    let out = std::process::Command::new("mkfifo")
        .arg(r.join("etc/passwd"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let e = ids(r, &owned_by("app", "adm")).unwrap_err();
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn a_root_without_etc_passwd_has_no_users() {
    let tmp = root();
    std::fs::remove_file(tmp.path().join("etc/passwd")).unwrap();
    let e = ids(tmp.path(), &owned_by("app", "adm")).unwrap_err();
    assert!(e.contains("no user \"app\" in /etc/passwd"), "{e}");
}
