//! Assembling the root filesystem tree from packages, the workspace binaries, the spec's files
//! and services, the kernel modules, os-release and the SBOM. Everything happens in a staging
//! directory owned by the build user; `mkfs.erofs --all-root` makes the result root-owned.

use caisson_layout::osrelease::{self, OsRelease};
use caisson_layout::paths;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

/// Something that went wrong while assembling the root.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("extracting {deb}: {source}")]
    Extract {
        deb: PathBuf,
        source: caisson_debian::DebianError,
    },
    #[error("service {name} in {spec}: {why}")]
    Service {
        spec: PathBuf,
        name: String,
        why: String,
    },
    #[error("files[{index}]: {src} does not exist (files live under {dir})")]
    MissingFile {
        index: usize,
        src: String,
        dir: PathBuf,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RootfsError {
    let path = path.to_path_buf();
    move |source| RootfsError::Io { what, path, source }
}

/// Directories that must exist in the read-only root: mountpoints and well-known places.
pub const SKELETON_DIRS: &[&str] = &[
    "proc",
    "sys",
    "dev",
    "run",
    "tmp",
    "var",
    "efi",
    "root",
    "etc/caisson/services",
    "usr/lib/caisson/services",
    "usr/lib/caisson/update-keys",
    "usr/bin",
    "usr/sbin",
];

/// Documentation and other files a machine never reads, dropped to keep the slot small.
const PRUNE: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/lintian",
    "usr/share/locale",
    "usr/share/bug",
];

/// Creates the skeleton directories and the merged-/usr links.
pub fn skeleton(root: &Path) -> Result<(), RootfsError> {
    caisson_debian::merged_usr_skeleton(root).map_err(|source| RootfsError::Extract {
        deb: root.to_path_buf(),
        source,
    })?;
    for d in SKELETON_DIRS {
        let p = root.join(d);
        fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
    }
    Ok(())
}

/// One installed package, for the SBOM.
#[derive(Debug, Clone, Serialize)]
pub struct SbomPackage {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

/// Extracts every package into the root.
pub fn install_packages(root: &Path, debs: &[PathBuf]) -> Result<(), RootfsError> {
    for deb in debs {
        caisson_debian::extract(deb, root).map_err(|source| RootfsError::Extract {
            deb: deb.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Removes documentation trees and the spec's excluded paths (absolute, files or directories).
pub fn prune(root: &Path, exclude: &[String]) -> Result<(), RootfsError> {
    let all = PRUNE
        .iter()
        .copied()
        .chain(exclude.iter().map(|p| p.trim_start_matches('/')));
    for p in all {
        let path = root.join(p);
        match path.symlink_metadata() {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&path).map_err(io_err("removing", &path))?,
            Ok(_) => fs::remove_file(&path).map_err(io_err("removing", &path))?,
            Err(_) => {}
        }
    }
    Ok(())
}

/// Writes a file, creating its parent directories, with a mode.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), RootfsError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
    }
    if path.symlink_metadata().is_ok() {
        fs::remove_file(path).map_err(io_err("replacing", path))?;
    }
    fs::write(path, contents).map_err(io_err("writing", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

/// Replaces whatever is at `link` with a symlink to `target`.
pub fn force_symlink(target: &str, link: &Path) -> Result<(), RootfsError> {
    if let Some(parent) = link.parent() {
        fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
    }
    if link.symlink_metadata().is_ok() {
        fs::remove_file(link).map_err(io_err("replacing", link))?;
    }
    symlink(target, link).map_err(io_err("linking", link))
}

/// System users that packages' maintainer scripts would have added (the builder runs none), each
/// with the file that says its package is in the root. Fixed ids keep builds reproducible.
const PACKAGE_USERS: &[(&str, &str)] = &[
    // openssh-server: the privilege-separation user; sshd refuses to start without it.
    (
        "usr/sbin/sshd",
        "sshd:x:100:65534::/run/sshd:/usr/sbin/nologin",
    ),
];

/// os-release, passwd and group, with the users and the CA bundle maintainer scripts would have made.
pub fn system_files(root: &Path, image: &str, version: &str) -> Result<(), RootfsError> {
    let os = OsRelease {
        image_id: image.to_string(),
        version: version.to_string(),
    };
    let rel = osrelease::PATH.trim_start_matches('/');
    write_file(&root.join(rel), os.render().as_bytes(), 0o644)?;
    force_symlink("../usr/lib/os-release", &root.join("etc/os-release"))?;
    let mut passwd = String::from(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    );
    for (path, line) in PACKAGE_USERS {
        if root.join(path).exists() {
            passwd.push_str(line);
            passwd.push('\n');
        }
    }
    write_file(&root.join("etc/passwd"), passwd.as_bytes(), 0o644)?;
    write_file(
        &root.join("etc/group"),
        b"root:x:0:\nnogroup:x:65534:\n",
        0o644,
    )?;
    write_file(&root.join("etc/hostname"), b"caisson\n", 0o644)?;
    ca_bundle(root)
}

/// Concatenates the certificates of `ca-certificates` into the bundle update-ca-certificates makes.
fn ca_bundle(root: &Path) -> Result<(), RootfsError> {
    let dir = root.join("usr/share/ca-certificates");
    if !dir.is_dir() {
        return Ok(());
    }
    let mut certs = Vec::new();
    collect_files(&dir, &mut certs)?;
    certs.retain(|p| p.extension().is_some_and(|e| e == "crt"));
    certs.sort();
    let mut bundle = Vec::new();
    for c in &certs {
        bundle.extend(fs::read(c).map_err(io_err("reading", c))?);
        if !bundle.ends_with(b"\n") {
            bundle.push(b'\n');
        }
    }
    write_file(
        &root.join("etc/ssl/certs/ca-certificates.crt"),
        &bundle,
        0o644,
    )
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), RootfsError> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(io_err("listing", dir))?
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let ft = e.file_type().map_err(io_err("inspecting", &p))?;
        if ft.is_dir() {
            collect_files(&p, out)?;
        } else if ft.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

/// Installs the workspace binaries in /usr/bin and makes /sbin/init the init.
pub fn install_binaries(root: &Path, bins: &[PathBuf]) -> Result<(), RootfsError> {
    for b in bins {
        let name = b.file_name().unwrap_or_default();
        let dst = root.join("usr/bin").join(name);
        let bytes = fs::read(b).map_err(io_err("reading", b))?;
        write_file(&dst, &bytes, 0o755)?;
    }
    force_symlink("../bin/caisson-init", &root.join("usr/sbin/init"))
}

/// Writes each service as `/usr/lib/caisson/services/<name>.toml`, checked by the init's parser.
pub fn install_services(
    root: &Path,
    spec_path: &Path,
    services: &std::collections::BTreeMap<String, toml::Table>,
) -> Result<(), RootfsError> {
    let dir = root.join(paths::IMAGE_SERVICES_DIR.trim_start_matches('/'));
    for (name, table) in services {
        let bad = |why: String| RootfsError::Service {
            spec: spec_path.to_path_buf(),
            name: name.clone(),
            why,
        };
        let text = toml::to_string(table).map_err(|e| bad(e.to_string()))?;
        caisson_init::service::ServiceSpec::parse(name, &text).map_err(|e| bad(e.to_string()))?;
        write_file(&dir.join(format!("{name}.toml")), text.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// Installs the spec's update keys in `/usr/lib/caisson/update-keys/` and, when it names a channel
/// or a strategy, writes `/etc/caisson/update.toml` for `caisson-update`.
pub fn install_update(
    root: &Path,
    spec_dir: &Path,
    update: &crate::spec::UpdateSection,
) -> Result<(), RootfsError> {
    let keys = root.join(paths::UPDATE_KEYS_DIR.trim_start_matches('/'));
    for (index, k) in update.public_keys.iter().enumerate() {
        let src = spec_dir.join(k);
        if !src.is_file() {
            return Err(RootfsError::MissingFile {
                index,
                src: format!("update.public_keys: {k}"),
                dir: spec_dir.to_path_buf(),
            });
        }
        let bytes = fs::read(&src).map_err(io_err("reading", &src))?;
        let name = src.file_name().unwrap_or_default();
        write_file(&keys.join(name), &bytes, 0o644)?;
    }
    if update.channel_url.is_none() && update.strategy.is_none() && update.interval_s.is_none() {
        return Ok(());
    }
    let mut text = String::from("# Written by caisson build from the spec's [update] section.\n");
    if let Some(u) = &update.channel_url {
        text += &format!("channel_url = {}\n", toml::Value::String(u.clone()));
    }
    if let Some(s) = &update.strategy {
        text += &format!("strategy = {}\n", toml::Value::String(s.clone()));
    }
    if let Some(i) = update.interval_s {
        text += &format!("interval_s = {i}\n");
    }
    write_file(
        &root.join("etc/caisson/update.toml"),
        text.as_bytes(),
        0o644,
    )
}

/// Copies the spec's files and creates its directories.
pub fn install_spec_files(
    root: &Path,
    files_dir: &Path,
    files: &[crate::spec::FileEntry],
    dirs: &[crate::spec::DirEntry],
) -> Result<(), RootfsError> {
    for (index, f) in files.iter().enumerate() {
        let src = files_dir.join(&f.src);
        if !src.is_file() {
            return Err(RootfsError::MissingFile {
                index,
                src: f.src.clone(),
                dir: files_dir.to_path_buf(),
            });
        }
        let bytes = fs::read(&src).map_err(io_err("reading", &src))?;
        // The spec was validated: the mode parses.
        let mode = crate::spec::parse_mode(&f.mode).unwrap_or(0o644);
        write_file(&root.join(f.dst.trim_start_matches('/')), &bytes, mode)?;
    }
    for d in dirs {
        let p = root.join(d.path.trim_start_matches('/'));
        fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
        let mode = crate::spec::parse_mode(&d.mode).unwrap_or(0o755);
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", &p))?;
    }
    Ok(())
}

/// Copies module files (relative paths in `kernel_root`) into the root and writes the list
/// file `list_path` (absolute paths, in load order).
pub fn install_modules(
    root: &Path,
    kernel_root: &Path,
    modules: &[String],
    list_path: &str,
) -> Result<(), RootfsError> {
    let mut list = String::new();
    for m in modules {
        let src = kernel_root.join(m);
        let bytes = fs::read(&src).map_err(io_err("reading", &src))?;
        write_file(&root.join(m), &bytes, 0o644)?;
        list.push('/');
        list.push_str(m);
        list.push('\n');
    }
    write_file(
        &root.join(list_path.trim_start_matches('/')),
        list.as_bytes(),
        0o644,
    )
}

#[derive(Serialize)]
struct Sbom<'a> {
    image: &'a str,
    version: &'a str,
    packages: &'a [SbomPackage],
    files: Vec<SbomFile>,
}

#[derive(Serialize)]
struct SbomFile {
    path: String,
    sha256: String,
}

/// Writes the SBOM: every package and the sha256 of every regular file in the root.
pub fn write_sbom(
    root: &Path,
    image: &str,
    version: &str,
    packages: &[SbomPackage],
) -> Result<(), RootfsError> {
    let mut files = Vec::new();
    collect_files(root, &mut files)?;
    let mut entries = Vec::with_capacity(files.len());
    for f in &files {
        let bytes = fs::read(f).map_err(io_err("reading", f))?;
        let rel = f.strip_prefix(root).unwrap_or(f);
        entries.push(SbomFile {
            path: format!("/{}", rel.display()),
            sha256: hex::encode(Sha256::digest(&bytes)),
        });
    }
    let sbom = Sbom {
        image,
        version,
        packages,
        files: entries,
    };
    let json = serde_json::to_vec_pretty(&sbom).map_err(|e| RootfsError::Io {
        what: "serialising the SBOM for",
        path: root.to_path_buf(),
        source: io::Error::other(e),
    })?;
    write_file(
        &root.join(paths::SBOM.trim_start_matches('/')),
        &json,
        0o644,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_files_and_binaries() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        system_files(&root, "mini", "1.2.3").unwrap();
        let os = fs::read_to_string(root.join("etc/os-release")).unwrap();
        assert_eq!(OsRelease::parse(&os).unwrap().version, "1.2.3");
        let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
        assert!(!passwd.contains("sshd"), "{passwd}");
        write_file(&root.join("usr/sbin/sshd"), b"", 0o755).unwrap();
        system_files(&root, "mini", "1.2.3").unwrap();
        let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
        assert!(
            passwd.contains("\nsshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n"),
            "{passwd}"
        );
        let bin = dir.path().join("caisson-init");
        fs::write(&bin, b"\x7fELF").unwrap();
        install_binaries(&root, &[bin]).unwrap();
        assert_eq!(fs::read(root.join("usr/sbin/init")).unwrap(), b"\x7fELF");
        let mode = fs::metadata(root.join("usr/bin/caisson-init"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn missing_spec_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = vec![crate::spec::FileEntry {
            src: "etc/nothing".into(),
            dst: "/etc/nothing".into(),
            mode: "0644".into(),
        }];
        let err = install_spec_files(dir.path(), &dir.path().join("files"), &files, &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("files[0]") && err.contains("etc/nothing"),
            "{err}"
        );
    }

    #[test]
    fn sbom_lists_every_file() {
        let dir = tempfile::tempdir().unwrap();
        write_file(&dir.path().join("usr/bin/a"), b"a", 0o755).unwrap();
        write_sbom(dir.path(), "mini", "1", &[]).unwrap();
        let sbom = fs::read_to_string(dir.path().join("usr/lib/caisson/sbom.json")).unwrap();
        assert!(sbom.contains("/usr/bin/a"));
        assert!(sbom.contains(&hex::encode(Sha256::digest(b"a"))));
    }

    #[test]
    fn update_keys_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let spec_dir = dir.path().join("spec");
        fs::create_dir_all(spec_dir.join("keys")).unwrap();
        fs::write(spec_dir.join("keys/a.pub"), "untrusted comment: x\nRWQ\n").unwrap();
        let root = dir.path().join("root");
        let mut u = crate::spec::UpdateSection {
            public_keys: vec!["keys/a.pub".into()],
            ..Default::default()
        };
        install_update(&root, &spec_dir, &u).unwrap();
        assert!(root.join("usr/lib/caisson/update-keys/a.pub").is_file());
        assert!(!root.join("etc/caisson/update.toml").exists());
        u.channel_url = Some("http://10.0.2.2:8080/stable".into());
        u.strategy = Some("immediate".into());
        install_update(&root, &spec_dir, &u).unwrap();
        let text = fs::read_to_string(root.join("etc/caisson/update.toml")).unwrap();
        let c = caisson_update::config::Config::parse(&text, Path::new("update.toml")).unwrap();
        assert_eq!(
            c.channel_url.as_deref(),
            Some("http://10.0.2.2:8080/stable")
        );
        u.public_keys = vec!["keys/missing.pub".into()];
        let err = install_update(&root, &spec_dir, &u)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.pub"), "{err}");
    }
}
