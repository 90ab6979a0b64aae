//! The supervisor's unit tests, with the recording fake and a fake clock.

use super::*;
use crate::cgroup::Cgroups;
use crate::deps::tests::svc;
use crate::logs::NoOutput;
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

fn child_of(s: &Supervisor, name: &str) -> ChildId {
    s.services.get(name).and_then(|x| x.child()).unwrap()
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
    let pid = child_of(&s, "flaky");
    s.on_exit(pid, Exit::Code(1), t0 + Duration::from_millis(10));
    assert_eq!(state_of(&s, "flaky"), "restarting");
    s.tick(t0 + Duration::from_millis(100));
    assert_eq!(spawned(&rec).len(), 1, "restarted before the backoff delay");
    s.tick(t0 + Duration::from_millis(250));
    assert_eq!(spawned(&rec).len(), 2);
    let pid = child_of(&s, "flaky");
    s.on_exit(pid, Exit::Code(1), t0 + Duration::from_millis(260));
    s.tick(t0 + Duration::from_millis(500));
    assert_eq!(spawned(&rec).len(), 2, "second delay is 400 ms");
    s.tick(t0 + Duration::from_millis(700));
    assert_eq!(spawned(&rec).len(), 3);
    assert_eq!(s.status()[0].restarts, 2);
}

#[test]
fn an_orphan_exit_is_not_kept_for_a_later_child_with_its_pid() {
    let (rec, mut s) = sup(vec![svc("quick", &[], &[])]);
    let t0 = Instant::now();
    // An orphan (reparented to PID 1) with pid 4242 is collected; then the pid wraps and the
    // service gets 4242. Kept and matched by pid, that exit would end the service at birth.
    rec.push_exit(4242, Exit::Code(0));
    let reaped = s.reaper.reap_all(rec.as_ref());
    assert!(reaped.is_empty());
    rec.set_next_pid(4242);
    s.tick(t0);
    assert_eq!(pid_of(&s, "quick"), 4242);
    s.tick(t0 + Duration::from_millis(10));
    assert_eq!(state_of(&s, "quick"), "running");
    assert_eq!(spawned(&rec).len(), 1);
}

#[test]
fn a_stale_exit_for_a_recycled_pid_is_not_the_new_process_s_exit() {
    let mut checked = svc("checked", &[], &[]);
    checked.ready = ReadyCheck::Command(vec!["/bin/check".into()]);
    let (rec, mut s) = sup(vec![svc("a", &[], &[]), checked]);
    let t0 = Instant::now();
    s.tick(t0);
    let a = child_of(&s, "a");
    // `a` exits with 0 and is collected; before the main loop reads that exit, the kernel
    // gives its pid to the readiness probe of `checked`.
    rec.push_exit(a.pid, Exit::Code(0));
    let exits = s.reaper.reap_all(rec.as_ref());
    rec.set_next_pid(a.pid);
    s.tick(t0 + Duration::from_millis(1));
    let probe = s.probe_of("checked").unwrap();
    assert_eq!(probe.pid, a.pid);
    for (child, exit) in exits {
        s.on_exit(child, exit, t0 + Duration::from_millis(2));
    }
    // The exit was `a`'s, not the probe's: `checked` is not ready, its probe still runs.
    assert_eq!(state_of(&s, "checked"), "starting");
    assert_eq!(s.probe_of("checked"), Some(probe));
    assert_eq!(state_of(&s, "a"), "exited");
    // The probe's own exit is its own.
    rec.push_exit(probe.pid, Exit::Code(0));
    for (child, exit) in s.reaper.reap_all(rec.as_ref()) {
        s.on_exit(child, exit, t0 + Duration::from_millis(3));
    }
    assert_eq!(state_of(&s, "checked"), "running");
}

#[test]
fn orphans_do_not_disturb_services() {
    let (rec, mut s) = sup(vec![svc("a", &[], &[])]);
    let t0 = Instant::now();
    s.tick(t0);
    rec.push_exit(4242, Exit::Code(0));
    for (child, exit) in s.reaper.reap_all(rec.as_ref()) {
        s.on_exit(child, exit, t0);
    }
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
    s.on_exit(child_of(&s, "once"), Exit::Code(0), t0);
    s.on_exit(child_of(&s, "fragile"), Exit::Signal(11), t0);
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
        child_of(&s, "agent"),
        child_of(&s, "containerd"),
        child_of(&s, "other"),
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
        [
            Call::Kill(agent.pid, Sig::Term),
            Call::Kill(other.pid, Sig::Term)
        ]
    );
    s.on_exit(agent, Exit::Signal(15), t0);
    assert!(s.tick(t0).is_empty());
    assert_eq!(kills(&rec).last(), Some(&Call::Kill(ctd.pid, Sig::Term)));
    s.on_exit(ctd, Exit::Code(0), t0);
    // `other` ignores SIGTERM: SIGKILL after its stop timeout.
    s.tick(t0 + Duration::from_secs(11));
    assert_eq!(kills(&rec).last(), Some(&Call::Kill(other.pid, Sig::Kill)));
    s.on_exit(other, Exit::Signal(9), t0 + Duration::from_secs(11));
    assert_eq!(s.tick(t0 + Duration::from_secs(11)), [Notice::ShutdownDone]);
    assert!(s.start_service("other", t0).is_err());
}

#[test]
fn control_stop_start_restart() {
    let (rec, mut s) = sup(vec![svc("a", &[], &[])]);
    let t0 = Instant::now();
    s.tick(t0);
    let pid = child_of(&s, "a");
    s.restart_service("a", t0).unwrap();
    assert_eq!(state_of(&s, "a"), "stopping");
    s.on_exit(pid, Exit::Signal(15), t0);
    s.tick(t0);
    assert_eq!(spawned(&rec).len(), 2);
    let pid = child_of(&s, "a");
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

/// A supervisor whose services' cgroups live in a temporary directory that the test fills.
fn sup_cg(specs: Vec<ServiceSpec>) -> (Arc<Recording>, Supervisor, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let (rec, mut s) = sup(specs);
    s.config.cgroups = Some(Cgroups {
        root: tmp.path().to_path_buf(),
    });
    (rec, s, tmp)
}

/// Puts `pids` in the cgroup of `name` (`populated` follows), and `cgroup.kill` if `kill`.
fn cgroup(tmp: &tempfile::TempDir, name: &str, pids: &[Pid], kill: bool) {
    let dir = tmp.path().join("system").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let procs: String = pids.iter().map(|p| format!("{p}\n")).collect();
    std::fs::write(dir.join("cgroup.procs"), procs).unwrap();
    let events = format!("populated {}\nfrozen 0\n", u8::from(!pids.is_empty()));
    std::fs::write(dir.join("cgroup.events"), events).unwrap();
    if kill {
        std::fs::write(dir.join("cgroup.kill"), "").unwrap();
    }
}

fn cgroup_killed(tmp: &tempfile::TempDir, name: &str) -> bool {
    let path = tmp.path().join("system").join(name).join("cgroup.kill");
    std::fs::read_to_string(path).is_ok_and(|t| t == "1")
}

fn kills(rec: &Recording) -> Vec<Call> {
    rec.calls()
        .into_iter()
        .filter(|c| matches!(c, Call::Kill(..)))
        .collect()
}

#[test]
fn stop_terms_the_whole_cgroup_and_waits_until_it_is_empty() {
    let (rec, mut s, tmp) = sup_cg(vec![svc("web", &[], &[])]);
    let t0 = Instant::now();
    s.tick(t0);
    let main = child_of(&s, "web");
    cgroup(&tmp, "web", &[main.pid, 555], true);
    s.stop_service("web", t0).unwrap();
    assert_eq!(
        kills(&rec),
        [Call::Kill(main.pid, Sig::Term), Call::Kill(555, Sig::Term)]
    );
    s.on_exit(main, Exit::Signal(15), t0);
    s.tick(t0 + Duration::from_secs(1));
    // The forked child is still there: not stopped yet.
    assert_eq!(state_of(&s, "web"), "stopping");
    cgroup(&tmp, "web", &[], true);
    s.tick(t0 + Duration::from_secs(2));
    assert_eq!(state_of(&s, "web"), "stopped");
    assert!(!cgroup_killed(&tmp, "web"));
}

#[test]
fn after_the_stop_timeout_the_cgroup_is_killed_and_then_given_up_on() {
    let (rec, mut s, tmp) = sup_cg(vec![svc("web", &[], &[])]);
    let t0 = Instant::now();
    s.tick(t0);
    let main = child_of(&s, "web");
    cgroup(&tmp, "web", &[main.pid, 555], true);
    s.restart_service("web", t0).unwrap();
    s.on_exit(main, Exit::Signal(15), t0);
    s.tick(t0 + Duration::from_secs(9));
    assert!(!cgroup_killed(&tmp, "web"));
    s.tick(t0 + Duration::from_secs(10));
    assert!(cgroup_killed(&tmp, "web"));
    // 555 is stuck in the kernel: after the grace, the restart fails rather than run beside it.
    s.tick(t0 + Duration::from_secs(15));
    assert_eq!(state_of(&s, "web"), "failed");
    assert_eq!(spawned(&rec).len(), 1);
    s.tick(t0 + Duration::from_secs(60));
    assert_eq!(spawned(&rec).len(), 1);
    // Once it is gone, a start request starts it.
    cgroup(&tmp, "web", &[], true);
    s.start_service("web", t0 + Duration::from_secs(61))
        .unwrap();
    assert_eq!(spawned(&rec).len(), 2);
}

#[test]
fn without_cgroup_kill_each_process_gets_sigkill() {
    let (rec, mut s, tmp) = sup_cg(vec![svc("web", &[], &[])]);
    let t0 = Instant::now();
    s.tick(t0);
    let main = child_of(&s, "web");
    cgroup(&tmp, "web", &[main.pid, 555], false);
    s.stop_service("web", t0).unwrap();
    s.tick(t0 + Duration::from_secs(10));
    let k = kills(&rec);
    assert!(k.contains(&Call::Kill(main.pid, Sig::Kill)), "{k:?}");
    assert!(k.contains(&Call::Kill(555, Sig::Kill)), "{k:?}");
    s.on_exit(main, Exit::Signal(9), t0 + Duration::from_secs(10));
    cgroup(&tmp, "web", &[], false);
    s.tick(t0 + Duration::from_secs(11));
    assert_eq!(state_of(&s, "web"), "stopped");
}

#[test]
fn a_restart_starts_the_new_process_only_once_the_old_cgroup_is_empty() {
    let (rec, mut s, tmp) = sup_cg(vec![svc("web", &[], &[])]);
    let t0 = Instant::now();
    s.tick(t0);
    let main = child_of(&s, "web");
    cgroup(&tmp, "web", &[main.pid, 555], true);
    s.restart_service("web", t0).unwrap();
    s.on_exit(main, Exit::Signal(15), t0);
    cgroup(&tmp, "web", &[555], true);
    s.tick(t0 + Duration::from_secs(1));
    assert_eq!(spawned(&rec).len(), 1, "started beside the old child");
    cgroup(&tmp, "web", &[], true);
    s.tick(t0 + Duration::from_secs(2));
    s.tick(t0 + Duration::from_secs(2));
    assert_eq!(spawned(&rec).len(), 2);
    assert_eq!(state_of(&s, "web"), "running");
}

#[test]
fn what_a_crashed_service_left_behind_is_stopped_before_it_starts_again() {
    let (rec, mut s, tmp) = sup_cg(vec![svc("web", &[], &[])]);
    let t0 = Instant::now();
    s.tick(t0);
    let main = child_of(&s, "web");
    cgroup(&tmp, "web", &[555], true);
    s.on_exit(main, Exit::Code(1), t0);
    assert_eq!(state_of(&s, "web"), "restarting");
    s.tick(t0 + Duration::from_secs(1));
    assert_eq!(spawned(&rec).len(), 1);
    assert_eq!(kills(&rec), [Call::Kill(555, Sig::Term)]);
    assert_eq!(state_of(&s, "web"), "stopping");
    cgroup(&tmp, "web", &[], true);
    s.tick(t0 + Duration::from_secs(2));
    s.tick(t0 + Duration::from_secs(2));
    assert_eq!(spawned(&rec).len(), 2);
}

#[test]
fn shutdown_is_done_only_when_every_cgroup_is_empty() {
    let mut once = svc("once", &[], &[]);
    once.kind = Kind::Oneshot;
    let (rec, mut s, tmp) = sup_cg(vec![svc("web", &[], &[]), once]);
    let t0 = Instant::now();
    s.tick(t0);
    let (web, once) = (child_of(&s, "web"), child_of(&s, "once"));
    // The oneshot finished but left a daemon behind.
    cgroup(&tmp, "once", &[777], true);
    s.on_exit(once, Exit::Code(0), t0);
    assert_eq!(state_of(&s, "once"), "exited");
    cgroup(&tmp, "web", &[web.pid, 555], true);
    s.begin_shutdown(t0);
    let k = kills(&rec);
    for pid in [web.pid, 555, 777] {
        assert!(k.contains(&Call::Kill(pid, Sig::Term)), "{k:?}");
    }
    s.on_exit(web, Exit::Signal(15), t0);
    cgroup(&tmp, "once", &[], true);
    assert!(s.tick(t0 + Duration::from_secs(1)).is_empty());
    cgroup(&tmp, "web", &[], true);
    assert_eq!(s.tick(t0 + Duration::from_secs(2)), [Notice::ShutdownDone]);
}

fn process_mode(name: &str) -> ServiceSpec {
    let mut spec = svc(name, &[], &[]);
    spec.kill_mode = crate::service::KillMode::Process;
    spec
}

#[test]
fn kill_mode_process_stops_the_main_process_alone() {
    let (rec, mut s, tmp) = sup_cg(vec![process_mode("containerd")]);
    let t0 = Instant::now();
    s.tick(t0);
    let main = child_of(&s, "containerd");
    // 555 is a shim holding a container.
    cgroup(&tmp, "containerd", &[main.pid, 555], true);
    s.stop_service("containerd", t0).unwrap();
    assert_eq!(kills(&rec), [Call::Kill(main.pid, Sig::Term)]);
    // Past the stop timeout, SIGKILL goes to the main process only, never to the cgroup.
    s.tick(t0 + Duration::from_secs(10));
    assert_eq!(
        kills(&rec),
        [
            Call::Kill(main.pid, Sig::Term),
            Call::Kill(main.pid, Sig::Kill)
        ]
    );
    assert!(!cgroup_killed(&tmp, "containerd"));
    cgroup(&tmp, "containerd", &[555], true);
    s.on_exit(main, Exit::Signal(9), t0 + Duration::from_secs(10));
    assert_eq!(state_of(&s, "containerd"), "stopped");
}

#[test]
fn kill_mode_process_restarts_beside_what_the_old_run_left() {
    let (rec, mut s, tmp) = sup_cg(vec![process_mode("containerd")]);
    let t0 = Instant::now();
    s.tick(t0);
    let first = child_of(&s, "containerd");
    cgroup(&tmp, "containerd", &[first.pid, 555], true);
    s.restart_service("containerd", t0).unwrap();
    cgroup(&tmp, "containerd", &[555], true);
    s.on_exit(first, Exit::Signal(15), t0);
    s.tick(t0 + Duration::from_millis(100));
    assert_eq!(spawned(&rec).len(), 2);
    assert_eq!(state_of(&s, "containerd"), "running");
    // A crash: the new run starts after the backoff, with the shim still there and untouched.
    let main = child_of(&s, "containerd");
    s.on_exit(main, Exit::Code(2), t0 + Duration::from_millis(200));
    s.tick(t0 + Duration::from_secs(1));
    assert_eq!(spawned(&rec).len(), 3);
    assert_eq!(state_of(&s, "containerd"), "running");
    assert_eq!(kills(&rec), [Call::Kill(first.pid, Sig::Term)]);
}

#[test]
fn kill_mode_process_at_shutdown_kills_and_waits_for_the_whole_cgroup() {
    let (rec, mut s, tmp) = sup_cg(vec![process_mode("containerd")]);
    let t0 = Instant::now();
    s.tick(t0);
    let main = child_of(&s, "containerd");
    cgroup(&tmp, "containerd", &[main.pid, 555], true);
    s.begin_shutdown(t0);
    let k = kills(&rec);
    for pid in [main.pid, 555] {
        assert!(k.contains(&Call::Kill(pid, Sig::Term)), "{k:?}");
    }
    s.on_exit(main, Exit::Signal(15), t0);
    cgroup(&tmp, "containerd", &[555], true);
    assert!(s.tick(t0 + Duration::from_secs(1)).is_empty());
    s.tick(t0 + Duration::from_secs(10));
    assert!(cgroup_killed(&tmp, "containerd"));
    cgroup(&tmp, "containerd", &[], true);
    assert_eq!(s.tick(t0 + Duration::from_secs(11)), [Notice::ShutdownDone]);
}

#[test]
fn a_shutdown_during_a_kill_mode_process_stop_takes_the_rest_of_the_cgroup() {
    let (rec, mut s, tmp) = sup_cg(vec![process_mode("containerd")]);
    let t0 = Instant::now();
    s.tick(t0);
    let main = child_of(&s, "containerd");
    cgroup(&tmp, "containerd", &[main.pid, 555], true);
    s.stop_service("containerd", t0).unwrap();
    assert!(!kills(&rec).contains(&Call::Kill(555, Sig::Term)));
    s.begin_shutdown(t0);
    assert!(kills(&rec).contains(&Call::Kill(555, Sig::Term)));
    cgroup(&tmp, "containerd", &[555], true);
    s.on_exit(main, Exit::Signal(15), t0);
    assert!(s.tick(t0 + Duration::from_secs(1)).is_empty());
    cgroup(&tmp, "containerd", &[], true);
    assert_eq!(s.tick(t0 + Duration::from_secs(2)), [Notice::ShutdownDone]);
}
