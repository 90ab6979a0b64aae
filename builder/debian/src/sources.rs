//! Finding the mirror the build host's apt uses, from its sources files.

use std::path::{Path, PathBuf};

use crate::deb822::paragraphs;
use crate::error::{DebianError, IoContext};

/// Where apt keeps its sources on a normal host.
pub const HOST_APT_DIR: &str = "/etc/apt";

/// One `deb` source: a base URI and the suites it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Source {
    uri: String,
    suites: Vec<String>,
}

/// The base URL of the first `deb` source (http or https) serving exactly `suite`, read the way
/// apt reads them: `<etc_apt_root>/sources.list` first, then `<etc_apt_root>/sources.list.d/`
/// `*.list` and `*.sources` (deb822) files in name order. Sources for `<suite>-security` or
/// `<suite>-updates` do not count. The result has no trailing slash.
pub fn host_mirror(etc_apt_root: &Path, suite: &str) -> Result<String, DebianError> {
    for file in source_files(etc_apt_root)? {
        let text = std::fs::read_to_string(&file).ctx("reading", &file)?;
        let sources = if file.extension().is_some_and(|e| e == "sources") {
            parse_deb822(&text)
        } else {
            parse_one_line(&text)
        };
        if let Some(found) = sources.into_iter().find(|s| serves(s, suite)) {
            return Ok(found.uri.trim_end_matches('/').to_string());
        }
    }
    Err(DebianError::NoMirror {
        dir: etc_apt_root.to_path_buf(),
        suite: suite.to_string(),
    })
}

fn serves(source: &Source, suite: &str) -> bool {
    let web = source.uri.starts_with("http://") || source.uri.starts_with("https://");
    web && source
        .suites
        .iter()
        .any(|s| s.trim_end_matches('/') == suite)
}

/// sources.list, then the sources.list.d files apt would read, in name order.
fn source_files(dir: &Path) -> Result<Vec<PathBuf>, DebianError> {
    let mut files = Vec::new();
    let main = dir.join("sources.list");
    if main.is_file() {
        files.push(main);
    }
    let parts = dir.join("sources.list.d");
    if !parts.is_dir() {
        return Ok(files);
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&parts).ctx("listing", &parts)? {
        let path = entry.ctx("listing", &parts)?.path();
        let ext = path.extension().and_then(|e| e.to_str());
        if matches!(ext, Some("list" | "sources")) && path.is_file() {
            found.push(path);
        }
    }
    found.sort();
    files.extend(found);
    Ok(files)
}

/// `Types: deb` paragraphs of a deb822 `.sources` file.
fn parse_deb822(text: &str) -> Vec<Source> {
    paragraphs(text)
        .iter()
        .filter(|p| {
            let is_deb = p
                .get("Types")
                .is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
            let enabled = p
                .get("Enabled")
                .is_none_or(|e| !e.eq_ignore_ascii_case("no"));
            is_deb && enabled
        })
        .flat_map(|p| {
            let suites: Vec<String> = words(p.get("Suites"));
            words(p.get("URIs")).into_iter().map(move |uri| Source {
                uri,
                suites: suites.clone(),
            })
        })
        .collect()
}

fn words(value: Option<&str>) -> Vec<String> {
    value
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// `deb [options] uri suite [components...]` lines.
fn parse_one_line(text: &str) -> Vec<Source> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Source> {
    let line = line.split('#').next().unwrap_or("").trim();
    let rest = line.strip_prefix("deb")?;
    if !rest.starts_with([' ', '\t']) {
        return None; // deb-src, or not a source line
    }
    let mut rest = rest.trim_start();
    if rest.starts_with('[') {
        let close = rest.find(']')?;
        rest = &rest[close + 1..];
    }
    let mut tokens = rest.split_whitespace();
    let uri = tokens.next()?.to_string();
    let suite = tokens.next()?.to_string();
    Some(Source {
        uri,
        suites: vec![suite],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sources.list.d")).unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    const DEB822: &str = "\
Types: deb
# a comment
URIs: http://mirror.invalid/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.invalid/debian
Suites: bookworm

Types: deb
URIs: http://disabled.invalid/debian
Suites: bookworm
Enabled: no

Types: deb
URIs: http://mirror.invalid/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

    #[test]
    fn deb822_picks_plain_suite() {
        let dir = tree(&[("sources.list.d/debian.sources", DEB822)]);
        let m = host_mirror(dir.path(), "bookworm").unwrap();
        assert_eq!(m, "http://mirror.invalid/debian");
        let s = host_mirror(dir.path(), "bookworm-security").unwrap();
        assert_eq!(s, "http://mirror.invalid/debian-security");
    }

    #[test]
    fn one_line_with_options_and_comments() {
        let list = "\
# deb http://commented.invalid/debian bookworm main
deb-src http://src.invalid/debian bookworm main
deb [arch=amd64 signed-by=/k.gpg] http://one.invalid/debian bookworm-updates main
deb cdrom:[Debian]/ bookworm main
deb [ arch=amd64 ] https://one.invalid/debian/ bookworm main contrib # trailing
";
        let dir = tree(&[("sources.list", list)]);
        let m = host_mirror(dir.path(), "bookworm").unwrap();
        assert_eq!(m, "https://one.invalid/debian");
    }

    #[test]
    fn sources_list_comes_first_then_names_in_order() {
        let dir = tree(&[
            ("sources.list", "# empty\n"),
            (
                "sources.list.d/b.list",
                "deb http://b.invalid/debian bookworm main\n",
            ),
            ("sources.list.d/a.sources", DEB822),
            (
                "sources.list.d/0.list.disabled",
                "deb http://x.invalid/d bookworm main\n",
            ),
        ]);
        assert_eq!(
            host_mirror(dir.path(), "bookworm").unwrap(),
            "http://mirror.invalid/debian"
        );
        std::fs::write(
            dir.path().join("sources.list"),
            "deb http://first.invalid/debian bookworm main\n",
        )
        .unwrap();
        assert_eq!(
            host_mirror(dir.path(), "bookworm").unwrap(),
            "http://first.invalid/debian"
        );
    }

    #[test]
    fn no_source_is_an_error_naming_suite() {
        let dir = tree(&[(
            "sources.list.d/x.list",
            "deb http://x.invalid/d trixie main\n",
        )]);
        let err = host_mirror(dir.path(), "bookworm").unwrap_err().to_string();
        assert!(err.contains("bookworm"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        assert!(host_mirror(empty.path(), "bookworm").is_err());
    }
}
