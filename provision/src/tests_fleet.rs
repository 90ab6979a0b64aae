//! `[fleet]` with TLS and etcd credentials: the files and modes written, the fleet.toml
//! rendered, and every refusal named by its field without a byte of a key or password.

use crate::apply::{apply, check};
use crate::config::Config;
use crate::plan::{Kind, NoChecks};
use crate::tests::{err, mode, read, root, rustix_root, tree, EXAMPLE};
use std::os::unix::fs::MetadataExt;

/// The example's test key body and password: neither may appear in any message.
const KEY_BODY: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg";
const PASSWORD: &str = "t3st-pa55word";

const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBlTCCATugAwIBAgIU\n-----END CERTIFICATE-----";
const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBRTCB7QIUOlpIkCqt\n-----END CERTIFICATE-----";
const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----";

/// A `[fleet]` section on https with the given tls and auth tables (TOML text, may be empty).
fn fleet(endpoint: &str, extra: &str) -> String {
    format!("version = 1\n[fleet]\nendpoints = [\"{endpoint}\"]\n{extra}")
}

fn tls(ca: Option<&str>, cert: Option<&str>, key: Option<&str>) -> String {
    let mut t = String::from("[fleet.tls]\n");
    for (name, v) in [("ca", ca), ("cert", cert), ("key", key)] {
        if let Some(v) = v {
            t.push_str(&format!("{name} = \"\"\"\n{v}\n\"\"\"\n"));
        }
    }
    t
}

fn auth(user: &str, password: &str) -> String {
    format!(
        "[fleet.auth]\nuser = {}\npassword = {}\n",
        toml::Value::String(user.into()),
        toml::Value::String(password.into())
    )
}

/// A complete, valid cluster section.
fn full() -> String {
    fleet(
        "https://10.0.2.2:2379",
        &format!(
            "{}{}",
            tls(Some(CA), Some(CERT), Some(KEY)),
            auth("caisson-machine-1", PASSWORD)
        ),
    )
}

const FLEET_TOML: &str = r#"# written by caisson provisioning
endpoints = ["https://10.0.2.2:2379"]
id = "0123456789abcdef"

[labels]
role = "web"
zone = "a"

[tls]
ca = "/etc/caisson/fleet/ca.crt"
cert = "/etc/caisson/fleet/client.crt"
key = "/etc/caisson/fleet/client.key"

[auth]
user = "caisson-machine-0123456789abcdef"
password_file = "/etc/caisson/fleet/password"
"#;

#[test]
fn the_example_writes_the_credentials_0600_and_fleet_toml_points_at_them() {
    let tmp = root();
    let r = tmp.path();
    apply(EXAMPLE.as_bytes(), r, &NoChecks, "test").unwrap();
    let config = Config::parse(EXAMPLE).unwrap();
    let tls = config.fleet.as_ref().unwrap().tls.as_ref().unwrap();
    assert_eq!(mode(r, "/etc/caisson/fleet"), 0o700);
    assert_eq!(
        read(r, "/etc/caisson/fleet/ca.crt"),
        *tls.ca.as_ref().unwrap()
    );
    assert_eq!(mode(r, "/etc/caisson/fleet/ca.crt"), 0o644);
    assert_eq!(
        read(r, "/etc/caisson/fleet/client.crt"),
        *tls.cert.as_ref().unwrap()
    );
    assert_eq!(mode(r, "/etc/caisson/fleet/client.crt"), 0o644);
    let key = read(r, "/etc/caisson/fleet/client.key");
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----\n") && key.contains(KEY_BODY));
    assert!(key.ends_with("-----END PRIVATE KEY-----\n"), "{key}");
    assert_eq!(mode(r, "/etc/caisson/fleet/client.key"), 0o600);
    // The password exactly as given: no newline added.
    assert_eq!(read(r, "/etc/caisson/fleet/password"), PASSWORD);
    assert_eq!(mode(r, "/etc/caisson/fleet/password"), 0o600);
    if rustix_root() {
        for p in ["etc/caisson/fleet", "etc/caisson/fleet/client.key"] {
            let m = std::fs::metadata(r.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (0, 0), "{p}");
        }
    }
    // fleet.toml names the files, holds no secret and stays readable.
    assert_eq!(read(r, "/etc/caisson/fleet.toml"), FLEET_TOML);
    assert_eq!(mode(r, "/etc/caisson/fleet.toml"), 0o644);
}

#[test]
fn a_pem_text_without_a_final_newline_gets_one() {
    let plan = check(full().as_bytes(), None, &NoChecks).unwrap();
    let file = |path: &str| {
        plan.entries
            .iter()
            .find(|e| e.path == path)
            .map(|e| (e.kind.clone(), e.mode, e.secret))
            .unwrap()
    };
    let text = |path| match file(path).0 {
        Kind::File(b) => String::from_utf8(b).unwrap(),
        Kind::Dir => panic!("{path} is a directory"),
    };
    assert_eq!(text("/etc/caisson/fleet/ca.crt"), format!("{CA}\n"));
    assert_eq!(text("/etc/caisson/fleet/client.key"), format!("{KEY}\n"));
    assert_eq!(text("/etc/caisson/fleet/password"), PASSWORD);
    assert!(file("/etc/caisson/fleet/client.key").2);
    assert!(file("/etc/caisson/fleet/password").2);
    assert!(!file("/etc/caisson/fleet/ca.crt").2);
    assert_eq!(file("/etc/caisson/fleet").1, 0o700);
}

#[test]
fn neither_debug_nor_a_plan_shows_the_key_or_the_password() {
    let config = Config::parse(EXAMPLE).unwrap();
    let plan = check(EXAMPLE.as_bytes(), Some(root().path()), &NoChecks).unwrap();
    for shown in [format!("{config:?}"), format!("{plan:?}")] {
        assert!(!shown.contains(KEY_BODY), "{shown}");
        assert!(!shown.contains(PASSWORD), "{shown}");
        assert!(!shown.contains("BEGIN PRIVATE KEY"), "{shown}");
    }
}

#[test]
fn insecure_is_passed_through_and_writes_no_credentials() {
    let tmp = root();
    let r = tmp.path();
    let text = fleet("http://10.0.2.2:2379", "insecure = true\n");
    apply(text.as_bytes(), r, &NoChecks, "test").unwrap();
    assert_eq!(
        read(r, "/etc/caisson/fleet.toml"),
        "# written by caisson provisioning\nendpoints = [\"http://10.0.2.2:2379\"]\n\
         insecure = true\n\n[labels]\n"
    );
    assert!(!r.join("etc/caisson/fleet").exists());
    // An explicit `insecure = false` is passed through too, and asks for everything.
    let secure = full().replace("[fleet.tls]", "insecure = false\n[fleet.tls]");
    let plan = check(secure.as_bytes(), None, &NoChecks).unwrap();
    let toml = plan
        .entries
        .iter()
        .find(|e| e.path == "/etc/caisson/fleet.toml")
        .unwrap();
    assert!(
        matches!(&toml.kind, Kind::File(b) if String::from_utf8_lossy(b).contains("insecure = false\n"))
    );
    // insecure = true relaxes the rule as the agent does: TLS without etcd auth, or with it.
    let tls_only = fleet(
        "https://10.0.2.2:2379",
        &format!("insecure = true\n{}", tls(Some(CA), None, None)),
    );
    check(tls_only.as_bytes(), None, &NoChecks).unwrap();
    let everything = full().replace("[fleet.tls]", "insecure = true\n[fleet.tls]");
    check(everything.as_bytes(), None, &NoChecks).unwrap();
    // No endpoints: the agent runs alone, nothing to secure.
    Config::parse("version = 1\n[fleet]\nlabels = { zone = \"a\" }\n").unwrap();
}

/// Every refusal: (config, the field named, a word of the reason).
fn refusals() -> Vec<(String, &'static str, &'static str)> {
    let https = "https://10.0.2.2:2379";
    let both = |t: String| fleet(https, &format!("{t}{}", auth("m-1", PASSWORD)));
    let with_auth = |a: String| fleet(https, &format!("{}{a}", tls(Some(CA), None, None)));
    let encrypted = KEY.replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY");
    let rsa = KEY.replace("PRIVATE KEY", "RSA PRIVATE KEY");
    let cut = KEY.replace("-----END PRIVATE KEY-----", "");
    let key_in_ca = format!("{CA}\n{KEY}");
    vec![
        (
            full().replace("https://", "http://"),
            "fleet.endpoints[0]",
            "plain HTTP",
        ),
        (fleet(https, &auth("m-1", PASSWORD)), "fleet.tls.ca", "CA"),
        (both(tls(None, Some(CERT), Some(KEY))), "fleet.tls.ca", "CA"),
        (
            fleet(https, &tls(Some(CA), None, None)),
            "fleet.auth",
            "user",
        ),
        (
            both(tls(Some(CA), None, Some(KEY))),
            "fleet.tls.cert",
            "neither",
        ),
        (
            both(tls(Some(CA), Some(CERT), None)),
            "fleet.tls.key",
            "neither",
        ),
        (
            both(tls(
                Some(CA),
                Some(CERT),
                Some(&format!("hunter2 {KEY_BODY}")),
            )),
            "fleet.tls.key",
            "PRIVATE KEY",
        ),
        (
            both(tls(Some(CA), Some(CERT), Some(CERT))),
            "fleet.tls.key",
            "PRIVATE KEY",
        ),
        (
            both(tls(Some(CA), Some(CERT), Some(&format!("{KEY}\n{CERT}")))),
            "fleet.tls.key",
            "exactly one",
        ),
        (
            both(tls(Some(CA), Some(CERT), Some(&encrypted))),
            "fleet.tls.key",
            "encrypted",
        ),
        (
            both(tls(Some(CA), Some(CERT), Some(&cut))),
            "fleet.tls.key",
            "END",
        ),
        (
            both(tls(Some("not a certificate"), None, None)),
            "fleet.tls.ca",
            "CERTIFICATE",
        ),
        (
            both(tls(Some(&key_in_ca), None, None)),
            "fleet.tls.ca",
            "private key",
        ),
        (
            both(tls(Some(CA), Some(&rsa), Some(&rsa))),
            "fleet.tls.cert",
            "private key",
        ),
        (
            with_auth(auth("m-1", &format!("{PASSWORD}\n"))),
            "fleet.auth.password",
            "newline",
        ),
        (
            with_auth(auth("m-1", &format!("{PASSWORD}\r"))),
            "fleet.auth.password",
            "one line",
        ),
        (with_auth(auth("m-1", "")), "fleet.auth.password", "empty"),
        (with_auth(auth("m 1", PASSWORD)), "fleet.auth.user", "1-128"),
        (
            with_auth(auth(&"m".repeat(129), PASSWORD)),
            "fleet.auth.user",
            "1-128",
        ),
        (with_auth(auth("", PASSWORD)), "fleet.auth.user", "1-128"),
        (
            fleet(
                "http://a:2379",
                &format!("insecure = true\n{}", auth("m-1", PASSWORD)),
            ),
            "fleet.auth",
            "clear",
        ),
        (
            full().replace("[fleet.tls]", "id = \"a/b\"\n[fleet.tls]"),
            "fleet.id",
            "1-64",
        ),
        (
            full().replace("[fleet.tls]", "id = \"web-2\"\n[fleet.tls]"),
            "fleet.auth.user",
            "caisson-machine-web-2",
        ),
        (
            format!(
                "{}[[files]]\npath = \"/etc/caisson/fleet/ca.crt\"\n",
                full()
            ),
            "files[0].path",
            "reserved",
        ),
        (
            format!("{}[[directories]]\npath = \"/etc/caisson/fleet\"\n", full()),
            "directories[0].path",
            "reserved",
        ),
    ]
}

#[test]
fn each_refusal_names_its_field_and_shows_no_secret() {
    for (text, field, why) in refusals() {
        let tmp = root();
        let before = tree(tmp.path());
        let e = apply(text.as_bytes(), tmp.path(), &NoChecks, "test").unwrap_err();
        let shown = e.to_string();
        assert!(shown.starts_with(&format!("{field}: ")), "{field}: {shown}");
        assert!(shown.contains(why), "{field}: {why:?} not in {shown}");
        assert!(!shown.contains(KEY_BODY), "{shown}");
        assert!(!shown.contains(PASSWORD), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        // Nothing was written.
        assert_eq!(tree(tmp.path()), before, "{field}");
    }
}

#[test]
fn a_secret_of_the_wrong_type_is_not_quoted() {
    for (text, field) in [
        (
            "version = 1\n[fleet]\n[fleet.auth]\nuser = \"m\"\npassword = 73571234\n",
            "fleet.auth.password",
        ),
        (
            "version = 1\n[fleet]\n[fleet.tls]\nkey = 73571234\n",
            "fleet.tls.key",
        ),
        (
            "version = 1\n[fleet]\n[fleet.tls]\nkey = [\"73571234\"]\n",
            "fleet.tls.key",
        ),
    ] {
        let e = err(text);
        assert_eq!(e.field, field);
        let shown = e.to_string();
        assert!(!shown.contains("73571234"), "{shown}");
        assert!(shown.contains("must be a string"), "{shown}");
    }
}

#[test]
fn the_example_s_key_and_password_stay_out_of_an_unrelated_error() {
    // A config that fails elsewhere (the hostname) says nothing of the credentials.
    let bad = EXAMPLE.replace("hostname = \"web-1\"", "hostname = \"-web\"");
    let e = err(&bad).to_string();
    assert!(e.starts_with("hostname: "), "{e}");
    assert!(!e.contains(KEY_BODY) && !e.contains(PASSWORD), "{e}");
}

/// The rendered file and the files it names, as the fleet agent reads them
/// (fleet/src/config.rs): its parser takes fleet.toml, its mode checks take the key and
/// password files, and its TLS stack takes the example's certificate and key.
#[test]
fn rendered_fleet_file_and_credentials_are_taken_by_the_agent() {
    let tmp = root();
    let r = tmp.path();
    apply(EXAMPLE.as_bytes(), r, &NoChecks, "t").unwrap();
    let mut f = caisson_fleet::config::Config::parse(
        std::path::Path::new("fleet.toml"),
        &read(r, "/etc/caisson/fleet.toml"),
    )
    .unwrap();
    assert_eq!(f.labels["role"], "web");
    assert_eq!(f.endpoints, ["https://10.0.2.2:2379"]);
    assert!(!f.insecure);
    assert_eq!(f.id.as_deref(), Some("0123456789abcdef"));
    // The files as the agent finds them, beneath this test's root.
    let beneath = |p: &mut Option<std::path::PathBuf>| {
        let abs = p.take().unwrap();
        *p = Some(r.join(abs.strip_prefix("/").unwrap()));
    };
    let tls = f.tls.as_mut().unwrap();
    beneath(&mut tls.ca);
    beneath(&mut tls.cert);
    beneath(&mut tls.key);
    let auth = f.auth.as_mut().unwrap();
    let mut password_file = Some(auth.password_file.clone());
    beneath(&mut password_file);
    auth.password_file = password_file.unwrap();
    let access = f.access().unwrap();
    let credentials = access.credentials.as_ref().unwrap();
    assert_eq!(credentials.user, "caisson-machine-0123456789abcdef");
    assert_eq!(credentials.password, PASSWORD);
    assert!(access.ca_pem.is_some() && access.identity_pem.is_some());
    caisson_fleet::etcd::Client::connect(&f.endpoints, &access, std::time::Duration::from_secs(1))
        .unwrap();
}
