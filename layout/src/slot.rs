//! The two root slots, A and B.

use std::fmt;
use std::str::FromStr;

/// One of the two root slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    A,
    B,
}

/// A slot name that is neither `a` nor `b`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown slot {0:?}: expected \"a\" or \"b\"")]
pub struct UnknownSlot(pub String);

impl Slot {
    /// Both slots, A first.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// The lower-case name used in labels, entry names and the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// The slot that is not this one.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// The GPT partition label of this slot's root partition (`root-a`, `root-b`).
    pub fn partition_label(self) -> &'static str {
        match self {
            Slot::A => crate::partition::LABEL_ROOT_A,
            Slot::B => crate::partition::LABEL_ROOT_B,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Slot {
    type Err = UnknownSlot;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "a" | "A" => Ok(Slot::A),
            "b" | "B" => Ok(Slot::B),
            other => Err(UnknownSlot(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_other() {
        for s in Slot::ALL {
            assert_eq!(s.as_str().parse::<Slot>(), Ok(s));
            assert_ne!(s.other(), s);
            assert_eq!(s.other().other(), s);
        }
        assert_eq!(Slot::A.partition_label(), "root-a");
        assert!("c".parse::<Slot>().is_err());
    }
}
