//! Dependency closure over a parsed Packages index.
//!
//! The resolver is greedy and deterministic: requested packages are taken in name order, their
//! dependencies breadth first in index order, and for each clause the first alternative that is
//! already chosen wins, else the first one that some package can satisfy (a real package of that
//! name, highest version first, before packages that provide it, in name order). Only
//! `Pre-Depends` and `Depends` count; nothing is added for being Essential or Priority: required.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;

use crate::archive::{self, Archive};
use crate::cache::Cache;
use crate::error::DebianError;
use crate::http::Http;
use crate::index::{Clause, Dep, Package};
use crate::lock::{Lock, LockedPackage};
use crate::progress::Reporter;
use crate::version::compare;

/// Resolves the dependency closure of `requested` in `archive`: fetches `InRelease` and checks
/// its signature with gpgv against the Debian archive keyring, fetches each component's
/// `Packages.xz` (or takes it from `cache`) checked against the signed sha256, and computes the
/// closure. `progress` shows bars on a terminal, plain lines on stderr otherwise.
pub fn resolve(
    archive: &Archive,
    cache: &Cache,
    requested: &[String],
    progress: bool,
) -> Result<Lock, DebianError> {
    let keyring = Path::new(archive::DEBIAN_KEYRING);
    resolve_with_keyring(archive, keyring, cache, requested, progress)
}

/// [`resolve`], with `InRelease` checked against `keyring` (a binary OpenPGP keyring as gpgv
/// reads it) instead of the Debian archive keyring: for another archive, or a test one.
pub fn resolve_with_keyring(
    archive: &Archive,
    keyring: &Path,
    cache: &Cache,
    requested: &[String],
    progress: bool,
) -> Result<Lock, DebianError> {
    let report = Reporter::new(progress);
    let http = Http::new()?;
    let release = archive::release(archive, keyring, &http)?;
    let packages = archive::packages(archive, cache, &http, &release, report)?;
    let universe = Universe::new(packages, &archive.arch, &archive.label());
    let closure = universe.closure(requested)?;
    let mut inputs = requested.to_vec();
    inputs.sort();
    inputs.dedup();
    report.line(&format!(
        "resolved {} packages for {} requested",
        closure.len(),
        inputs.len()
    ));
    Ok(Lock {
        suite: archive.suite.clone(),
        arch: archive.arch.clone(),
        inputs,
        packages: closure.into_iter().map(locked).collect(),
    })
}

fn locked(p: &Package) -> LockedPackage {
    LockedPackage {
        name: p.name.clone(),
        version: p.version.clone(),
        arch: p.arch.clone(),
        filename: p.filename.clone(),
        sha256: p.sha256.clone(),
        size: p.size,
    }
}

/// The packages of one architecture (plus `all`), indexed by name and by what they provide.
pub struct Universe {
    packages: Vec<Package>,
    /// Real names, each list highest version first.
    by_name: HashMap<String, Vec<usize>>,
    /// Virtual names, each list in provider name order then highest version first.
    providers: HashMap<String, Vec<(usize, Option<String>)>>,
    arch: String,
    /// `suite/components`, for messages.
    label: String,
}

impl Universe {
    /// Indexes `packages`, keeping those built for `arch` or `all`. `label` names the archive in
    /// errors, e.g. `bookworm/main`.
    pub fn new(packages: Vec<Package>, arch: &str, label: &str) -> Universe {
        let packages: Vec<Package> = packages
            .into_iter()
            .filter(|p| p.arch == arch || p.arch == "all")
            .collect();
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        let mut providers: HashMap<String, Vec<(usize, Option<String>)>> = HashMap::new();
        for (i, p) in packages.iter().enumerate() {
            by_name.entry(p.name.clone()).or_default().push(i);
            for prov in &p.provides {
                providers
                    .entry(prov.name.clone())
                    .or_default()
                    .push((i, prov.version.clone()));
            }
        }
        let newest_first = |a: &usize, b: &usize| {
            compare(&packages[*b].version, &packages[*a].version).then(a.cmp(b))
        };
        for list in by_name.values_mut() {
            list.sort_by(newest_first);
            list.dedup_by(|a, b| packages[*a].version == packages[*b].version);
        }
        for list in providers.values_mut() {
            list.sort_by(|(a, _), (b, _)| {
                packages[*a]
                    .name
                    .cmp(&packages[*b].name)
                    .then(newest_first(a, b))
            });
        }
        Universe {
            packages,
            by_name,
            providers,
            arch: arch.to_string(),
            label: label.to_string(),
        }
    }

    /// The dependency closure of `requested`, sorted by name.
    pub fn closure(&self, requested: &[String]) -> Result<Vec<&Package>, DebianError> {
        let mut state = State::default();
        let mut wanted: Vec<&String> = requested.iter().collect();
        wanted.sort();
        wanted.dedup();
        for name in wanted {
            let idx = self.requested(name)?;
            state.choose(&self.packages, idx, None);
        }
        while let Some(idx) = state.queue.pop_front() {
            for clause in &self.packages[idx].depends {
                self.satisfy(&mut state, idx, clause)?;
            }
        }
        Ok(state.chosen.values().map(|&i| &self.packages[i]).collect())
    }

    /// The package for a requested name: the newest of that name, or its only provider.
    fn requested(&self, name: &str) -> Result<usize, DebianError> {
        if let Some(&idx) = self.by_name.get(name).and_then(|l| l.first()) {
            return Ok(idx);
        }
        let mut names: Vec<&str> = self
            .providers
            .get(name)
            .map(|l| {
                l.iter()
                    .map(|(i, _)| self.packages[*i].name.as_str())
                    .collect()
            })
            .unwrap_or_default();
        names.dedup();
        match names.as_slice() {
            [] => Err(DebianError::MissingPackage {
                name: name.to_string(),
                archive: self.label.clone(),
                arch: self.arch.clone(),
            }),
            [only] => self.requested(only),
            _ => Err(DebianError::AmbiguousVirtual {
                name: name.to_string(),
                providers: names.join(", "),
            }),
        }
    }

    fn satisfy(&self, state: &mut State, from: usize, clause: &Clause) -> Result<(), DebianError> {
        if clause.iter().any(|dep| self.chosen_satisfies(state, dep)) {
            return Ok(());
        }
        match clause.iter().find_map(|dep| self.candidate(state, dep)) {
            Some(idx) => {
                state.choose(&self.packages, idx, Some(from));
                Ok(())
            }
            None => Err(DebianError::Unsatisfiable {
                chain: state.chain(&self.packages, from),
                dependency: clause_text(clause),
                archive: self.label.clone(),
            }),
        }
    }

    /// Whether the qualifier of `dep` can be met by a package of this architecture.
    fn arch_ok(&self, dep: &Dep) -> bool {
        dep.arch
            .as_deref()
            .is_none_or(|a| a == "any" || a == self.arch)
    }

    fn version_ok(dep: &Dep, version: Option<&str>) -> bool {
        match (&dep.constraint, version) {
            (None, _) => true,
            (Some(c), Some(v)) => c.relation.holds(v, &c.version),
            (Some(_), None) => false,
        }
    }

    fn chosen_satisfies(&self, state: &State, dep: &Dep) -> bool {
        if !self.arch_ok(dep) {
            return false;
        }
        let real = state
            .chosen
            .get(&dep.name)
            .is_some_and(|&i| Self::version_ok(dep, Some(&self.packages[i].version)));
        real || self
            .providers_of(dep)
            .any(|i| state.is_chosen(&self.packages, i))
    }

    /// Providers of `dep`'s name whose provided version satisfies it.
    fn providers_of<'a>(&'a self, dep: &'a Dep) -> impl Iterator<Item = usize> + 'a {
        self.providers
            .get(&dep.name)
            .into_iter()
            .flatten()
            .filter(|(_, v)| Self::version_ok(dep, v.as_deref()))
            .map(|(i, _)| *i)
    }

    /// A package not yet chosen that would satisfy `dep` without replacing a chosen one.
    fn candidate(&self, state: &State, dep: &Dep) -> Option<usize> {
        if !self.arch_ok(dep) {
            return None;
        }
        let free = |i: &usize| !state.chosen.contains_key(&self.packages[*i].name);
        let real = self
            .by_name
            .get(&dep.name)
            .into_iter()
            .flatten()
            .copied()
            .filter(free)
            .find(|&i| Self::version_ok(dep, Some(&self.packages[i].version)));
        real.or_else(|| self.providers_of(dep).find(free))
    }
}

/// The resolver's progress.
#[derive(Default)]
struct State {
    /// Chosen package per name, so the result comes out sorted.
    chosen: BTreeMap<String, usize>,
    /// Who pulled each chosen package in (none for requested ones).
    parent: HashMap<usize, usize>,
    /// Chosen packages whose dependencies are not yet handled.
    queue: VecDeque<usize>,
}

impl State {
    fn choose(&mut self, packages: &[Package], idx: usize, parent: Option<usize>) {
        if self.chosen.contains_key(&packages[idx].name) {
            return;
        }
        self.chosen.insert(packages[idx].name.clone(), idx);
        if let Some(p) = parent {
            self.parent.insert(idx, p);
        }
        self.queue.push_back(idx);
    }

    fn is_chosen(&self, packages: &[Package], idx: usize) -> bool {
        self.chosen.get(&packages[idx].name) == Some(&idx)
    }

    /// `requested -> ... -> idx`, by name.
    fn chain(&self, packages: &[Package], idx: usize) -> String {
        let mut names = vec![packages[idx].name.as_str()];
        let mut cur = idx;
        while let Some(&p) = self.parent.get(&cur) {
            names.push(packages[p].name.as_str());
            cur = p;
        }
        names.reverse();
        names.join(" -> ")
    }
}

/// A clause as Debian writes it: `a (>= 1) | b:any`.
fn clause_text(clause: &Clause) -> String {
    let alt = |d: &Dep| {
        let mut s = d.name.clone();
        if let Some(a) = &d.arch {
            s.push(':');
            s.push_str(a);
        }
        if let Some(c) = &d.constraint {
            s.push_str(&format!(" ({} {})", c.relation, c.version));
        }
        s
    };
    clause.iter().map(alt).collect::<Vec<_>>().join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::parse_packages;

    /// A small archive: every paragraph gets a Filename, Size and SHA256 added.
    fn universe(paragraphs: &str) -> Universe {
        let text: String = paragraphs
            .split("\n\n")
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                format!(
                    "{}\nFilename: pool/x.deb\nSize: 1\nSHA256: 00\n\n",
                    p.trim()
                )
            })
            .collect();
        Universe::new(
            parse_packages(&text, "fixture").unwrap(),
            "amd64",
            "bookworm/main",
        )
    }

    fn names(u: &Universe, req: &[&str]) -> Vec<String> {
        let req: Vec<String> = req.iter().map(|s| s.to_string()).collect();
        u.closure(&req)
            .unwrap()
            .iter()
            .map(|p| format!("{}={}", p.name, p.version))
            .collect()
    }

    const ARCHIVE: &str = "
Package: containerd
Version: 1.6.20~ds1-1+b1
Architecture: amd64
Depends: libc6 (>= 2.34), runc (>= 1.0.0~rc94), libseccomp2:any

Package: runc
Version: 1.1.5+ds1-1+deb12u1
Architecture: amd64
Depends: libc6 (>= 2.34)

Package: runc
Version: 1.1.5+ds1-1
Architecture: amd64

Package: libc6
Version: 2.36-9+deb12u10
Architecture: amd64
Depends: libgcc-s1

Package: libc6
Version: 2.36-9+deb12u10
Architecture: i386

Package: libgcc-s1
Version: 12.2.0-14
Architecture: amd64
Depends: gcc-12-base (= 12.2.0-14), libc6 (>= 2.35)

Package: gcc-12-base
Version: 12.2.0-14
Architecture: amd64

Package: libseccomp2
Version: 2.5.4-1+b3
Architecture: amd64

Package: tool
Version: 1
Architecture: all
Depends: awk, mail-transport-agent | exim4, dbus-session-bus | dbus-x11

Package: mawk
Version: 1.3.4-3
Architecture: amd64
Provides: awk

Package: gawk
Version: 5.2.1-2
Architecture: amd64
Provides: awk

Package: exim4
Version: 4.96-15
Architecture: all

Package: dbus-x11
Version: 1.14
Architecture: amd64

Package: dbus-user-session
Version: 1.14
Architecture: amd64
Provides: dbus-session-bus

Package: needs-new-awk
Version: 1
Architecture: all
Depends: awk-impl (>= 2) | gawk, gawk (>= 6) | mawk

Package: versioned-provider
Version: 1
Architecture: amd64
Provides: awk-impl (= 3)

Package: broken
Version: 1
Architecture: amd64
Depends: containerd, middle

Package: middle
Version: 1
Architecture: all
Depends: libfoo (>= 2) | libbar

Package: libfoo
Version: 1.9
Architecture: amd64

Package: wrong-arch
Version: 1
Architecture: amd64
Depends: libc6:i386
";

    #[test]
    fn closure_with_versions_and_qualifiers() {
        let u = universe(ARCHIVE);
        assert_eq!(
            names(&u, &["containerd"]),
            [
                "containerd=1.6.20~ds1-1+b1",
                "gcc-12-base=12.2.0-14",
                "libc6=2.36-9+deb12u10",
                "libgcc-s1=12.2.0-14",
                "libseccomp2=2.5.4-1+b3",
                "runc=1.1.5+ds1-1+deb12u1",
            ]
        );
    }

    #[test]
    fn alternatives_and_virtuals() {
        let u = universe(ARCHIVE);
        // awk: providers in name order (gawk); mail-transport-agent: nobody provides it, so
        // exim4; dbus-session-bus: provided by dbus-user-session.
        assert_eq!(
            names(&u, &["tool"]),
            [
                "dbus-user-session=1.14",
                "exim4=4.96-15",
                "gawk=5.2.1-2",
                "tool=1"
            ]
        );
        // An alternative already chosen wins over an earlier one.
        assert_eq!(
            names(&u, &["tool", "mawk", "dbus-x11"]),
            ["dbus-x11=1.14", "exim4=4.96-15", "mawk=1.3.4-3", "tool=1"]
        );
    }

    #[test]
    fn versioned_provides() {
        let u = universe(ARCHIVE);
        // awk-impl (>= 2) is met by versioned-provider's `awk-impl (= 3)`; gawk (>= 6) by
        // nobody, so mawk.
        assert_eq!(
            names(&u, &["needs-new-awk"]),
            ["mawk=1.3.4-3", "needs-new-awk=1", "versioned-provider=1"]
        );
    }

    #[test]
    fn unsatisfiable_names_the_chain() {
        let u = universe(ARCHIVE);
        let err = u.closure(&["broken".into()]).unwrap_err().to_string();
        assert_eq!(
            err,
            "broken -> middle depends on libfoo (>= 2) | libbar which no package in \
             bookworm/main satisfies"
        );
        let err = u.closure(&["wrong-arch".into()]).unwrap_err().to_string();
        assert!(err.contains("libc6:i386"), "{err}");
    }

    #[test]
    fn missing_and_virtual_requests() {
        let u = universe(ARCHIVE);
        let err = u
            .closure(&["containerd".into(), "nosuch".into()])
            .unwrap_err();
        assert!(matches!(&err, DebianError::MissingPackage { name, .. } if name == "nosuch"));
        assert!(err.to_string().contains("nosuch"));
        let err = u.closure(&["awk".into()]).unwrap_err().to_string();
        assert!(err.contains("gawk, mawk"), "{err}");
        assert_eq!(names(&u, &["dbus-session-bus"]), ["dbus-user-session=1.14"]);
        assert!(u.closure(&["mail-transport-agent".into()]).is_err());
    }

    #[test]
    fn deterministic_whatever_the_request_order() {
        let u = universe(ARCHIVE);
        assert_eq!(
            names(&u, &["tool", "containerd"]),
            names(&u, &["containerd", "tool", "tool"])
        );
    }
}
