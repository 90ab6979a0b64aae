//! Archive indexes: the `Packages` file of a component and the checksum list of `InRelease`.

use crate::deb822::paragraphs;
use crate::error::DebianError;
use crate::version::Relation;

/// A version constraint: `(>= 2.34)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    /// The relation.
    pub relation: Relation,
    /// The version on its right.
    pub version: String,
}

/// One alternative of a dependency: `libc6:any (>= 2.34)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dep {
    /// Package (or virtual package) name.
    pub name: String,
    /// The `:any` / `:amd64` qualifier, if any.
    pub arch: Option<String>,
    /// The version constraint, if any.
    pub constraint: Option<Constraint>,
}

/// A dependency clause: alternatives separated by `|`, any one of which satisfies it.
pub type Clause = Vec<Dep>;

/// What a package provides: `foo (= 1.0)` or plain `foo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provide {
    /// The virtual name.
    pub name: String,
    /// The provided version (only `=` is allowed in Provides).
    pub version: Option<String>,
}

/// The fields of a binary package paragraph the resolver needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    /// `Package`
    pub name: String,
    /// `Version`
    pub version: String,
    /// `Architecture`
    pub arch: String,
    /// `Multi-Arch`, empty when absent.
    pub multi_arch: String,
    /// `Pre-Depends` then `Depends`.
    pub depends: Vec<Clause>,
    /// `Provides`
    pub provides: Vec<Provide>,
    /// `Filename`, relative to the mirror.
    pub filename: String,
    /// `SHA256`
    pub sha256: String,
    /// `Size`
    pub size: u64,
}

/// Parses a `Packages` file. `what` names it in errors.
pub fn parse_packages(text: &str, what: &str) -> Result<Vec<Package>, DebianError> {
    paragraphs(text)
        .iter()
        .map(|p| {
            let field = |name: &str| {
                p.get(name).ok_or_else(|| DebianError::Parse {
                    what: what.to_string(),
                    reason: format!("paragraph at line {} has no {name} field", p.line),
                })
            };
            let bad = |reason: String| DebianError::Parse {
                what: what.to_string(),
                reason: format!("line {}: {reason}", p.line),
            };
            let size = field("Size")?;
            let mut depends = parse_relations(p.get("Pre-Depends").unwrap_or("")).map_err(&bad)?;
            depends.extend(parse_relations(p.get("Depends").unwrap_or("")).map_err(&bad)?);
            Ok(Package {
                name: field("Package")?.to_string(),
                version: field("Version")?.to_string(),
                arch: field("Architecture")?.to_string(),
                multi_arch: p.get("Multi-Arch").unwrap_or("").to_string(),
                depends,
                provides: parse_provides(p.get("Provides").unwrap_or("")).map_err(&bad)?,
                filename: field("Filename")?.to_string(),
                sha256: field("SHA256")?.to_ascii_lowercase(),
                size: size
                    .parse()
                    .map_err(|_| bad(format!("bad Size {size:?}")))?,
            })
        })
        .collect()
}

/// Parses a relation field (`Depends`, `Pre-Depends`): clauses separated by `,`, alternatives by
/// `|`. Architecture restrictions (`[amd64]`) and build profiles (`<!nocheck>`) are dropped.
pub fn parse_relations(field: &str) -> Result<Vec<Clause>, String> {
    field
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|clause| clause.split('|').map(|alt| parse_dep(alt.trim())).collect())
        .collect()
}

fn parse_dep(text: &str) -> Result<Dep, String> {
    let text = strip_bracketed(text, '[', ']');
    let text = strip_bracketed(&text, '<', '>');
    let (head, constraint) = match text.find('(') {
        Some(open) => {
            let close = text[open..]
                .find(')')
                .ok_or_else(|| format!("unclosed '(' in {text:?}"))?;
            let inner = &text[open + 1..open + close];
            (&text[..open], Some(parse_constraint(inner)?))
        }
        None => (text.as_str(), None),
    };
    let head = head.trim();
    if head.is_empty() || head.contains(char::is_whitespace) {
        return Err(format!("bad dependency {text:?}"));
    }
    let (name, arch) = match head.split_once(':') {
        Some((n, a)) => (n.to_string(), Some(a.to_string())),
        None => (head.to_string(), None),
    };
    Ok(Dep {
        name,
        arch,
        constraint,
    })
}

/// Removes `open ... close` groups, keeping only the text around them. A `<` directly followed
/// by `<`, `=` or after `(` is a relation, not a profile, so profiles are removed only outside
/// parentheses.
fn strip_bracketed(text: &str, open: char, close: char) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut depth_paren, mut skipping) = (0, false);
    for c in text.chars() {
        match c {
            '(' => depth_paren += 1,
            ')' => depth_paren -= 1,
            _ => {}
        }
        if depth_paren == 0 && c == open {
            skipping = true;
        } else if skipping && c == close {
            skipping = false;
        } else if !skipping {
            out.push(c);
        }
    }
    out
}

fn parse_constraint(inner: &str) -> Result<Constraint, String> {
    let inner = inner.trim();
    let split = inner
        .find(|c: char| !matches!(c, '<' | '>' | '='))
        .ok_or_else(|| format!("bad version constraint ({inner})"))?;
    let (op, version) = inner.split_at(split);
    let relation =
        Relation::parse(op.trim()).ok_or_else(|| format!("bad relation {op:?} in ({inner})"))?;
    let version = version.trim();
    if version.is_empty() {
        return Err(format!("no version in ({inner})"));
    }
    Ok(Constraint {
        relation,
        version: version.to_string(),
    })
}

fn parse_provides(field: &str) -> Result<Vec<Provide>, String> {
    let clauses = parse_relations(field)?;
    Ok(clauses
        .into_iter()
        .flatten()
        .map(|d| Provide {
            name: d.name,
            version: d
                .constraint
                .filter(|c| c.relation == Relation::Eq)
                .map(|c| c.version),
        })
        .collect())
}

/// The parts of a verified `InRelease` the fetcher needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// `Suite`
    pub suite: String,
    /// `Codename`
    pub codename: String,
    /// The `SHA256` section: (path under dists/SUITE, size, sha256).
    pub sha256: Vec<(String, u64, String)>,
}

impl Release {
    /// The size and sha256 of `path` (relative to dists/SUITE).
    pub fn checksum(&self, path: &str) -> Option<(u64, &str)> {
        self.sha256
            .iter()
            .find(|(p, _, _)| p == path)
            .map(|(_, size, hash)| (*size, hash.as_str()))
    }
}

/// Parses the verified text of an `InRelease` (what gpgv printed, without the signature).
pub fn parse_release(text: &str, what: &str) -> Result<Release, DebianError> {
    let ps = paragraphs(text);
    let p = ps.first().ok_or_else(|| DebianError::Parse {
        what: what.to_string(),
        reason: "empty Release file".to_string(),
    })?;
    let mut sha256 = Vec::new();
    for line in p.get("SHA256").unwrap_or("").lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if let [hash, size, path] = parts[..] {
            let size = size.parse().map_err(|_| DebianError::Parse {
                what: what.to_string(),
                reason: format!("bad size in SHA256 line {line:?}"),
            })?;
            sha256.push((path.to_string(), size, hash.to_ascii_lowercase()));
        }
    }
    Ok(Release {
        suite: p.get("Suite").unwrap_or("").to_string(),
        codename: p.get("Codename").unwrap_or("").to_string(),
        sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACKAGES: &str = "\
Package: containerd
Version: 1.6.20~ds1-1+b1
Installed-Size: 100
Architecture: amd64
Depends: libc6 (>= 2.34), libseccomp2 (>= 2.5.0), runc (>= 1.0.0~rc94) | crun
Pre-Depends: init-system-helpers (>= 1.54~)
Description: daemon
 multi-line
Filename: pool/main/c/containerd/containerd_1.6.20~ds1-1+b1_amd64.deb
Size: 26262080
SHA256: ABCDEF

Package: mawk
Version: 1.3.4.20200120-3.1
Architecture: amd64
Multi-Arch: foreign
Provides: awk,
 awk-impl (= 1.3.4)
Filename: pool/main/m/mawk/mawk_1.3.4.20200120-3.1_amd64.deb
Size: 119
SHA256: 00ff
";

    #[test]
    fn packages_fields() {
        let ps = parse_packages(PACKAGES, "fixture").unwrap();
        assert_eq!(ps.len(), 2);
        let c = &ps[0];
        assert_eq!(c.name, "containerd");
        assert_eq!(c.size, 26262080);
        assert_eq!(c.sha256, "abcdef");
        assert_eq!(c.depends.len(), 4);
        assert_eq!(
            c.depends[0][0].name, "init-system-helpers",
            "Pre-Depends first"
        );
        assert_eq!(c.depends[3].len(), 2);
        assert_eq!(c.depends[3][1].name, "crun");
        let runc = c.depends[3][0].constraint.as_ref().unwrap();
        assert_eq!(
            (runc.relation, runc.version.as_str()),
            (Relation::Ge, "1.0.0~rc94")
        );
        let m = &ps[1];
        assert_eq!(m.multi_arch, "foreign");
        assert_eq!(
            m.provides,
            vec![
                Provide {
                    name: "awk".into(),
                    version: None
                },
                Provide {
                    name: "awk-impl".into(),
                    version: Some("1.3.4".into())
                },
            ]
        );
    }

    #[test]
    fn missing_field_is_an_error_with_line() {
        let err = parse_packages("Package: a\nVersion: 1\nSize: 1\n", "P")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 1") && err.contains("Architecture"),
            "{err}"
        );
    }

    #[test]
    fn relation_syntax() {
        let c =
            parse_relations("python3:any (>= 3.11~), libfoo [amd64] <!nocheck>,perl(<<6)").unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[0][0].arch.as_deref(), Some("any"));
        assert_eq!(c[1][0].name, "libfoo");
        assert_eq!(c[1][0].constraint, None);
        let p = c[2][0].constraint.as_ref().unwrap();
        assert_eq!((c[2][0].name.as_str(), p.relation), ("perl", Relation::Lt));
        assert!(parse_relations("a (>= 1").is_err());
        assert!(parse_relations("a (~ 1)").is_err());
        assert!(parse_relations("a b").is_err());
        assert!(parse_relations("").unwrap().is_empty());
    }

    #[test]
    fn release_checksums() {
        let text = "Origin: Debian\nSuite: stable\nCodename: bookworm\nSHA256:\n \
                    0123 42 main/binary-amd64/Packages.xz\n abcd 7 main/Contents-amd64\n";
        let r = parse_release(text, "InRelease").unwrap();
        assert_eq!(
            (r.suite.as_str(), r.codename.as_str()),
            ("stable", "bookworm")
        );
        assert_eq!(
            r.checksum("main/binary-amd64/Packages.xz"),
            Some((42, "0123"))
        );
        assert_eq!(r.checksum("main/binary-arm64/Packages.xz"), None);
    }
}
