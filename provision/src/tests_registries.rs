//! `[fleet.registries]`: the CA and password files and their modes, the `[registries]` tables
//! rendered into fleet.toml (and taken by the agent's own parser), and every refusal named by
//! its field without a byte of a password.

use crate::apply::{apply, check};
use crate::config::Config;
use crate::plan::{Kind, NoChecks, Plan};
use crate::tests::{err, mode, read, root, tree, EXAMPLE};
use std::path::{Path, PathBuf};

/// The registries' test passwords: neither may appear in any message, plan or fleet.toml.
const PASSWORD: &str = "r3g-pa55word";
const CACHE_PASSWORD: &str = "c4che-pa55word";

const DIR: &str = "/etc/caisson/fleet/registries";
const PASSWORD_FILE: &str = "/etc/caisson/fleet/registries/registry.local_5000.password";
const CA_FILE: &str = "/etc/caisson/fleet/registries/registry.local_5000.ca.crt";
const CACHE_PASSWORD_FILE: &str = "/etc/caisson/fleet/registries/cache.lan.password";

/// A real CA certificate (the example's test CA), so that the agent's TLS stack takes it.
fn ca() -> String {
    let c = Config::parse(EXAMPLE).unwrap();
    c.fleet.unwrap().tls.unwrap().ca.unwrap()
}

/// A machine without etcd that pulls from a registry with a CA, credentials and two mirrors,
/// one of which (`cache.lan`, plain HTTP on a trusted network) has credentials of its own.
fn config() -> String {
    format!(
        r#"version = 1
[fleet]
image_poll_s = 300
[fleet.registries."registry.local:5000"]
insecure = false
mirrors = ["mirror.lan:5000", "cache.lan"]
ca = """
{}"""
username = "puller"
password = "{PASSWORD}"
[fleet.registries."cache.lan"]
insecure = true
username = "cache"
password = "{CACHE_PASSWORD}"
"#,
        ca()
    )
}

const FLEET_TOML: &str = r#"# written by caisson provisioning
endpoints = []
image_poll_s = 300

[labels]

[registries."cache.lan"]
insecure = true
username = "cache"
password_file = "/etc/caisson/fleet/registries/cache.lan.password"

[registries."registry.local:5000"]
insecure = false
mirrors = ["mirror.lan:5000", "cache.lan"]
ca = "/etc/caisson/fleet/registries/registry.local_5000.ca.crt"
username = "puller"
password_file = "/etc/caisson/fleet/registries/registry.local_5000.password"
"#;

fn fleet_toml(plan: &Plan) -> String {
    let e = plan
        .entries
        .iter()
        .find(|e| e.path == "/etc/caisson/fleet.toml");
    match &e.unwrap().kind {
        Kind::File(b) => String::from_utf8(b.clone()).unwrap(),
        Kind::Dir => panic!("fleet.toml is a directory"),
    }
}

#[test]
fn registry_credentials_are_written_0600_in_a_0700_directory() {
    let tmp = root();
    let r = tmp.path();
    apply(config().as_bytes(), r, &NoChecks, "test").unwrap();
    assert_eq!(mode(r, "/etc/caisson/fleet"), 0o700);
    assert_eq!(mode(r, DIR), 0o700);
    // Passwords exactly as given, no newline; the CA as PEM with its final newline.
    assert_eq!(read(r, PASSWORD_FILE), PASSWORD);
    assert_eq!(mode(r, PASSWORD_FILE), 0o600);
    assert_eq!(read(r, CACHE_PASSWORD_FILE), CACHE_PASSWORD);
    assert_eq!(mode(r, CACHE_PASSWORD_FILE), 0o600);
    assert_eq!(read(r, CA_FILE), ca());
    assert!(read(r, CA_FILE).ends_with("-----END CERTIFICATE-----\n"));
    assert_eq!(mode(r, CA_FILE), 0o644);
    // Nothing else in the directory: no CA file for a registry without one.
    let mut names: Vec<_> = std::fs::read_dir(r.join(DIR.trim_start_matches('/')))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "cache.lan.password",
            "registry.local_5000.ca.crt",
            "registry.local_5000.password"
        ]
    );
    // fleet.toml names the files by path, holds no password, stays readable.
    assert_eq!(read(r, "/etc/caisson/fleet.toml"), FLEET_TOML);
    assert_eq!(mode(r, "/etc/caisson/fleet.toml"), 0o644);
}

/// The rendered `[registries]` tables, key by key, as TOML sees them (not only as text).
#[test]
fn rendered_registry_tables_hold_exactly_these_keys() {
    let plan = check(config().as_bytes(), None, &NoChecks).unwrap();
    let doc: toml::Table = toml::from_str(&fleet_toml(&plan)).unwrap();
    let keys = |t: &toml::Table| t.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        keys(&doc),
        ["endpoints", "image_poll_s", "labels", "registries"]
    );
    let regs = doc["registries"].as_table().unwrap();
    assert_eq!(keys(regs), ["cache.lan", "registry.local:5000"]);
    let main = regs["registry.local:5000"].as_table().unwrap();
    let expected: toml::Table = toml::from_str(&format!(
        "insecure = false\nmirrors = [\"mirror.lan:5000\", \"cache.lan\"]\n\
         ca = \"{CA_FILE}\"\nusername = \"puller\"\npassword_file = \"{PASSWORD_FILE}\"\n"
    ))
    .unwrap();
    assert_eq!(*main, expected);
    let cache = regs["cache.lan"].as_table().unwrap();
    let expected: toml::Table = toml::from_str(&format!(
        "insecure = true\nusername = \"cache\"\npassword_file = \"{CACHE_PASSWORD_FILE}\"\n"
    ))
    .unwrap();
    assert_eq!(*cache, expected);
    // The plan: both directories 0700, the passwords secret, the CA not.
    let entry = |p: &str| plan.entries.iter().find(|e| e.path == p).unwrap();
    for d in ["/etc/caisson/fleet", DIR] {
        assert!(entry(d).kind == Kind::Dir && entry(d).mode == 0o700, "{d}");
    }
    assert!(entry(PASSWORD_FILE).secret && entry(CACHE_PASSWORD_FILE).secret);
    assert!(!entry(CA_FILE).secret);
    assert_eq!(
        entry(PASSWORD_FILE).origin,
        "fleet.registries.\"registry.local:5000\".password"
    );
}

#[test]
fn without_registries_fleet_toml_and_the_files_are_as_before() {
    let plan = check(EXAMPLE.as_bytes(), None, &NoChecks).unwrap();
    assert!(!fleet_toml(&plan).contains("registries"));
    assert!(!fleet_toml(&plan).contains("image_poll_s"));
    assert!(!plan.entries.iter().any(|e| e.path.starts_with(DIR)));
    // A registry without a CA or credentials writes no file and no directory for them.
    let plain = "version = 1\n[fleet]\n[fleet.registries.\"r:5000\"]\nmirrors = [\"m\"]\n";
    let plan = check(plain.as_bytes(), None, &NoChecks).unwrap();
    assert!(!plan
        .entries
        .iter()
        .any(|e| e.path.starts_with("/etc/caisson/fleet/")));
    assert!(fleet_toml(&plan).ends_with("[registries.\"r:5000\"]\nmirrors = [\"m\"]\n"));
}

#[test]
fn neither_debug_nor_a_plan_nor_fleet_toml_shows_a_registry_password() {
    let config_text = config();
    let config = Config::parse(&config_text).unwrap();
    let plan = check(config_text.as_bytes(), Some(root().path()), &NoChecks).unwrap();
    for shown in [
        format!("{config:?}"),
        format!("{plan:?}"),
        format!("{:?}", config.fleet.as_ref().unwrap().registries),
        fleet_toml(&plan),
    ] {
        assert!(!shown.contains(PASSWORD), "{shown}");
        assert!(!shown.contains(CACHE_PASSWORD), "{shown}");
    }
    assert!(format!("{plan:?}").contains(&format!("{PASSWORD_FILE} (secret file")));
}

/// Every refusal: (the registries' TOML after `[fleet]`, the field named, a word of the reason).
fn refusals() -> Vec<(String, &'static str, &'static str)> {
    let reg = |key: &str, body: &str| format!("[fleet.registries.\"{key}\"]\n{body}");
    let creds = format!("username = \"puller\"\npassword = \"{PASSWORD}\"\n");
    let ca = |pem: &str| format!("ca = \"\"\"\n{pem}\n\"\"\"\n");
    let key = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----";
    vec![
        (
            reg("https://r:5000", &creds),
            "fleet.registries.\"https://r:5000\"",
            "host[:port]",
        ),
        (
            reg("r:70000", ""),
            "fleet.registries.\"r:70000\"",
            "host[:port]",
        ),
        (
            reg("r:5000", "mirrors = [\"m:5000\", \"http://m2\"]\n"),
            "fleet.registries.\"r:5000\".mirrors[1]",
            "no scheme",
        ),
        (
            reg("r:5000", "mirrors = [\"m/v2\"]\n"),
            "fleet.registries.\"r:5000\".mirrors[0]",
            "no path",
        ),
        (
            reg("r:5000", "username = \"puller\"\n"),
            "fleet.registries.\"r:5000\".password",
            "give username and password, or neither",
        ),
        (
            reg("r:5000", &format!("password = \"{PASSWORD}\"\n")),
            "fleet.registries.\"r:5000\".username",
            "give username and password, or neither",
        ),
        (
            reg("r:5000", "username = \"puller\"\npassword = \"\"\n"),
            "fleet.registries.\"r:5000\".password",
            "empty",
        ),
        (
            reg(
                "r:5000",
                &format!("username = \"puller\"\npassword = \"{PASSWORD}\\n\"\n"),
            ),
            "fleet.registries.\"r:5000\".password",
            "one line",
        ),
        (
            reg("r:5000", "username = \"puller\"\npassword = 73571234\n"),
            "fleet.registries.\"r:5000\".password",
            "must be a string",
        ),
        (
            reg(
                "r:5000",
                &format!("username = \"pull:er\"\npassword = \"{PASSWORD}\"\n"),
            ),
            "fleet.registries.\"r:5000\".username",
            "no ':'",
        ),
        (
            reg(
                "r:5000",
                &format!("username = \"\"\npassword = \"{PASSWORD}\"\n"),
            ),
            "fleet.registries.\"r:5000\".username",
            "1-256",
        ),
        (
            reg("r:5000", &format!("{}{creds}", ca("not a certificate"))),
            "fleet.registries.\"r:5000\".ca",
            "CERTIFICATE",
        ),
        (
            reg(
                "r:5000",
                &format!("{}{creds}", ca(&format!("{}\n{key}", ca_text()))),
            ),
            "fleet.registries.\"r:5000\".ca",
            "CA certificate(s) only",
        ),
        (
            reg("r:5000", "password_file = \"/etc/p\"\n"),
            "password_file",
            "unknown field",
        ),
        (
            "image_poll_s = 0\n".into(),
            "fleet.image_poll_s",
            "at least 1",
        ),
        (
            format!(
                "{}[[files]]\npath = \"{PASSWORD_FILE}\"\ncontents = \"x\"\n",
                reg("registry.local:5000", &creds)
            ),
            "files[0].path",
            "[fleet.registries]",
        ),
    ]
}

fn ca_text() -> String {
    ca().trim_end().to_string()
}

#[test]
fn each_registry_refusal_names_its_field_and_shows_no_password() {
    for (body, field, why) in refusals() {
        let text = format!("version = 1\n[fleet]\n{body}");
        let tmp = root();
        let before = tree(tmp.path());
        let e = apply(text.as_bytes(), tmp.path(), &NoChecks, "test").unwrap_err();
        let shown = e.to_string();
        assert!(shown.starts_with(&format!("{field}: ")), "{field}: {shown}");
        assert!(shown.contains(why), "{field}: {why:?} not in {shown}");
        assert!(!shown.contains(PASSWORD), "{shown}");
        assert!(!shown.contains("73571234"), "{shown}");
        assert_eq!(err(&text).to_string(), shown);
        // Nothing was written.
        assert_eq!(tree(tmp.path()), before, "{field}");
    }
}

/// Makes an absolute path of fleet.toml one beneath the test's root, as the agent finds it.
fn beneath(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap())
}

/// The rendered fleet.toml through the agent's own parser (fleet/src/config.rs), and its
/// registry settings read as the agent reads them: the password files pass its 0600 check,
/// the CA its TLS stack, and a reference resolves to the mirrors and the registry.
#[test]
fn rendered_registries_are_taken_by_the_agent() {
    let tmp = root();
    let r = tmp.path();
    apply(config().as_bytes(), r, &NoChecks, "t").unwrap();
    let mut f = caisson_fleet::config::Config::parse(
        Path::new("fleet.toml"),
        &read(r, "/etc/caisson/fleet.toml"),
    )
    .unwrap();
    assert_eq!(f.image_poll_s, 300);
    assert!(f.endpoints.is_empty());
    for reg in f.registries.values_mut() {
        reg.ca = reg.ca.as_deref().map(|p| beneath(r, p));
        reg.password_file = reg.password_file.as_deref().map(|p| beneath(r, p));
    }
    let settings = f.registries().unwrap();
    let main = &settings.hosts["registry.local:5000"];
    assert!(!main.insecure);
    assert_eq!(main.mirrors, ["mirror.lan:5000", "cache.lan"]);
    let creds = main.credentials.as_ref().unwrap();
    assert_eq!(
        (creds.user.as_str(), creds.password.as_str()),
        ("puller", PASSWORD)
    );
    assert_eq!(main.ca_pem.as_deref(), Some(ca().as_bytes()));
    let cache = &settings.hosts["cache.lan"];
    assert!(cache.insecure && cache.mirrors.is_empty() && cache.ca_pem.is_none());
    assert_eq!(cache.credentials.as_ref().unwrap().password, CACHE_PASSWORD);
    let reference =
        caisson_fleet::distribution::parse_reference("registry.local:5000/web:1").unwrap();
    settings.repository(&reference).unwrap();
}
