//! `caisson-fleet validate` (and `submit`'s checks): unit files checked without etcd.

use crate::unit::UnitSpec;
use anyhow::Result;
use std::path::PathBuf;

/// Loads and checks every unit file, reporting every error (not only the first) and units
/// named twice.
pub fn validate(files: &[PathBuf]) -> Result<Vec<(PathBuf, UnitSpec)>> {
    let mut ok: Vec<(PathBuf, UnitSpec)> = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        match UnitSpec::load(f) {
            Ok(spec) => {
                if let Some((other, _)) = ok.iter().find(|(_, s)| s.name == spec.name) {
                    errors.push(format!(
                        "{}: unit {}: also named by {}",
                        f.display(),
                        spec.name,
                        other.display()
                    ));
                } else {
                    ok.push((f.clone(), spec));
                }
            }
            Err(e) => errors.push(format!("{}: {e}", f.display())),
        }
    }
    if errors.is_empty() {
        Ok(ok)
    } else {
        anyhow::bail!(
            "{} of {} unit file(s) not valid:\n{}",
            errors.len(),
            files.len(),
            errors.join("\n")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_reported_and_names_file_unit_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let good = write("web.toml", "[image]\nref = \"registry.local/web:1\"\n");
        let bad_ref = write("bad.toml", "[image]\nref = \"UPPER/Case\"\n");
        let bad_mem = write(
            "db.toml",
            "[image]\npath = \"/a.tar\"\n[resources]\nmemory = \"lots\"\n",
        );
        let twin = write("twin.toml", "name = \"web\"\n[image]\npath = \"/a.tar\"\n");
        let ok = validate(std::slice::from_ref(&good)).unwrap();
        assert_eq!(ok[0].1.name, "web");
        let e = validate(&[good.clone(), bad_ref.clone(), bad_mem.clone(), twin.clone()])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("3 of 4 unit file(s) not valid"), "{e}");
        assert!(
            e.contains(&format!(
                "{}: unit bad: field `image.ref`",
                bad_ref.display()
            )),
            "{e}"
        );
        assert!(
            e.contains(&format!(
                "{}: unit db: field `resources.memory`",
                bad_mem.display()
            )),
            "{e}"
        );
        assert!(
            e.contains(&format!("unit web: also named by {}", good.display())),
            "{e}"
        );
        let e = validate(&[dir.path().join("missing.toml")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.toml"), "{e}");
    }
}
