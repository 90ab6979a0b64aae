use super::*;
use caisson_net::endpoint::{Port, Proto};
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;

fn instance(id: &str, last: u8, ports: &[(Option<&str>, u16)]) -> Instance {
    Instance {
        id: id.into(),
        address: Ipv4Addr::new(10, 42, last, 2),
        ports: ports
            .iter()
            .map(|(n, p)| Port {
                name: n.map(str::to_string),
                port: *p,
                proto: Proto::Tcp,
            })
            .collect(),
        machine: format!("m{last}"),
        revision: 3,
    }
}

fn web(ids: &[(&str, u8)]) -> Endpoints {
    let mut e = Endpoints::default();
    for (id, last) in ids {
        e.insert(
            "web",
            instance(id, *last, &[(Some("http"), 80), (None, 9000)]),
        );
    }
    e
}

fn services(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

const LB: &str = "\
global
    daemon

backend web
{% for i in services.web %}
    server {{ i.id }} {{ i.address }}:{{ i.ports.http }} check
{% endfor %}
";

#[test]
fn the_context_and_a_load_balancer_config() {
    let out = render(
        "lb.tmpl",
        LB,
        &web(&[("b", 2), ("a", 1)]),
        &services(&["web"]),
    )
    .unwrap();
    assert_eq!(
        out,
        "global\n    daemon\n\nbackend web\n    server a 10.42.1.2:80 check\n    server b 10.42.2.2:80 check\n"
    );
    let fields = "{% for i in services.web %}{{ i.id }} {{ i.address }} {{ i.port }} \
                  {{ i.ports | dictsort }} {{ i.machine }} {{ i.revision }}{% endfor %}";
    let out = render("f", fields, &web(&[("a", 1)]), &services(&["web"])).unwrap();
    assert_eq!(out, "a 10.42.1.2 80 [('http', 80)] m1 3");
    // A unit with no healthy instance is an empty list, not an error.
    let out = render(
        "n",
        "{{ services.db | length }}{% if not services.db %} none{% endif %}",
        &web(&[("a", 1)]),
        &services(&["web", "db"]),
    )
    .unwrap();
    assert_eq!(out, "0 none");
    // No ports: `port` is undefined.
    let mut e = Endpoints::default();
    e.insert("web", instance("a", 1, &[]));
    let out = render(
        "p",
        "{{ services.web[0].port is defined }}",
        &e,
        &services(&["web"]),
    )
    .unwrap();
    assert_eq!(out, "False");
    // No HTML escaping in a config file, whatever its name.
    let out = render("x.html", "{{ '<a&b>' }}", &e, &services(&["web"])).unwrap();
    assert_eq!(out, "<a&b>");
}

#[test]
fn the_output_is_stable_and_follows_the_endpoints() {
    let s = services(&["web"]);
    let a = render("t", LB, &web(&[("a", 1), ("b", 2), ("c", 3)]), &s).unwrap();
    let b = render("t", LB, &web(&[("c", 3), ("a", 1), ("b", 2)]), &s).unwrap();
    assert_eq!(a, b);
    let fewer = render("t", LB, &web(&[("a", 1), ("c", 3)]), &s).unwrap();
    assert_ne!(a, fewer);
    assert!(!fewer.contains("10.42.2.2"));
    let moved = render("t", LB, &web(&[("a", 1), ("b", 9), ("c", 3)]), &s).unwrap();
    assert!(moved.contains("10.42.9.2") && !moved.contains("10.42.2.2"));
}

#[test]
fn templates_that_do_not_render_say_why_and_where() {
    let e = web(&[("a", 1)]);
    let s = services(&["web"]);
    for (text, want) in [
        ("{% for i in services.web %}", "line 1"),
        ("a\n{{ services.web[0].nope }}", "line 2"),
        ("{{ services.db }}", "undefined"),
        ("{{ nothing }}", "undefined"),
        ("{{ 1 / 0 }}", "line 1"),
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "fuel",
        ),
    ] {
        let err = render("/etc/caisson/units/lb/h.tmpl", text, &e, &s).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("template /etc/caisson/units/lb/h.tmpl: ") && msg.contains(want),
            "{text}: {msg}"
        );
    }
    let big = "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}";
    assert_eq!(
        render("b", big, &e, &s),
        Err(TemplateError::TooLarge {
            src: "b".into(),
            limit: MAX_OUTPUT
        })
    );
}

#[test]
fn sources_are_provisioned_files_only() {
    let e = read_source("/etc/caisson/units/caisson-no-such-unit/x.tmpl")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/etc/caisson/units/caisson-no-such-unit/x.tmpl") && e.contains("provision"),
        "{e}"
    );
    // Symbolic links (here `..` through a real directory) are followed, then checked.
    if Path::new("/etc/caisson").is_dir() {
        let e = read_source("/etc/caisson/../passwd")
            .unwrap_err()
            .to_string();
        assert!(e.contains("resolves to /etc/passwd"), "{e}");
    }
}

fn template(dest: &str) -> Template {
    Template {
        src: "/etc/caisson/units/lb/h.tmpl".into(),
        dest: dest.into(),
        volume: "conf".into(),
        services: services(&["web"]),
        reload: None,
    }
}

#[test]
fn a_file_is_written_only_when_its_text_changes() {
    let root = tempfile::tempdir().unwrap();
    let conf = root.path().join("lb/conf");
    let t = template("etc/haproxy.cfg");
    let mut r = Renderer::default();
    let one = web(&[("a", 1)]);
    assert_eq!(
        r.apply_text("lb", &t, LB, root.path(), &one),
        Ok(Outcome::NoVolume)
    );
    std::fs::create_dir_all(&conf).unwrap();
    assert_eq!(
        r.apply_text("lb", &t, LB, root.path(), &one),
        Ok(Outcome::Written)
    );
    let file = conf.join("etc/haproxy.cfg");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o644);
    assert!(std::fs::read_to_string(&file)
        .unwrap()
        .contains("10.42.1.2:80"));
    // Unchanged: no write (the inode and the counter stay).
    assert_eq!(
        r.apply_text("lb", &t, LB, root.path(), &one),
        Ok(Outcome::Unchanged)
    );
    assert_eq!(r.writes, 1);
    assert_eq!(std::fs::metadata(&file).unwrap().ino(), meta.ino());
    // A new agent finds the same text on disk: no write either.
    let mut fresh = Renderer::default();
    assert_eq!(
        fresh.apply_text("lb", &t, LB, root.path(), &one),
        Ok(Outcome::Unchanged)
    );
    assert_eq!(fresh.writes, 0);
    // Changed endpoints: a new file replaces the old one (renamed in: a new inode).
    let two = web(&[("a", 1), ("b", 2)]);
    assert_eq!(
        r.apply_text("lb", &t, LB, root.path(), &two),
        Ok(Outcome::Written)
    );
    assert_ne!(std::fs::metadata(&file).unwrap().ino(), meta.ino());
    assert!(std::fs::read_to_string(&file)
        .unwrap()
        .contains("10.42.2.2:80"));
    let names: Vec<_> = std::fs::read_dir(conf.join("etc")).unwrap().collect();
    assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    // The file removed or changed behind the renderer's back: written again.
    std::fs::remove_file(&file).unwrap();
    assert_eq!(
        r.apply_text("lb", &t, LB, root.path(), &two),
        Ok(Outcome::Written)
    );
    std::fs::write(&file, "edited").unwrap();
    assert_eq!(
        r.apply_text("lb", &t, LB, root.path(), &two),
        Ok(Outcome::Written)
    );
    assert!(std::fs::read_to_string(&file)
        .unwrap()
        .contains("10.42.2.2:80"));
    assert_eq!(r.writes, 4);
    // Forgotten units' files are forgotten.
    r.retain(root.path(), |u| u != "lb");
    assert!(r.last.is_empty());
}

#[test]
fn a_broken_template_keeps_the_old_file() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("lb/conf")).unwrap();
    let t = template("haproxy.cfg");
    let mut r = Renderer::default();
    let one = web(&[("a", 1)]);
    r.apply_text("lb", &t, LB, root.path(), &one).unwrap();
    let file = root.path().join("lb/conf/haproxy.cfg");
    let before = std::fs::read_to_string(&file).unwrap();
    let e = r
        .apply_text(
            "lb",
            &t,
            "{{ services.web[0].nope }}",
            root.path(),
            &web(&[("b", 2)]),
        )
        .unwrap_err();
    assert!(
        matches!(&e, TemplateError::Render { src, .. } if src == "/etc/caisson/units/lb/h.tmpl"),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), before);
    assert_eq!(r.writes, 1);
}

#[test]
fn links_the_container_made_in_its_volume_are_not_followed() {
    let root = tempfile::tempdir().unwrap();
    let conf = root.path().join("lb/conf");
    std::fs::create_dir_all(&conf).unwrap();
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    // The file itself a link: replaced by the rendered file, the target untouched.
    std::os::unix::fs::symlink(&victim, conf.join("haproxy.cfg")).unwrap();
    let mut r = Renderer::default();
    let one = web(&[("a", 1)]);
    assert_eq!(
        r.apply_text("lb", &template("haproxy.cfg"), LB, root.path(), &one),
        Ok(Outcome::Written)
    );
    assert!(!std::fs::symlink_metadata(conf.join("haproxy.cfg"))
        .unwrap()
        .is_symlink());
    // A directory on the way a link: refused.
    std::os::unix::fs::symlink(outside.path(), conf.join("etc")).unwrap();
    let e = r
        .apply_text("lb", &template("etc/victim"), LB, root.path(), &one)
        .unwrap_err();
    assert!(
        matches!(&e, TemplateError::Write { message, .. } if message.contains("not a directory")),
        "{e}"
    );
    // A FIFO where the file goes: not read (no hang), replaced.
    let fifo = conf.join("fifo.cfg");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success()));
    assert_eq!(
        r.apply_text("lb", &template("fifo.cfg"), LB, root.path(), &one),
        Ok(Outcome::Written)
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(std::fs::metadata(&fifo).unwrap().is_file());
}
