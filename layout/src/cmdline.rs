//! The kernel command line contract between a boot entry (written by the builder and the updater)
//! and stage 1 of the init (which reads it).

use crate::verity::VerityParams;
use crate::Slot;
use uuid::Uuid;

/// What a boot entry pins: its slot, its root partition and verity tree, the state and ESP
/// partitions, and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootParams {
    pub version: String,
    pub slot: Slot,
    /// PARTUUID of the slot's root partition.
    pub root: Uuid,
    /// PARTUUID of the `state` partition.
    pub state: Uuid,
    /// PARTUUID of the ESP.
    pub esp: Uuid,
    /// The dm-verity parameters; `None` only for an explicitly unverified development boot.
    pub verity: Option<VerityParams>,
    /// Debug logging in the init.
    pub debug: bool,
}

/// Why a command line cannot boot a Caisson root.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    /// A key the init needs is missing.
    #[error("kernel command line has no {0}")]
    Missing(&'static str),
    /// A key has a value that does not parse.
    #[error("kernel command line: {key}={value:?} is not valid: {why}")]
    Invalid {
        key: &'static str,
        value: String,
        why: String,
    },
    /// No verity root hash and no explicit request for an unverified boot.
    #[error(
        "kernel command line has no caisson.verity.root: refusing to boot an unverified root \
         (add caisson.insecure for a development boot)"
    )]
    Unverified,
    /// An extra word (from a spec's `kernel.cmdline` or a manifest) that would override what a
    /// boot entry pins: the kernel takes the last occurrence of a key.
    #[error(
        "kernel command line extra {0:?} is reserved: root=, the caisson.* keys a boot entry pins \
         (slot, version, state, esp, verity.*) and caisson.insecure are set by the entry itself"
    )]
    Reserved(String),
    /// An extra that holds a newline or another control character, which would end the entry's
    /// `options` line and start a line of its own.
    #[error("kernel command line extra {0:?} holds a control character")]
    Control(String),
}

pub const KEY_ROOT: &str = "root";
pub const KEY_SLOT: &str = "caisson.slot";
pub const KEY_VERSION: &str = "caisson.version";
pub const KEY_STATE: &str = "caisson.state";
pub const KEY_ESP: &str = "caisson.esp";
pub const KEY_VERITY_ROOT: &str = "caisson.verity.root";
pub const KEY_VERITY_SALT: &str = "caisson.verity.salt";
pub const KEY_VERITY_DATA_BLOCKS: &str = "caisson.verity.data_blocks";
pub const KEY_VERITY_HASH_OFFSET: &str = "caisson.verity.hash_offset";
pub const FLAG_INSECURE: &str = "caisson.insecure";
pub const FLAG_DEBUG: &str = "caisson.debug";

impl BootParams {
    /// The command line words that pin this boot (extras such as `console=` are added by the caller).
    pub fn render(&self) -> String {
        let mut words = vec![
            format!("{KEY_ROOT}=PARTUUID={}", self.root),
            format!("{KEY_SLOT}={}", self.slot),
            format!("{KEY_VERSION}={}", self.version),
            format!("{KEY_STATE}=PARTUUID={}", self.state),
            format!("{KEY_ESP}=PARTUUID={}", self.esp),
        ];
        match &self.verity {
            Some(v) => {
                words.push(format!("{KEY_VERITY_ROOT}={}", hex::encode(v.root_hash)));
                words.push(format!("{KEY_VERITY_SALT}={}", hex::encode(v.salt)));
                words.push(format!("{KEY_VERITY_DATA_BLOCKS}={}", v.data_blocks));
                words.push(format!("{KEY_VERITY_HASH_OFFSET}={}", v.hash_offset));
            }
            None => words.push(FLAG_INSECURE.to_string()),
        }
        if self.debug {
            words.push(FLAG_DEBUG.to_string());
        }
        words.join(" ")
    }

    /// Reads the boot parameters from a whole kernel command line (`/proc/cmdline`).
    pub fn parse(cmdline: &str) -> Result<Self, CmdlineError> {
        let words: Vec<&str> = cmdline.split_whitespace().collect();
        let value = |key: &'static str| {
            words
                .iter()
                .rev()
                .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        };
        let flag = |key: &str| words.contains(&key);
        let required = |key: &'static str| value(key).ok_or(CmdlineError::Missing(key));
        let invalid = |key: &'static str, v: &str, why: String| CmdlineError::Invalid {
            key,
            value: v.to_string(),
            why,
        };
        let partuuid = |key: &'static str| -> Result<Uuid, CmdlineError> {
            let v = required(key)?;
            let u = v
                .strip_prefix("PARTUUID=")
                .ok_or_else(|| invalid(key, v, "expected PARTUUID=<uuid>".into()))?;
            Uuid::parse_str(u).map_err(|e| invalid(key, v, e.to_string()))
        };

        let slot_text = required(KEY_SLOT)?;
        let slot = slot_text
            .parse::<Slot>()
            .map_err(|e| invalid(KEY_SLOT, slot_text, e.to_string()))?;
        let verity = match value(KEY_VERITY_ROOT) {
            Some(root) => {
                let root_hash = hex32(root).map_err(|why| invalid(KEY_VERITY_ROOT, root, why))?;
                let salt_text = required(KEY_VERITY_SALT)?;
                let salt =
                    hex32(salt_text).map_err(|why| invalid(KEY_VERITY_SALT, salt_text, why))?;
                let number = |key: &'static str| -> Result<u64, CmdlineError> {
                    let v = required(key)?;
                    v.parse().map_err(|e| invalid(key, v, format!("{e}")))
                };
                Some(VerityParams {
                    root_hash,
                    salt,
                    data_blocks: number(KEY_VERITY_DATA_BLOCKS)?,
                    hash_offset: number(KEY_VERITY_HASH_OFFSET)?,
                })
            }
            None if flag(FLAG_INSECURE) => None,
            None => return Err(CmdlineError::Unverified),
        };
        Ok(BootParams {
            version: required(KEY_VERSION)?.to_string(),
            slot,
            root: partuuid(KEY_ROOT)?,
            state: partuuid(KEY_STATE)?,
            esp: partuuid(KEY_ESP)?,
            verity,
            debug: flag(FLAG_DEBUG),
        })
    }
}

/// The keys a boot entry pins, which no extra word may set again.
pub const PINNED_KEYS: [&str; 10] = [
    KEY_ROOT,
    KEY_SLOT,
    KEY_VERSION,
    KEY_STATE,
    KEY_ESP,
    KEY_VERITY_ROOT,
    KEY_VERITY_SALT,
    KEY_VERITY_DATA_BLOCKS,
    KEY_VERITY_HASH_OFFSET,
    FLAG_INSECURE,
];

/// Checks the words a spec or a manifest adds after a boot entry's pinning keys: none may set a
/// [`PINNED_KEYS`] key or anything below `caisson.verity.`, none may hold a control character.
/// Other words (`console=`, `caisson.debug`, `caisson.config_url=`) are the spec's to add.
pub fn check_extra(extra: &str) -> Result<(), CmdlineError> {
    if extra.chars().any(char::is_control) {
        return Err(CmdlineError::Control(extra.to_string()));
    }
    for word in extra.split_whitespace() {
        let key = word.split_once('=').map_or(word, |(k, _)| k);
        if PINNED_KEYS.contains(&key) || key.starts_with("caisson.verity.") {
            return Err(CmdlineError::Reserved(word.to_string()));
        }
    }
    Ok(())
}

fn hex32(text: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(text).map_err(|e| e.to_string())?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("expected 32 bytes, got {}", b.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BootParams {
        BootParams {
            version: "1.0.0".into(),
            slot: Slot::B,
            root: Uuid::from_u128(1),
            state: Uuid::from_u128(2),
            esp: Uuid::from_u128(3),
            verity: Some(VerityParams {
                root_hash: [7; 32],
                salt: [9; 32],
                data_blocks: 100,
                hash_offset: 409600,
            }),
            debug: false,
        }
    }

    #[test]
    fn round_trip_with_extras() {
        let p = sample();
        let line = format!("console=ttyS0 {} quiet", p.render());
        assert_eq!(BootParams::parse(&line), Ok(p));
    }

    #[test]
    fn unverified_needs_the_flag() {
        let mut p = sample();
        p.verity = None;
        let line = p.render();
        assert!(line.contains(FLAG_INSECURE));
        assert_eq!(BootParams::parse(&line), Ok(p));
        let stripped = line.replace(FLAG_INSECURE, "");
        assert_eq!(BootParams::parse(&stripped), Err(CmdlineError::Unverified));
    }

    #[test]
    fn extras_cannot_override_the_pinned_keys() {
        assert_eq!(
            check_extra("console=ttyS0 quiet caisson.debug caisson.config_url=http://x/c"),
            Ok(())
        );
        for bad in [
            "caisson.slot=a",
            "console=ttyS0 root=/dev/sda2",
            "caisson.verity.root=00",
            "caisson.insecure",
            "caisson.version=9.9.9",
            "caisson.verity.newer=1",
            "caisson.state=PARTUUID=00000000-0000-0000-0000-000000000000",
            "caisson.esp",
        ] {
            assert!(
                matches!(check_extra(bad), Err(CmdlineError::Reserved(_))),
                "{bad} accepted"
            );
        }
        assert!(matches!(
            check_extra("quiet\ninitrd /evil"),
            Err(CmdlineError::Control(_))
        ));
        // What the check prevents: an extra after the pinning keys wins.
        let line = format!("{} caisson.slot=a", sample().render());
        assert_eq!(BootParams::parse(&line).map(|p| p.slot), Ok(Slot::A));
    }

    #[test]
    fn names_the_bad_key() {
        let line = sample()
            .render()
            .replace("caisson.slot=b", "caisson.slot=c");
        let err = BootParams::parse(&line).unwrap_err().to_string();
        assert!(err.contains("caisson.slot"), "{err}");
        let line = sample().render().replace("caisson.slot=b", "");
        assert_eq!(
            BootParams::parse(&line),
            Err(CmdlineError::Missing("caisson.slot"))
        );
    }
}
