//! Records read from etcd that this agent cannot use: a unit, machine, assignment or status
//! whose JSON does not decode (written by hand, or by a newer version), or that does not match
//! its key. One such record must never stop the fleet: it is skipped, logged once (again only
//! when its value changes), and listed by `caisson-fleet units` and `machines`.

use serde::Serialize;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

/// A record that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{key:?} holds a record this version cannot use ({error}); it is skipped")]
pub struct Invalid {
    pub key: String,
    /// The decode error, or how the record contradicts its key.
    pub error: String,
    /// The record's revision (to overwrite it in a transaction).
    #[serde(skip)]
    pub revision: i64,
    /// A hash of the value: a record is logged again only when it changes.
    #[serde(skip)]
    fingerprint: u64,
}

impl Invalid {
    pub fn new(key: &str, value: &[u8], revision: i64, error: impl std::fmt::Display) -> Invalid {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        value.hash(&mut h);
        Invalid {
            key: key.to_string(),
            error: error.to_string(),
            revision,
            fingerprint: h.finish(),
        }
    }
}

/// Decodes a JSON record, then `check`s it against its key (an error message when it does not
/// fit).
pub fn decode<T: serde::de::DeserializeOwned>(
    key: &str,
    value: &[u8],
    revision: i64,
    check: impl FnOnce(&T) -> Result<(), String>,
) -> Result<T, Invalid> {
    let bad = |e: String| Invalid::new(key, value, revision, e);
    let record: T = serde_json::from_slice(value).map_err(|e| bad(e.to_string()))?;
    check(&record).map_err(bad)?;
    Ok(record)
}

/// The invalid records already logged, by key, with the hash of the value that was logged.
/// Shared by the clones of a [`crate::store::Store`].
#[derive(Debug, Clone, Default)]
pub struct Skipped(Arc<Mutex<BTreeMap<String, u64>>>);

impl Skipped {
    fn seen(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After a read of every key under `prefix`: logs each of `invalid` not logged before with
    /// this value, and forgets the keys under `prefix` that are valid again or gone. Returns the
    /// keys it logged.
    pub fn note(&self, prefix: &str, invalid: &[Invalid]) -> Vec<String> {
        self.seen()
            .retain(|k, _| !k.starts_with(prefix) || invalid.iter().any(|i| &i.key == k));
        invalid
            .iter()
            .filter(|i| self.log(i))
            .map(|i| i.key.clone())
            .collect()
    }

    /// After a read of one key: logs it if invalid and not logged before with this value;
    /// forgets it when valid. True when it logged.
    pub fn note_one(&self, key: &str, invalid: Option<&Invalid>) -> bool {
        match invalid {
            Some(i) => self.log(i),
            None => {
                self.seen().remove(key);
                false
            }
        }
    }

    fn log(&self, i: &Invalid) -> bool {
        let before = self.seen().insert(i.key.clone(), i.fingerprint);
        if before == Some(i.fingerprint) {
            return false;
        }
        log::warn!("{i}");
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(key: &str, value: &str) -> Invalid {
        decode::<BTreeMap<String, u32>>(key, value.as_bytes(), 1, |_| Ok(())).unwrap_err()
    }

    #[test]
    fn decode_checks_json_then_the_key() {
        let e = bad("/p/units/a", "{}x");
        assert!(
            e.to_string().contains("/p/units/a") && e.to_string().contains("trailing"),
            "{e}"
        );
        let e = decode::<u32>("/p/k", b"7", 3, |n| {
            if *n == 7 {
                Err("seven".into())
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert_eq!((e.error.as_str(), e.revision), ("seven", 3));
        assert_eq!(decode::<u32>("/p/k", b"8", 3, |_| Ok(())).unwrap(), 8);
    }

    #[test]
    fn each_invalid_record_is_logged_once_per_value() {
        let s = Skipped::default();
        let a = bad("/p/units/a", "[");
        let b = bad("/p/units/b", "{}x");
        assert_eq!(
            s.note("/p/units/", &[a.clone(), b.clone()]),
            ["/p/units/a", "/p/units/b"]
        );
        // Every later tick: nothing new.
        assert!(s.note("/p/units/", &[a.clone(), b.clone()]).is_empty());
        assert!(s.note("/p/units/", &[a.clone(), b.clone()]).is_empty());
        // b changes (still invalid): logged again; a does not.
        let b2 = bad("/p/units/b", "{}y");
        assert_eq!(
            s.note("/p/units/", &[a.clone(), b2.clone()]),
            ["/p/units/b"]
        );
        // a is fixed, then broken again with the same value: logged again.
        assert!(s.note("/p/units/", std::slice::from_ref(&b2)).is_empty());
        assert_eq!(s.note("/p/units/", &[a.clone(), b2]), ["/p/units/a"]);
        // Another prefix's read does not forget these.
        assert!(s.note("/p/machines/", &[]).is_empty());
        assert!(s.note("/p/units/", std::slice::from_ref(&a)).is_empty());
        // One key.
        let m = bad("/p/assign/m1", "7");
        assert!(s.note_one("/p/assign/m1", Some(&m)));
        assert!(!s.note_one("/p/assign/m1", Some(&m)));
        assert!(!s.note_one("/p/assign/m1", None));
        assert!(s.note_one("/p/assign/m1", Some(&m)));
    }
}
