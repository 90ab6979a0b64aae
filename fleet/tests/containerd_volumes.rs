//! Volumes and binds against a real containerd and runc: a unit writes into its volume, its
//! container is restarted, then replaced after a spec change, and reads its data back each
//! time; the volume is a directory under the runtime's volume root, kept when the container is
//! removed and gone only after `delete_volumes`; a read-only bind of a provisioned file under
//! `/etc/caisson/` is readable and cannot be written.
//!
//! Needs root, `containerd`, `runc` and `busybox-static`; without them the test says why and
//! passes. The bind's source is made under `/etc/caisson/units/` (the only place binds may come
//! from) and removed at the end, with whatever directories the test had to make.

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The test's containerd and images (fleet/tests/common/containerd.rs).
#[path = "common/containerd.rs"]
mod testbed;

use caisson_fleet::agent::{ContainerState, Runtime};
use caisson_fleet::unit::UnitSpec;
use std::path::{Path, PathBuf};
use testbed::{busybox_archive, log_until, missing, wait_for, Daemon, Made};

const APPLETS: [&str; 6] = ["sh", "echo", "cat", "test", "[", "sleep"];

/// Prints what it found in its volume, writes its generation there, tries to write the bind,
/// and sleeps.
const SCRIPT: &str = r#"
if [ -f /data/hello ]; then echo "found=$(cat /data/hello)"; else echo found=none; fi
echo "written-by-$GEN" > /data/hello
echo "conf=$(cat /etc/app.conf)"
(echo evil > /etc/app.conf) 2>&1; echo bindwrite=$?
echo done-$GEN
exec sleep 1000
"#;

fn unit(archive: &Path, source: &Path, generation: u32) -> UnitSpec {
    let script = SCRIPT.replace('"', "\\\"").replace('\n', "\\n");
    UnitSpec::parse(
        "store",
        &format!(
            "restart = \"never\"\nenv = {{ GEN = \"{generation}\" }}\n\
             command = [\"/bin/sh\", \"-c\", \"{script}\"]\n\
             volumes = [{{ name = \"data\", path = \"/data\" }}]\n\
             binds = [{{ source = \"{}\", path = \"/etc/app.conf\" }}]\n\
             [image]\npath = \"{}\"",
            source.display(),
            archive.display()
        ),
    )
    .unwrap()
}

fn status(log: &[String], key: &str) -> i32 {
    log.iter()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {log:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_outlive_restarts_and_replacement_and_binds_are_read_only() {
    if let Some(why) = missing() {
        eprintln!("skipping the volumes test: {why}");
        return;
    }
    let daemon = Daemon::start();
    let mut rt = daemon.runtime("volumes");
    rt.volume_root = daemon.dir.path().join("volumes");
    let archive = daemon.dir.path().join("busybox.oci.tar");
    busybox_archive(&archive, &APPLETS);
    let conf_dir = PathBuf::from(format!(
        "/etc/caisson/units/caisson-test-volumes-{}",
        std::process::id()
    ));
    let _made = Made::dir(&conf_dir);
    let source = conf_dir.join("app.conf");
    std::fs::write(&source, "port=8080").unwrap();

    // First start: an empty volume; the bind reads, and cannot be written.
    let first = unit(&archive, &source, 1);
    rt.start(&first, "g1")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let log = log_until(&rt, "store", "done-1").await;
    assert!(log.contains(&"found=none".to_string()), "{log:#?}");
    assert!(log.contains(&"conf=port=8080".to_string()), "{log:#?}");
    assert_ne!(status(&log, "bindwrite"), 0, "{log:#?}");
    assert!(
        log.iter().any(|l| l.contains("Read-only file system")),
        "{log:#?}"
    );
    assert_eq!(std::fs::read_to_string(&source).unwrap(), "port=8080");
    let on_host = rt.volume_root.join("store/data/hello");
    assert_eq!(
        std::fs::read_to_string(&on_host).unwrap().trim(),
        "written-by-1"
    );

    // The container is stopped and started again: the data is there.
    rt.stop_task("store").await.unwrap();
    wait_for(&rt, "store", |s| s != ContainerState::Running).await;
    rt.restart("store").await.unwrap();
    wait_for(&rt, "store", |s| s == ContainerState::Running).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let log = rt.logs("store", 100).await.unwrap();
        if log.iter().filter(|l| *l == "done-1").count() == 2 {
            assert!(log.contains(&"found=written-by-1".to_string()), "{log:#?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{log:#?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // The spec changes: the container is removed and made again; the data is still there.
    rt.remove("store").await.unwrap();
    assert!(on_host.exists(), "removing a container keeps its volumes");
    let second = unit(&archive, &source, 2);
    rt.start(&second, "g2").await.unwrap();
    let log = log_until(&rt, "store", "done-2").await;
    assert!(log.contains(&"found=written-by-1".to_string()), "{log:#?}");
    assert_eq!(
        std::fs::read_to_string(&on_host).unwrap().trim(),
        "written-by-2"
    );

    // Only delete_volumes (destroy --volumes) removes them: the next container starts empty.
    rt.remove("store").await.unwrap();
    assert!(rt.delete_volumes("store").await.unwrap());
    assert!(!rt.volume_root.join("store").exists());
    assert!(!rt.delete_volumes("store").await.unwrap());
    rt.start(&unit(&archive, &source, 3), "g3").await.unwrap();
    let log = log_until(&rt, "store", "done-3").await;
    assert!(log.contains(&"found=none".to_string()), "{log:#?}");

    // A bind whose source is missing on the machine: a clear error, nothing started.
    rt.remove("store").await.unwrap();
    std::fs::remove_file(&source).unwrap();
    let e = rt
        .start(&unit(&archive, &source, 4), "g4")
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains(&source.display().to_string())
            && e.to_string().contains("provision"),
        "{e}"
    );
    assert!(rt.list().await.unwrap().is_empty());
}
