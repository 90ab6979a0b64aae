//! Version ordering, as systemd-boot sorts entry versions: digit runs compare as numbers, other
//! runs as text, `~` sorts before everything (so `1.0~rc1 < 1.0`).

use std::cmp::Ordering;

/// Compares two versions such as `1.10.0` and `1.9.2`.
pub fn compare(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (Some(b'~'), Some(b'~')) => {
                a = &a[1..];
                b = &b[1..];
                continue;
            }
            (Some(b'~'), _) => return Ordering::Less,
            (_, Some(b'~')) => return Ordering::Greater,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            _ => {}
        }
        let (ra, rest_a) = run(a);
        let (rb, rest_b) = run(b);
        let ord = match (ra[0].is_ascii_digit(), rb[0].is_ascii_digit()) {
            (true, true) => numeric(ra, rb),
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => ra.cmp(rb),
        };
        if ord != Ordering::Equal {
            return ord;
        }
        a = rest_a;
        b = rest_b;
    }
}

/// Splits off a run of digits, or of non-digits without `~`.
fn run(s: &[u8]) -> (&[u8], &[u8]) {
    let digit = s[0].is_ascii_digit();
    let n = s
        .iter()
        .position(|c| c.is_ascii_digit() != digit || *c == b'~')
        .unwrap_or(s.len())
        .max(1);
    s.split_at(n)
}

fn numeric(a: &[u8], b: &[u8]) -> Ordering {
    let trim = |s: &[u8]| -> Vec<u8> {
        let start = s.iter().position(|c| *c != b'0').unwrap_or(s.len());
        s[start..].to_vec()
    };
    let (a, b) = (trim(a), trim(b));
    a.len().cmp(&b.len()).then_with(|| a.cmp(&b))
}

/// True when `a` is newer than `b`.
pub fn newer(a: &str, b: &str) -> bool {
    compare(a, b) == Ordering::Greater
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_like_people_expect() {
        assert!(newer("1.10.0", "1.9.2"));
        assert!(newer("2", "1.9"));
        assert!(newer("1.0.1", "1.0.0"));
        assert!(newer("1.0", "1.0~rc1"));
        assert!(newer("1.0.0a", "1.0.0"));
        assert_eq!(compare("1.0.0", "1.00.0"), Ordering::Equal);
        assert!(!newer("1.0.0", "1.0.0"));
    }
}
