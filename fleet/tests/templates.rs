//! Templates against a real containerd and runc: a busybox "load balancer" unit whose PID 1
//! traps SIGHUP (as haproxy and nginx reload) and copies its config when told; the agent's
//! [`Templates::sync`] renders a provisioned template from the endpoints into the unit's
//! volume and runs `reload = ["/bin/sh", "-c", "kill -HUP 1"]` in the container. The test checks
//! that the container sees each new file and is told once per change, that unchanged endpoints
//! neither rewrite nor reload, and that a template that stops rendering keeps the old file and
//! says why.
//!
//! Needs root, `containerd`, `runc` and `busybox-static`; without them the test says why and
//! passes. The template is provisioned under `/etc/caisson/units/` (the only place templates may
//! come from) and removed at the end, with whatever directories the test had to make.

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The test's containerd and images (fleet/tests/common/containerd.rs).
#[path = "common/containerd.rs"]
mod testbed;

use caisson_fleet::agent::templates::Templates;
use caisson_fleet::agent::Runtime;
use caisson_fleet::unit::UnitSpec;
use caisson_net::endpoint::{Endpoints, Instance, Port, Proto};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use testbed::{busybox_archive, log_until, missing, Daemon, Made};

const APPLETS: [&str; 6] = ["sh", "echo", "cat", "sleep", "kill", "wc"];

/// PID 1 of the "load balancer": on SIGHUP it copies the config it was given and counts.
const SCRIPT: &str = "trap 'cat /conf/lb.cfg > /conf/seen; echo hup >> /conf/reloads' HUP; \
                      echo ready; while :; do sleep 0.1; done";

const TEMPLATE: &str = "\
frontend http
    bind :8080
backend web
{% for i in services.web %}
    server {{ i.id }} {{ i.address }}:{{ i.ports.http }} check
{% endfor %}
";

fn unit(archive: &Path, src: &Path) -> UnitSpec {
    UnitSpec::parse(
        "lb",
        &format!(
            "restart = \"never\"\ncommand = [\"/bin/sh\", \"-c\", \"{SCRIPT}\"]\n\
             volumes = [{{ name = \"conf\", path = \"/conf\" }}]\n\
             [image]\npath = \"{}\"\n\
             [[templates]]\nsrc = \"{}\"\ndest = \"lb.cfg\"\nvolume = \"conf\"\n\
             services = [\"web\"]\nreload = [\"/bin/sh\", \"-c\", \"kill -HUP 1\"]\n",
            archive.display(),
            src.display()
        ),
    )
    .unwrap()
}

fn web(n: u8) -> Endpoints {
    let mut e = Endpoints::default();
    for i in 1..=n {
        e.insert(
            "web",
            Instance {
                id: format!("web-{i}"),
                address: Ipv4Addr::new(10, 42, i, 2),
                ports: vec![Port {
                    name: Some("http".into()),
                    port: 80,
                    proto: Proto::Tcp,
                }],
                machine: format!("m{i}"),
                revision: 1,
            },
        );
    }
    e
}

/// Waits until `path` on the host reads `want`.
async fn until_reads(path: &Path, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = std::fs::read_to_string(path).unwrap_or_default();
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{}: {got:?}", path.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rendered_config_reaches_the_container_and_reloads_it_once_per_change() {
    if let Some(why) = missing() {
        eprintln!("skipping the templates test: {why}");
        return;
    }
    let daemon = Daemon::start();
    let mut rt = daemon.runtime("templates");
    rt.volume_root = daemon.dir.path().join("volumes");
    let archive = daemon.dir.path().join("busybox.oci.tar");
    busybox_archive(&archive, &APPLETS);
    let conf_dir = PathBuf::from(format!(
        "/etc/caisson/units/caisson-test-templates-{}",
        std::process::id()
    ));
    let _made = Made::dir(&conf_dir);
    let src = conf_dir.join("lb.cfg.tmpl");
    std::fs::write(&src, TEMPLATE).unwrap();

    let spec = unit(&archive, &src);
    let desired = BTreeMap::from([("lb".to_string(), spec.clone())]);
    let mut templates = Templates::new(&rt.volume_root);
    // Before the container exists its volume does not: nothing to do yet, and no error.
    assert!(templates.sync(&desired, &web(1), &rt).await.is_empty());
    rt.start(&spec, "h1")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    log_until(&rt, "lb", "ready").await;

    let volume = rt.volume_root.join("lb/conf");
    let (file, seen, reloads) = (
        volume.join("lb.cfg"),
        volume.join("seen"),
        volume.join("reloads"),
    );
    // The first render: written, and the container told.
    let errors = templates.sync(&desired, &web(1), &rt).await;
    assert!(errors.is_empty(), "{errors:?}");
    let one = std::fs::read_to_string(&file).unwrap();
    assert_eq!(
        one,
        "frontend http\n    bind :8080\nbackend web\n    server web-1 10.42.1.2:80 check\n"
    );
    until_reads(&seen, &one).await;
    until_reads(&reloads, "hup\n").await;

    // The same endpoints: no write, no reload.
    assert!(templates.sync(&desired, &web(1), &rt).await.is_empty());
    assert_eq!(templates.renderer.writes, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(std::fs::read_to_string(&reloads).unwrap(), "hup\n");

    // A second instance: the container sees both backends, told once more.
    assert!(templates.sync(&desired, &web(2), &rt).await.is_empty());
    let two = std::fs::read_to_string(&file).unwrap();
    assert!(two.contains("server web-2 10.42.2.2:80 check"), "{two}");
    until_reads(&seen, &two).await;
    until_reads(&reloads, "hup\nhup\n").await;

    // The template breaks: the old file stays, the error names the template and the line.
    std::fs::write(&src, "backend web\n{{ services.web[0].weight }}\n").unwrap();
    let errors = templates.sync(&desired, &web(1), &rt).await;
    let e = errors.get("lb").expect("an error for lb");
    assert!(
        e.starts_with(&format!("templates[0]: template {}", src.display())) && e.contains("line 2"),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), two);
    // Fixed: rendered from the endpoints of now, and reloaded.
    std::fs::write(&src, TEMPLATE).unwrap();
    assert!(templates.sync(&desired, &web(1), &rt).await.is_empty());
    until_reads(&seen, &one).await;
    until_reads(&reloads, "hup\nhup\nhup\n").await;

    rt.remove("lb").await.unwrap();
    assert!(rt.delete_volumes("lb").await.unwrap());
}
