//! Reading what the kernel says about the root's verity target: its status (`V` verified, `C`
//! a corrupted block was read) and, from its log, the first corrupted data block.

use crate::dm::TargetStatus;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

/// What the verity target's status says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verity {
    /// Every block read so far matched the hash tree.
    Verified,
    /// At least one block did not: the data or hash tree changed on disk.
    Corrupted,
}

/// The verity target among `targets`, by the first letter of its status (`STATUSTYPE_INFO`:
/// `V` or `C`, followed by FEC counters on kernels built with them). `None`: no verity target,
/// or a status this code does not know.
pub fn verity(targets: &[TargetStatus]) -> Option<Verity> {
    let t = targets.iter().find(|t| t.target_type == "verity")?;
    match t.status.trim_start().chars().next()? {
        'V' => Some(Verity::Verified),
        'C' => Some(Verity::Corrupted),
        _ => None,
    }
}

/// The block number of a kernel line `device-mapper: verity: <dev>: data block N is corrupted`
/// (`metadata block` lines, for the hash tree, give `None`).
pub fn corrupted_data_block(line: &str) -> Option<u64> {
    if !line.contains("verity") {
        return None;
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    words.windows(5).find_map(|w| match w {
        ["data", "block", n, "is", "corrupted"] => n.parse().ok(),
        _ => None,
    })
}

/// The message of one `/dev/kmsg` record (`prio,seq,usec,flags;message\n` with optional
/// continuation lines).
pub fn kmsg_message(record: &str) -> &str {
    let msg = record.split_once(';').map_or(record, |(_, m)| m);
    msg.lines().next().unwrap_or("")
}

/// How many kernel log records are read at most, looking for the block.
const KMSG_RECORDS_MAX: usize = 100_000;

/// The first corrupted data block the kernel logged since boot, read from `/dev/kmsg` (without
/// waiting for new records). `None` when none is there (rotated out, or a metadata block).
pub fn first_corrupted_block_in_kmsg() -> Option<u64> {
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    {
        Ok(f) => f,
        Err(e) => {
            log::warn!("reading /dev/kmsg for the corrupted block: {e}");
            return None;
        }
    };
    let mut buf = vec![0u8; 8192];
    for _ in 0..KMSG_RECORDS_MAX {
        match f.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => {
                let record = String::from_utf8_lossy(&buf[..n]);
                if let Some(block) = corrupted_data_block(kmsg_message(&record)) {
                    return Some(block);
                }
            }
            // A record overwritten while we read: go on with the next.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(e) => {
                log::warn!("reading /dev/kmsg for the corrupted block: {e}");
                return None;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ty: &str, status: &str) -> TargetStatus {
        TargetStatus {
            target_type: ty.into(),
            status: status.into(),
        }
    }

    #[test]
    fn verity_status_letters() {
        assert_eq!(verity(&[t("verity", "V")]), Some(Verity::Verified));
        assert_eq!(verity(&[t("verity", "C")]), Some(Verity::Corrupted));
        // Kernels with FEC append the corrected count.
        assert_eq!(verity(&[t("verity", "C 0")]), Some(Verity::Corrupted));
        assert_eq!(
            verity(&[t("linear", "C"), t("verity", "V")]),
            Some(Verity::Verified)
        );
        assert_eq!(verity(&[t("verity", "")]), None);
        assert_eq!(verity(&[t("verity", "X")]), None);
        assert_eq!(verity(&[t("linear", "")]), None);
        assert_eq!(verity(&[]), None);
    }

    #[test]
    fn block_from_the_kernel_line() {
        let line = "device-mapper: verity: 254:2: data block 4711 is corrupted";
        assert_eq!(corrupted_data_block(line), Some(4711));
        let vda = "device-mapper: verity: vda2: data block 0 is corrupted";
        assert_eq!(corrupted_data_block(vda), Some(0));
        let meta = "device-mapper: verity: 254:2: metadata block 12 is corrupted";
        assert_eq!(corrupted_data_block(meta), None);
        assert_eq!(corrupted_data_block("data block 3 is corrupted"), None);
        assert_eq!(
            corrupted_data_block("device-mapper: verity: x: data block -1 is corrupted"),
            None
        );
    }

    #[test]
    fn kmsg_records() {
        let r = "3,812,5140900,-;device-mapper: verity: 254:2: data block 9 is corrupted\n SUBSYSTEM=block\n";
        assert_eq!(
            kmsg_message(r),
            "device-mapper: verity: 254:2: data block 9 is corrupted"
        );
        assert_eq!(corrupted_data_block(kmsg_message(r)), Some(9));
        assert_eq!(kmsg_message("no header"), "no header");
    }
}
