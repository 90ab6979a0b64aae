//! Debian version comparison, as dpkg does it (`deb-version(7)`).
//!
//! A version is `[epoch:]upstream[-revision]`. Epochs compare as numbers; upstream and revision
//! compare by alternating runs of non-digits (byte by byte, letters before other characters,
//! `~` before everything, even the end of the string) and digits (as numbers).

use std::cmp::Ordering;
use std::fmt;

/// A relation in a versioned dependency, e.g. the `>=` of `libc6 (>= 2.34)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Relation {
    /// `<<`
    Lt,
    /// `<=` (also the obsolete `<`)
    Le,
    /// `=`
    Eq,
    /// `>=` (also the obsolete `>`)
    Ge,
    /// `>>`
    Gt,
}

impl Relation {
    /// Parses the operator text of a dependency.
    pub fn parse(op: &str) -> Option<Relation> {
        match op {
            "<<" => Some(Relation::Lt),
            "<=" | "<" => Some(Relation::Le),
            "=" => Some(Relation::Eq),
            ">=" | ">" => Some(Relation::Ge),
            ">>" => Some(Relation::Gt),
            _ => None,
        }
    }

    /// Whether `version <self> wanted` holds.
    pub fn holds(self, version: &str, wanted: &str) -> bool {
        let ord = compare(version, wanted);
        match self {
            Relation::Lt => ord == Ordering::Less,
            Relation::Le => ord != Ordering::Greater,
            Relation::Eq => ord == Ordering::Equal,
            Relation::Ge => ord != Ordering::Less,
            Relation::Gt => ord == Ordering::Greater,
        }
    }
}

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Relation::Lt => "<<",
            Relation::Le => "<=",
            Relation::Eq => "=",
            Relation::Ge => ">=",
            Relation::Gt => ">>",
        })
    }
}

/// Compares two Debian version strings.
pub fn compare(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| compare_part(ua, ub))
        .then_with(|| compare_part(ra, rb))
}

/// Splits a version into epoch, upstream version and revision.
fn split(v: &str) -> (u64, &str, &str) {
    let v = v.trim();
    let (epoch, rest) = match v.split_once(':') {
        Some((e, rest)) if !e.is_empty() && e.bytes().all(|c| c.is_ascii_digit()) => {
            (e.parse().unwrap_or(u64::MAX), rest)
        }
        _ => (0, v),
    };
    match rest.rsplit_once('-') {
        Some((upstream, revision)) => (epoch, upstream, revision),
        None => (epoch, rest, ""),
    }
}

/// The sort weight of one non-digit byte; `None` is the end of the run.
fn weight(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(c) => i32::from(c) + 256,
    }
}

/// dpkg's `verrevcmp`.
fn compare_part(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    while !a.is_empty() || !b.is_empty() {
        let (na, ra) = take_while(a, |c| !c.is_ascii_digit());
        let (nb, rb) = take_while(b, |c| !c.is_ascii_digit());
        let ord = compare_non_digits(na, nb);
        if ord != Ordering::Equal {
            return ord;
        }
        let (da, ra) = take_while(ra, |c| c.is_ascii_digit());
        let (db, rb) = take_while(rb, |c| c.is_ascii_digit());
        let ord = compare_digits(da, db);
        if ord != Ordering::Equal {
            return ord;
        }
        (a, b) = (ra, rb);
    }
    Ordering::Equal
}

fn take_while(s: &[u8], f: impl Fn(u8) -> bool) -> (&[u8], &[u8]) {
    let n = s.iter().position(|&c| !f(c)).unwrap_or(s.len());
    s.split_at(n)
}

fn compare_non_digits(a: &[u8], b: &[u8]) -> Ordering {
    let len = a.len().max(b.len());
    (0..len)
        .map(|i| weight(a.get(i).copied()).cmp(&weight(b.get(i).copied())))
        .find(|o| *o != Ordering::Equal)
        .unwrap_or(Ordering::Equal)
}

/// Compares digit runs as numbers of any length (leading zeros ignored).
fn compare_digits(a: &[u8], b: &[u8]) -> Ordering {
    let strip = |s: &[u8]| -> usize { s.iter().take_while(|&&c| c == b'0').count() };
    let (a, b) = (&a[strip(a)..], &b[strip(b)..]);
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ordering::{Equal, Greater, Less};

    /// Pairs checked against `dpkg --compare-versions`.
    const PAIRS: &[(&str, &str, Ordering)] = &[
        ("1.0", "1.0", Equal),
        ("1.0", "1.1", Less),
        ("1.10", "1.9", Greater),
        ("1.0~rc1", "1.0", Less),
        ("1.0~rc1", "1.0~rc2", Less),
        ("1.0~~", "1.0~", Less),
        ("1.0~", "1.0", Less),
        ("1.0", "1.0a", Less),
        ("1.0a", "1.0+", Less),
        ("1.0+dfsg", "1.0", Greater),
        ("1:0.1", "2.0", Greater),
        ("0:2.0", "2.0", Equal),
        ("2.0-1", "2.0-2", Less),
        ("2.0-10", "2.0-9", Greater),
        ("2.0", "2.0-0", Equal),
        ("2.0-1", "2.0", Greater),
        ("2.36-9+deb12u4", "2.36-9+deb12u10", Less),
        ("2.36-9", "2.36-9+deb12u1", Less),
        ("1.6.20~ds1-1+b1", "1.6.20~ds1-1", Greater),
        ("1.6.20~ds1-1", "1.6.20-1", Less),
        ("252.30-1~deb12u2", "252.30-1", Less),
        ("1.2-3-4", "1.2-3-5", Less),
        ("1.2-3-4", "1.2-4", Greater),
        ("007", "7", Equal),
        ("1.0.0", "1.0", Greater),
        ("1a", "1b", Less),
        ("1:1.36.1-3", "1:1.36.1-3", Equal),
        ("6.1.0-37", "6.1.0-9", Greater),
        (
            "99999999999999999999999",
            "99999999999999999999998",
            Greater,
        ),
    ];

    #[test]
    fn known_pairs() {
        for &(a, b, want) in PAIRS {
            assert_eq!(compare(a, b), want, "{a} vs {b}");
            assert_eq!(compare(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn agrees_with_dpkg_when_present() {
        let Ok(out) = std::process::Command::new("dpkg").arg("--version").output() else {
            return;
        };
        if !out.status.success() {
            return;
        }
        for &(a, b, want) in PAIRS {
            let op = match want {
                Less => "lt",
                Equal => "eq",
                Greater => "gt",
            };
            let ok = std::process::Command::new("dpkg")
                .args(["--compare-versions", a, op, b])
                .status()
                .map(|s| s.success());
            assert_eq!(ok.ok(), Some(true), "dpkg disagrees: {a} {op} {b}");
        }
    }

    #[test]
    fn relations() {
        assert!(Relation::Ge.holds("2.36-9", "2.34"));
        assert!(!Relation::Lt.holds("2.36", "2.36"));
        assert!(Relation::Le.holds("2.36", "2.36"));
        assert!(Relation::Eq.holds("0:1.0", "1.0"));
        assert!(Relation::Gt.holds("1.0", "1.0~"));
        assert!(!Relation::Gt.holds("1.0~", "1.0"));
        assert_eq!(Relation::parse(">"), Some(Relation::Ge));
        assert_eq!(Relation::parse("<"), Some(Relation::Le));
        assert_eq!(Relation::parse("!="), None);
    }
}
