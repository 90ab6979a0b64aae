//! Builds images/minimal.toml with the real binary and checks every part of the disk with an
//! independent tool; then checks that a second build is byte-identical.

#![allow(clippy::unwrap_used)]

mod common;

use caisson_layout::cmdline::BootParams;
use caisson_layout::partition::Part;
use common::{check, extract_partition};
use std::process::Command;

#[test]
fn minimal_image_passes_independent_checks_and_is_reproducible() {
    let raw = common::image("minimal");
    let raw_s = raw.to_str().unwrap();
    check("sfdisk", &["-V", raw_s]);
    let json = check("sfdisk", &["--json", raw_s]);
    for label in ["esp", "root-a", "root-b", "state"] {
        assert!(json.contains(&format!("\"name\": \"{label}\"")), "{json}");
    }
    assert!(
        json.contains("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
        "{json}"
    );

    let dir = tempfile::tempdir().unwrap();
    let esp = extract_partition(&raw, Part::Esp, dir.path());
    check("fsck.fat", &["-n", esp.to_str().unwrap()]);
    let state = extract_partition(&raw, Part::State, dir.path());
    check("e2fsck", &["-fn", state.to_str().unwrap()]);

    // The boot entry on the ESP pins slot A's verity root; veritysetup agrees with it.
    let report = Command::new(env!("CARGO_BIN_EXE_caisson"))
        .args(["inspect", "--json", raw_s])
        .output()
        .unwrap();
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let options = report["entries"][0]["options"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(report["entries"][0]["file"], "caisson-1.0.0-a.conf");
    assert_eq!(report["slots"][0]["content"], "erofs");
    assert_eq!(report["slots"][1]["content"], "empty");
    assert_eq!(report["slots"][0]["version"], "1.0.0");
    let packages = report["slots"][0]["packages"].to_string();
    assert!(packages.contains("linux-image-6."), "{packages}");
    let params = BootParams::parse(&options).unwrap();
    let verity = params.verity.expect("the entry pins a verity root");
    let slot_a = extract_partition(&raw, Part::RootA, dir.path());
    let slot_s = slot_a.to_str().unwrap();
    check(
        "veritysetup",
        &[
            "verify",
            slot_s,
            slot_s,
            &hex::encode(verity.root_hash),
            &format!("--hash-offset={}", verity.hash_offset),
        ],
    );
    // fsck.erofs wants the filesystem alone.
    let fs_only = dir.path().join("erofs");
    let bytes = std::fs::read(&slot_a).unwrap();
    std::fs::write(&fs_only, &bytes[..verity.hash_offset as usize]).unwrap();
    check("fsck.erofs", &[fs_only.to_str().unwrap()]);

    // A second build with the same lock and SOURCE_DATE_EPOCH is byte-identical.
    let again = common::build(
        "images/minimal.toml",
        &common::workspace().join("target/e2e/minimal-again"),
        &[],
    );
    let a = std::fs::read(&raw).unwrap();
    let b = std::fs::read(&again).unwrap();
    assert!(a == b, "two builds of images/minimal.toml differ");
    let manifest = |p: &std::path::Path| std::fs::read(p.with_extension("manifest.json")).unwrap();
    assert_eq!(manifest(&raw), manifest(&again));
}

#[test]
fn bad_specs_fail_cleanly_without_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("broken.toml");
    std::fs::write(
        &spec,
        "[image]\nname = \"broken\"\nversion = \"1.0.0\"\n\n[kernel]\nmodlues = []\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let run = Command::new(env!("CARGO_BIN_EXE_caisson"))
        .arg("build")
        .arg(&spec)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("broken.toml") && err.contains("line 6") && err.contains("modlues"),
        "{err}"
    );
    assert!(!out.join("broken-1.0.0.raw").exists());
}

/// The build needs no root: as `nobody`, with its own copy of the spec, lock and cached
/// packages, it makes the same bytes as the build run by the test's user.
#[test]
fn build_as_nobody_is_identical() {
    let reference = common::image("minimal");
    let ws = common::workspace();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let images = root.join("images");
    copy_tree(&ws.join("images/minimal"), &images.join("minimal"));
    for f in ["minimal.toml", "minimal.lock"] {
        std::fs::copy(ws.join("images").join(f), images.join(f)).unwrap();
    }
    // The packages of the lock, from the test user's cache.
    let user_cache = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache")
        })
        .join("caisson/sha256");
    let cache = root.join("cache/caisson/sha256");
    std::fs::create_dir_all(&cache).unwrap();
    let lock = std::fs::read_to_string(images.join("minimal.lock")).unwrap();
    for line in lock.lines() {
        if let Some(h) = line
            .strip_prefix("sha256 = \"")
            .and_then(|l| l.strip_suffix('"'))
        {
            std::fs::copy(user_cache.join(h), cache.join(h)).unwrap();
        }
    }
    // Its own copy of the binaries too: the checkout may sit where nobody cannot read.
    let bins = root.join("bins");
    std::fs::create_dir_all(&bins).unwrap();
    let wanted = caisson_builder::binaries::wanted(&[]);
    for b in caisson_builder::binaries::build(&ws, &wanted).unwrap() {
        std::fs::copy(&b, bins.join(b.file_name().unwrap())).unwrap();
    }
    let out = root.join("out");
    let am_root = effective_uid() == 0;
    if am_root {
        common::check("chown", &["-R", "65534:65534", root.to_str().unwrap()]);
        common::check("chmod", &["755", root.to_str().unwrap()]);
    }
    let mut cmd = if am_root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
        c.arg(env!("CARGO_BIN_EXE_caisson"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_caisson"))
    };
    let run = cmd
        .current_dir(root)
        .args(["build", "images/minimal.toml", "--locked", "--out"])
        .arg(&out)
        .arg("--binaries")
        .arg(&bins)
        .env("XDG_CACHE_HOME", root.join("cache"))
        .env("HOME", root)
        .env("SOURCE_DATE_EPOCH", common::EPOCH)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "build as nobody failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let ours = std::fs::read(out.join("minimal-1.0.0.raw")).unwrap();
    assert!(
        ours == std::fs::read(&reference).unwrap(),
        "the unprivileged build differs from the reference build"
    );
}

fn effective_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // The owner of a file this process just made is its effective uid.
    let probe = tempfile::NamedTempFile::new().unwrap();
    probe.as_file().metadata().unwrap().uid()
}

fn copy_tree(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

/// The image binaries carry no path of this checkout, its target directory or cargo's home
/// (panic locations, generated code included from a build script's `OUT_DIR`), so an image's
/// bytes do not depend on where the checkout lives. `ci/repro-check` builds two clones in
/// different directories and compares the images whole.
#[test]
fn image_binaries_name_no_local_path() {
    let ws = common::workspace();
    let bins = caisson_builder::binaries::build(
        &ws,
        &caisson_builder::binaries::wanted(&["caisson-fleet".into(), "caisson-update".into()]),
    )
    .unwrap();
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cargo")
        });
    let local = [ws.canonicalize().unwrap(), home];
    for bin in &bins {
        let bytes = std::fs::read(bin).unwrap();
        for path in &local {
            let needle = path.to_str().unwrap().as_bytes();
            let found = bytes.windows(needle.len()).position(|w| w == needle);
            assert!(
                found.is_none(),
                "{} names {} at byte {found:?}",
                bin.display(),
                path.display()
            );
        }
    }
    // The remapped prefix is there, so the search above looked at the right kind of string.
    let fleet = std::fs::read(bins.iter().find(|b| b.ends_with("caisson-fleet")).unwrap()).unwrap();
    assert!(fleet.windows(16).any(|w| w == b"/caisson/target/"));
}
