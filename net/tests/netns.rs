//! Named network namespaces: made, entered, found again, deleted.

mod common;

use caisson_net::netns::{NetNs, NetnsError};

fn netns_inode() -> String {
    std::fs::read_link("/proc/thread-self/ns/net")
        .expect("/proc/thread-self/ns/net")
        .display()
        .to_string()
}

#[test]
fn create_run_reopen_delete() {
    let mut lab = common::Lab::new();
    let ns = lab.ns("a");
    let outside = netns_inode();
    let inside = ns.run(netns_inode).unwrap();
    assert_ne!(
        inside, outside,
        "the closure did not run in the new namespace"
    );
    assert_eq!(
        netns_inode(),
        outside,
        "the caller's thread changed namespace"
    );

    let again = NetNs::ensure(ns.path()).unwrap();
    assert_eq!(
        again.run(netns_inode).unwrap(),
        inside,
        "ensure made a new namespace"
    );
    assert!(matches!(
        NetNs::create(ns.path()),
        Err(NetnsError::Exists { .. })
    ));

    // A new namespace has only a loopback, and it is down.
    let links = common::run_in(&ns, &["ip", "-j", "link", "show"]);
    let links: serde_json::Value = serde_json::from_str(&links).unwrap();
    let names: Vec<&str> = links
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["ifname"].as_str())
        .collect();
    assert_eq!(names, ["lo"]);

    let path = ns.path().to_path_buf();
    drop((ns, again));
    NetNs::delete(&path).unwrap();
    assert!(!path.exists());
    assert!(matches!(
        NetNs::open(&path),
        Err(NetnsError::NotNetns { .. })
    ));
}

#[test]
fn the_directory_is_a_shared_mount_point() {
    let mut lab = common::Lab::new();
    let ns = lab.ns("s");
    let dir = lab.dir().to_string_lossy().into_owned();
    let out = common::run_in(
        &ns,
        &["findmnt", "-n", "-o", "PROPAGATION", "--mountpoint", &dir],
    );
    assert!(out.contains("shared"), "{dir}: {out}");
    // Once is enough: a second namespace in the same directory stacks no second mount.
    lab.ns("t");
    let out = common::run_in(
        &ns,
        &["findmnt", "-n", "-o", "TARGET", "--mountpoint", &dir],
    );
    assert_eq!(out.lines().count(), 1, "{out}");
}

#[test]
fn a_panic_inside_reaches_the_caller() {
    let mut lab = common::Lab::new();
    let ns = lab.ns("p");
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ns.run(|| panic!("inside")).unwrap();
    }));
    assert!(caught.is_err());
}
