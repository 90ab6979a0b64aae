//! Bridge networking end to end against a real containerd and runc, with a network namespace
//! of the test's own standing in for the host (so the machine's own network is never touched):
//! the agent's local loop (`run_local`, the code a machine without etcd runs) sets the "host"
//! up (bridge, NAT, DNS responder on the bridge), gives `web` and `client` their own
//! namespaces and addresses; `client` finds `web` by name through the responder and fetches its
//! page; the host reaches `web` through its published port; removing the units takes their
//! namespaces and addresses away.
//!
//! Needs root, containerd, runc, busybox-static, nftables and iproute2 (ci/deps installs
//! them); without containerd and friends the test says why and passes, as the other
//! containerd tests do.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/containerd.rs"]
mod testbed;

use caisson_fleet::agent::{run_local, Runtime};
use caisson_fleet::config::Config;
use caisson_fleet::hostnet::{HostNet, Settings};
use caisson_net::netns::NetNs;
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use testbed::{busybox_archive, missing, Daemon};

const APPLETS: [&str; 10] = [
    "sh", "sleep", "echo", "mkdir", "cat", "httpd", "wget", "nslookup", "[", "test",
];

const WEB: &str = r#"command = ["/bin/sh", "-c", "mkdir -p /tmp/www && echo hello-web > /tmp/www/index.html && exec httpd -f -p 80 -h /tmp/www"]
ports = ["8080:80"]
"#;

/// Fetches web by name until it answers (the registration follows web's start).
const CLIENT: &str = r#"command = ["/bin/sh", "-c", "i=0; while [ $i -lt 90 ]; do if wget -q -O /tmp/got http://web.caisson/index.html; then echo got=$(cat /tmp/got); exec sleep 100000; fi; i=$((i+1)); sleep 1; done; echo gave-up; exit 1"]
restart = "never"
"#;

fn http_get(addr: &str) -> std::io::Result<String> {
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn bridge_units_find_each_other_by_name_and_publish_a_port() {
    if let Some(why) = missing() {
        eprintln!("skipped: {why}");
        return;
    }
    for (tool, pkg) in [("/usr/sbin/nft", "nftables"), ("/usr/bin/ip", "iproute2")] {
        assert!(
            std::path::Path::new(tool).exists(),
            "{tool} is missing: apt-get install -y {pkg} (ci/deps does)"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let daemon = Daemon::start();
    let mut rt = daemon.runtime("bridge");
    let archive = d.join("busybox.tar");
    busybox_archive(&archive, &APPLETS);
    let units = d.join("units");
    std::fs::create_dir_all(&units).unwrap();
    let image = format!("[image]\npath = \"{}\"\n", archive.display());
    std::fs::write(units.join("web.toml"), format!("{WEB}{image}")).unwrap();
    std::fs::write(units.join("client.toml"), format!("{CLIENT}{image}")).unwrap();
    let settings = Settings {
        subnet: "10.213.7.0/24".parse().unwrap(),
        netns_dir: d.join("netns"),
        state_dir: d.join("net"),
        ..Settings::default()
    };
    let net = HostNet::new(settings);
    rt.network = Some(net.clone());
    let config = Config {
        units_dir: units,
        ..Config::default()
    };
    let host = NetNs::create(d.join("host-ns")).unwrap();
    let netns_dir = d.join("netns");
    let result = host
        .run(move || {
            let tokio = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            tokio.block_on(async {
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let agent = run_local(&config, &rt, Some(net.clone()), async {
                    let _ = stopped.await;
                });
                let check = async {
                    let deadline = Instant::now() + Duration::from_secs(120);
                    let log = loop {
                        let log = rt.logs("client", 20).await.unwrap_or_default().join("\n");
                        if log.contains("got=") || log.contains("gave-up") {
                            break log;
                        }
                        assert!(
                            Instant::now() < deadline,
                            "client never fetched web: {log:?}"
                        );
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    };
                    let web = net.address("web").expect("web has an address");
                    let client = net.address("client").expect("client has an address");
                    // From the "host": the published port on the bridge's address.
                    let page = tokio::task::spawn_blocking(|| http_get("10.213.7.1:8080"))
                        .await
                        .unwrap();
                    let _ = stop.send(());
                    (log, web, client, page)
                };
                let ((), checked) = tokio::join!(agent, check);
                // Removing the units takes their namespaces and addresses.
                for u in ["web", "client"] {
                    rt.remove(u).await.unwrap();
                }
                let gone = (net.address("web"), net.address("client"));
                (checked, gone)
            })
        })
        .unwrap();
    let ((log, web, client, page), gone) = result;
    assert!(log.contains("got=hello-web"), "client's log: {log}");
    let subnet: caisson_net::cluster::Ipv4Net = "10.213.7.0/24".parse().unwrap();
    assert!(subnet.contains(&web) && subnet.contains(&client) && web != client);
    let page = page.expect("the published port answers on the host");
    assert!(page.contains("hello-web"), "{page}");
    assert_eq!(gone, (None, None), "addresses released");
    let left: Vec<_> = std::fs::read_dir(&netns_dir)
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    NetNs::delete(d.join("host-ns")).unwrap();
}
