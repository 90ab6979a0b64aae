//! IPAM against a real directory: never one address twice (also from threads racing on the
//! same directory through two `Ipam` values), and the state survives an agent restart.

use caisson_net::ipam::Ipam;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

#[test]
fn two_threads_never_get_the_same_address() {
    let dir = tempfile::tempdir().unwrap();
    let subnet = "10.42.7.0/24".parse().unwrap();
    let threads: Vec<_> = (0..2)
        .map(|t| {
            // Each thread has its own Ipam, as two processes would.
            let ipam = Ipam::open(dir.path(), subnet).unwrap();
            std::thread::spawn(move || {
                (0..100)
                    .map(|i| ipam.allocate(&format!("t{t}-{i}")).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        all.extend(t.join().unwrap());
    }
    let unique: BTreeSet<Ipv4Addr> = all.iter().copied().collect();
    assert_eq!(unique.len(), 200, "an address was handed out twice");
    assert!(!unique.contains(&Ipv4Addr::new(10, 42, 7, 0)));
    assert!(!unique.contains(&Ipv4Addr::new(10, 42, 7, 1)));
    assert!(!unique.contains(&Ipv4Addr::new(10, 42, 7, 255)));
    let ipam = Ipam::open(dir.path(), subnet).unwrap();
    assert_eq!(ipam.list().unwrap().len(), 200);
}

#[test]
fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let subnet = "10.42.8.0/24".parse().unwrap();
    let (a, b) = {
        let ipam = Ipam::open(dir.path(), subnet).unwrap();
        let a = ipam.allocate("db-1").unwrap();
        let b = ipam.allocate("web-1").unwrap();
        ipam.release("db-1").unwrap();
        (a, b)
    };
    let ipam = Ipam::open(dir.path(), subnet).unwrap();
    assert_eq!(
        ipam.allocate("web-1").unwrap(),
        b,
        "a restarted agent keeps the address"
    );
    let listed = ipam.list().unwrap();
    assert_eq!(listed.get(&b).map(String::as_str), Some("web-1"));
    assert!(!listed.contains_key(&a));
    let c = ipam.allocate("cache-1").unwrap();
    assert_ne!(c, b);
}
