//! The GPT layout: partition order, type GUIDs (Discoverable Partitions Specification), labels,
//! attributes, and how every GUID of an image is derived from its name and version.

use uuid::Uuid;

/// EFI System Partition type.
pub const TYPE_ESP: Uuid = Uuid::from_u128(0xC12A7328_F81F_11D2_BA4B_00A0C93EC93B);
/// DPS root partition type for x86-64.
pub const TYPE_ROOT_X86_64: Uuid = Uuid::from_u128(0x4F68BCE3_E8CD_4DB1_96E7_FBCAF984B709);
/// DPS variable data partition (`/var`): the `state` partition.
pub const TYPE_VAR: Uuid = Uuid::from_u128(0x4D21B016_B534_45C2_A9FB_5C16E091FD2D);

pub const LABEL_ESP: &str = "esp";
pub const LABEL_ROOT_A: &str = "root-a";
pub const LABEL_ROOT_B: &str = "root-b";
pub const LABEL_STATE: &str = "state";

/// GPT attribute bit 60: read-only (DPS), set on both root slots.
pub const ATTR_READ_ONLY: u64 = 1 << 60;

/// Alignment of every partition start and size, in bytes.
pub const ALIGN: u64 = 1024 * 1024;

/// The partitions of a Caisson disk, in on-disk order (partition numbers 1 to 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Esp,
    RootA,
    RootB,
    State,
}

impl Part {
    /// All partitions in on-disk order.
    pub const ALL: [Part; 4] = [Part::Esp, Part::RootA, Part::RootB, Part::State];

    /// The 1-based partition number.
    pub fn number(self) -> u32 {
        match self {
            Part::Esp => 1,
            Part::RootA => 2,
            Part::RootB => 3,
            Part::State => 4,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Part::Esp => LABEL_ESP,
            Part::RootA => LABEL_ROOT_A,
            Part::RootB => LABEL_ROOT_B,
            Part::State => LABEL_STATE,
        }
    }

    pub fn type_guid(self) -> Uuid {
        match self {
            Part::Esp => TYPE_ESP,
            Part::RootA | Part::RootB => TYPE_ROOT_X86_64,
            Part::State => TYPE_VAR,
        }
    }

    pub fn attributes(self) -> u64 {
        match self {
            Part::RootA | Part::RootB => ATTR_READ_ONLY,
            _ => 0,
        }
    }

    /// The root partition of a slot.
    pub fn root(slot: crate::Slot) -> Part {
        match slot {
            crate::Slot::A => Part::RootA,
            crate::Slot::B => Part::RootB,
        }
    }
}

/// The namespace under which every Caisson GUID is derived (UUID v5).
const NAMESPACE: Uuid = Uuid::from_u128(0x6361_6973_736f_4e00_8000_0000_0000_0001);

/// A GUID derived from the image name and a purpose string: the same image always gets the same
/// GUIDs, so builds are reproducible, and two images never share them.
pub fn derive_guid(image_name: &str, purpose: &str) -> Uuid {
    Uuid::new_v5(&NAMESPACE, format!("{image_name}\0{purpose}").as_bytes())
}

/// The disk GUID of an image.
pub fn disk_guid(image_name: &str, version: &str) -> Uuid {
    derive_guid(image_name, &format!("disk\0{version}"))
}

/// The unique partition GUID (PARTUUID) of a partition. Slot GUIDs depend on the image name only,
/// not its version: the updater writes new versions into the same partitions.
pub fn partition_guid(image_name: &str, part: Part) -> Uuid {
    derive_guid(image_name, &format!("partition\0{}", part.label()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_are_stable_and_distinct() {
        let a = partition_guid("host", Part::RootA);
        assert_eq!(a, partition_guid("host", Part::RootA));
        assert_ne!(a, partition_guid("host", Part::RootB));
        assert_ne!(a, partition_guid("minimal", Part::RootA));
        assert_ne!(disk_guid("host", "1.0.0"), disk_guid("host", "1.0.1"));
    }

    #[test]
    fn type_guid_text_matches_the_specification() {
        assert_eq!(
            TYPE_ROOT_X86_64.to_string(),
            "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
        );
        assert_eq!(TYPE_ESP.to_string(), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        assert_eq!(TYPE_VAR.to_string(), "4d21b016-b534-45c2-a9fb-5c16e091fd2d");
    }
}
