//! What an image version may be. A version names directories on the ESP
//! (`caisson/<version>-<slot>/`), boot entries (`caisson-<version>-<slot>+3-0.conf`, where `+`
//! starts the boot counter) and a word of the kernel command line, so it must be safe in all three.

/// The longest version accepted.
pub const MAX_LEN: usize = 64;

/// A version that cannot name a boot entry or a directory.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "version {0:?} must be 1 to 64 characters, start with a digit and hold only letters, digits, \
     '.', '~', '_' or '-' (no '/', '+', spaces or control characters)"
)]
pub struct VersionError(pub String);

/// Checks a version: letters, digits, `.`, `~`, `_` and `-`, starting with a digit.
pub fn check(v: &str) -> Result<(), VersionError> {
    let ok = v.chars().next().is_some_and(|c| c.is_ascii_digit())
        && v.len() <= MAX_LEN
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '~' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(VersionError(v.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_release_versions() {
        for v in ["1.0.0", "2.1.0~rc1", "10.4_b-2"] {
            assert_eq!(check(v), Ok(()), "{v}");
        }
    }

    #[test]
    fn refuses_what_escapes_a_path_or_a_word() {
        let long = "1".repeat(MAX_LEN + 1);
        for v in [
            "",
            "v1",
            "1/../../x",
            "1/2",
            "..",
            "1.0\n",
            "1.0 x",
            "1+3-0",
            "1\u{7}",
            &long,
        ] {
            assert!(check(v).is_err(), "{v:?} accepted");
        }
    }
}
