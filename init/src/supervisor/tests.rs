//! The supervisor's unit tests, with the recording fake and a fake clock.

use super::*;
use crate::deps::tests::svc;
use crate::sys::{Call, Recording};

fn sup(specs: Vec<ServiceSpec>) -> (Arc<Recording>, Supervisor) {
    let rec = Arc::new(Recording::new(std::path::Path::new("/")));
    let config = Config {
        healthy_after: Duration::from_secs(5),
        ..Default::default()
    };
    let s = Supervisor::new(
        rec.clone(),
        Arc::new(Reaper::default()),
        Arc::new(NoOutput),
        config,
        specs,
        Vec::new(),
    );
    (rec, s)
}

fn spawned(rec: &Recording) -> Vec<String> {
    rec.calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Spawn(p) => Some(p),
            _ => None,
        })
        .collect()
}

fn pid_of(s: &Supervisor, name: &str) -> Pid {
    s.status()
        .into_iter()
        .find(|x| x.name == name)
        .and_then(|x| x.pid)
        .unwrap()
}

fn state_of(s: &Supervisor, name: &str) -> String {
    s.status()
        .into_iter()
        .find(|x| x.name == name)
        .unwrap()
        .state
}

#[test]
fn starts_in_dependency_order_and_announces_ready_then_healthy() {
    let (rec, mut s) = sup(vec![
        svc("agent", &["containerd"], &[]),
        svc("containerd", &[], &[]),
    ]);
    let t0 = Instant::now();
    let n = s.tick(t0);
    // containerd has no readiness check: ready once started, so agent starts in the same tick.
    assert_eq!(spawned(&rec), ["/bin/containerd", "/bin/agent"]);
    assert_eq!(n, [Notice::Ready]);
    assert!(s.tick(t0 + Duration::from_secs(1)).is_empty());
    assert_eq!(s.tick(t0 + Duration::from_secs(6)), [Notice::Healthy]);
}

#[test]
fn after_network_waits_until_the_network_settles() {
    let (rec, mut s) = sup(vec![svc("web", &[], &["network"]), svc("local", &[], &[])]);
    s.hold("network");
    let t0 = Instant::now();
    s.tick(t0);
    assert_eq!(spawned(&rec), ["/bin/local"]);
    assert_eq!(state_of(&s, "web"), "waiting");
    s.release("network");
    s.tick(t0 + Duration::from_millis(100));
    assert_eq!(spawned(&rec), ["/bin/local", "/bin/web"]);
}

#[test]
fn a_held_pseudo_service_holds_only_its_dependents_and_a_real_one_wins() {
    let (rec, mut s) = sup(vec![
        svc("update", &[], &["modules"]),
        svc("web", &[], &["network"]),
        svc("network", &[], &[]),
    ]);
    s.hold("modules");
    s.hold("network");
    let t0 = Instant::now();
    s.tick(t0);
    // A real service named `network` is what `after` means; nothing is spawned for `modules`.
    assert_eq!(spawned(&rec), ["/bin/network", "/bin/web"]);
    s.release("modules");
    s.tick(t0 + Duration::from_millis(100));
    assert_eq!(spawned(&rec), ["/bin/network", "/bin/web", "/bin/update"]);
}

#[test]
fn dependents_wait_for_readiness() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("ready");
    let mut db = svc("db", &[], &[]);
    db.ready = ReadyCheck::Path(sock.clone());
    let (rec, mut s) = sup(vec![svc("app", &["db"], &[]), db]);
    let t0 = Instant::now();
    assert!(s.tick(t0).is_empty());
    assert_eq!(spawned(&rec), ["/bin/db"]);
    std::fs::write(&sock, "").unwrap();
    s.tick(t0 + Duration::from_millis(300));
    assert_eq!(spawned(&rec), ["/bin/db", "/bin/app"]);
}

#[test]
fn restarts_with_backoff() {
    let (rec, mut s) = sup(vec![svc("flaky", &[], &[])]);
    let t0 = Instant::now();
    s.tick(t0);
    let pid = pid_of(&s, "flaky");
    s.on_exit(pid, Exit::Code(1), t0 + Duration::from_millis(10));
    assert_eq!(state_of(&s, "flaky"), "restarting");
    s.tick(t0 + Duration::from_millis(100));
    assert_eq!(spawned(&rec).len(), 1, "restarted before the backoff delay");
    s.tick(t0 + Duration::from_millis(250));
    assert_eq!(spawned(&rec).len(), 2);
    let pid = pid_of(&s, "flaky");
    s.on_exit(pid, Exit::Code(1), t0 + Duration::from_millis(260));
    s.tick(t0 + Duration::from_millis(500));
    assert_eq!(spawned(&rec).len(), 2, "second delay is 400 ms");
    s.tick(t0 + Duration::from_millis(700));
    assert_eq!(spawned(&rec).len(), 3);
    assert_eq!(s.status()[0].restarts, 2);
}

#[test]
fn exit_before_registration_is_not_lost() {
    let (_rec, mut s) = sup(vec![svc("quick", &[], &[])]);
    let t0 = Instant::now();
    // The recording fake hands out pid 100 first: its exit arrives before the spawn is
    // recorded (as when the reaper runs between fork and registration).
    s.on_exit(100, Exit::Code(3), t0);
    s.tick(t0);
    let st = &s.status()[0];
    assert_eq!(st.state, "restarting");
    assert_eq!(st.last_exit.as_deref(), Some("exit code 3"));
}

#[test]
fn orphans_do_not_disturb_services() {
    let (_rec, mut s) = sup(vec![svc("a", &[], &[])]);
    let t0 = Instant::now();
    s.tick(t0);
    s.on_exit(4242, Exit::Code(0), t0);
    assert_eq!(state_of(&s, "a"), "running");
}

#[test]
fn never_and_oneshot() {
    let mut once = svc("once", &[], &[]);
    once.kind = Kind::Oneshot;
    once.restart = Restart::Never;
    let mut fragile = svc("fragile", &[], &[]);
    fragile.restart = Restart::Never;
    let (_rec, mut s) = sup(vec![once, fragile, svc("after-once", &["once"], &[])]);
    let t0 = Instant::now();
    s.tick(t0);
    assert_eq!(state_of(&s, "after-once"), "waiting");
    s.on_exit(pid_of(&s, "once"), Exit::Code(0), t0);
    s.on_exit(pid_of(&s, "fragile"), Exit::Signal(11), t0);
    s.tick(t0);
    assert_eq!(state_of(&s, "once"), "exited");
    assert_eq!(state_of(&s, "fragile"), "failed");
    assert_eq!(state_of(&s, "after-once"), "running");
}

#[test]
fn failed_requirement_fails_dependents_and_blocks_ready() {
    let mut base = svc("base", &[], &[]);
    base.restart = Restart::Never;
    let (_rec, mut s) = sup(vec![base, svc("top", &["base"], &[])]);
    let t0 = Instant::now();
    let mut b = s.services.remove("base").unwrap();
    b.state = State::Failed("boom".into());
    s.services.insert("base".into(), b);
    assert!(s.tick(t0).is_empty());
    assert_eq!(state_of(&s, "top"), "failed");
}

#[test]
fn cycle_fails_only_its_members() {
    let (rec, mut s) = sup(vec![
        svc("a", &["b"], &[]),
        svc("b", &["a"], &[]),
        svc("c", &[], &[]),
    ]);
    s.tick(Instant::now());
    assert_eq!(spawned(&rec), ["/bin/c"]);
    let a = s.status().into_iter().find(|x| x.name == "a").unwrap();
    assert!(a.error.unwrap().contains("cycle"));
}

#[test]
fn shutdown_stops_dependents_first_and_escalates() {
    let (rec, mut s) = sup(vec![
        svc("agent", &["containerd"], &[]),
        svc("containerd", &[], &[]),
        svc("other", &[], &[]),
    ]);
    let t0 = Instant::now();
    s.tick(t0);
    let (agent, ctd, other) = (
        pid_of(&s, "agent"),
        pid_of(&s, "containerd"),
        pid_of(&s, "other"),
    );
    s.begin_shutdown(t0);
    let kills = |rec: &Recording| -> Vec<Call> {
        rec.calls()
            .into_iter()
            .filter(|c| matches!(c, Call::Kill(..)))
            .collect()
    };
    assert_eq!(
        kills(&rec),
        [Call::Kill(agent, Sig::Term), Call::Kill(other, Sig::Term)]
    );
    s.on_exit(agent, Exit::Signal(15), t0);
    assert!(s.tick(t0).is_empty());
    assert_eq!(kills(&rec).last(), Some(&Call::Kill(ctd, Sig::Term)));
    s.on_exit(ctd, Exit::Code(0), t0);
    // `other` ignores SIGTERM: SIGKILL after its stop timeout.
    s.tick(t0 + Duration::from_secs(11));
    assert_eq!(kills(&rec).last(), Some(&Call::Kill(other, Sig::Kill)));
    s.on_exit(other, Exit::Signal(9), t0 + Duration::from_secs(11));
    assert_eq!(s.tick(t0 + Duration::from_secs(11)), [Notice::ShutdownDone]);
    assert!(s.start_service("other", t0).is_err());
}

#[test]
fn control_stop_start_restart() {
    let (rec, mut s) = sup(vec![svc("a", &[], &[])]);
    let t0 = Instant::now();
    s.tick(t0);
    let pid = pid_of(&s, "a");
    s.restart_service("a", t0).unwrap();
    assert_eq!(state_of(&s, "a"), "stopping");
    s.on_exit(pid, Exit::Signal(15), t0);
    s.tick(t0);
    assert_eq!(spawned(&rec).len(), 2);
    let pid = pid_of(&s, "a");
    s.stop_service("a", t0).unwrap();
    s.on_exit(pid, Exit::Signal(15), t0);
    s.tick(t0 + Duration::from_secs(60));
    assert_eq!(state_of(&s, "a"), "stopped");
    s.start_service("a", t0).unwrap();
    assert_eq!(state_of(&s, "a"), "running");
    assert_eq!(
        s.start_service("nope", t0),
        Err(ControlError::Unknown("nope".into()))
    );
}
