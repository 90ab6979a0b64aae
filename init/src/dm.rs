//! Device-mapper ioctls (`<linux/dm-ioctl.h>`, interface version 4), just enough to create a
//! read-only `verity` device: `DM_VERSION`, `DM_DEV_CREATE`, `DM_TABLE_LOAD`, `DM_DEV_SUSPEND`
//! (without the suspend flag: resume, which activates the loaded table), and `DM_TABLE_STATUS`
//! to read a target's status (the verity watch, [`crate::verity`]).
//!
//! The ioctl buffer is built as bytes by [`Buffer`], whose layout is unit-tested against the C
//! struct offsets; the only unsafe code is the `ioctl(2)` call itself.

use caisson_layout::verity::{VerityParams, BLOCK_SIZE};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

/// The control node.
pub const CONTROL: &str = "/dev/mapper/control";

/// `sizeof(struct dm_ioctl)`.
pub const DM_IOCTL_SIZE: usize = 312;
/// `sizeof(struct dm_target_spec)`.
pub const TARGET_SPEC_SIZE: usize = 40;
const NAME_LEN: usize = 128;
const UUID_LEN: usize = 129;
const TYPE_NAME_LEN: usize = 16;

const OFF_DATA_SIZE: usize = 12;
const OFF_DATA_START: usize = 16;
const OFF_TARGET_COUNT: usize = 20;
const OFF_FLAGS: usize = 28;
const OFF_DEV: usize = 40;
const OFF_NAME: usize = 48;
const OFF_UUID: usize = OFF_NAME + NAME_LEN;

/// `DM_READONLY_FLAG`.
pub const READONLY_FLAG: u32 = 1 << 0;

/// `DM_BUFFER_FULL_FLAG`: the answer did not fit.
pub const BUFFER_FULL_FLAG: u32 = 1 << 8;

/// The interface version we speak (any 4.x kernel accepts 4.0.0).
const VERSION: [u32; 3] = [4, 0, 0];

/// Command numbers (`DM_*_CMD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Cmd {
    Version = 0,
    DevCreate = 3,
    DevRemove = 4,
    DevSuspend = 6,
    TableLoad = 9,
    TableStatus = 12,
}

impl Cmd {
    /// `_IOWR(0xfd, cmd, struct dm_ioctl)`.
    pub fn request(self) -> u64 {
        const IOC_READ_WRITE: u64 = 3;
        (IOC_READ_WRITE << 30) | ((DM_IOCTL_SIZE as u64) << 16) | (0xfd << 8) | self as u64
    }
}

/// A device-mapper failure.
#[derive(Debug, thiserror::Error)]
pub enum DmError {
    #[error("opening {CONTROL} failed (is dm_mod loaded?): {0}")]
    Control(#[source] std::io::Error),
    #[error("device-mapper {cmd:?} on {name:?} failed: {source}")]
    Ioctl {
        cmd: Cmd,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("device-mapper name {0:?} is empty or longer than 127 bytes")]
    BadName(String),
    #[error("the verity table for {0:?} is too large")]
    TooLarge(String),
    #[error("the status of {0:?} does not fit in the ioctl buffer")]
    StatusTooLarge(String),
}

/// One target's line in a `DM_TABLE_STATUS` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetStatus {
    pub target_type: String,
    pub status: String,
}

/// An ioctl buffer: a `struct dm_ioctl` followed by its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buffer(pub Vec<u8>);

impl Buffer {
    /// A header for device `name` with `flags`, and room for `payload` bytes after it.
    pub fn new(name: &str, flags: u32, payload: &[u8]) -> Result<Self, DmError> {
        if name.is_empty() || name.len() >= NAME_LEN {
            return Err(DmError::BadName(name.to_string()));
        }
        // Leave room for the kernel's answers (DM_VERSION and friends write into the data area).
        let size = (DM_IOCTL_SIZE + payload.len()).max(16 * 1024);
        let mut b = vec![0u8; size];
        for (i, v) in VERSION.iter().enumerate() {
            put_u32(&mut b, i * 4, *v);
        }
        let size32 = u32::try_from(size).map_err(|_| DmError::TooLarge(name.to_string()))?;
        put_u32(&mut b, OFF_DATA_SIZE, size32);
        put_u32(&mut b, OFF_DATA_START, DM_IOCTL_SIZE as u32);
        put_u32(&mut b, OFF_FLAGS, flags);
        b[OFF_NAME..OFF_NAME + name.len()].copy_from_slice(name.as_bytes());
        b[DM_IOCTL_SIZE..DM_IOCTL_SIZE + payload.len()].copy_from_slice(payload);
        Ok(Buffer(b))
    }

    /// A `DM_TABLE_LOAD` buffer with one target.
    pub fn table_load(name: &str, target: &Target) -> Result<Self, DmError> {
        let spec = target.serialize();
        let mut b = Buffer::new(name, READONLY_FLAG, &spec)?;
        put_u32(&mut b.0, OFF_TARGET_COUNT, 1);
        Ok(b)
    }

    /// The `dev` field the kernel filled in.
    pub fn dev(&self) -> u64 {
        u64::from_ne_bytes(self.0[OFF_DEV..OFF_DEV + 8].try_into().unwrap_or([0; 8]))
    }

    /// The device's minor number, decoded from `dev` (the kernel's `huge_encode_dev`).
    pub fn minor(&self) -> u32 {
        let dev = self.dev();
        ((dev & 0xff) | ((dev >> 12) & 0x000f_ff00)) as u32
    }

    /// The targets of a `DM_TABLE_STATUS` answer: `target_count` specs from `data_start`, each
    /// followed by its zero-terminated status; the kernel sets each `next` to the offset of the
    /// following spec from `data_start`. What lies outside the buffer ends the list.
    pub fn target_statuses(&self) -> Vec<TargetStatus> {
        let b = &self.0;
        let start = u32_at(b, OFF_DATA_START) as usize;
        let count = u32_at(b, OFF_TARGET_COUNT);
        let mut out = Vec::new();
        let mut pos = 0usize;
        for _ in 0..count {
            let Some(spec) = start.checked_add(pos) else {
                break;
            };
            let Some(text_at) = spec.checked_add(TARGET_SPEC_SIZE) else {
                break;
            };
            if text_at > b.len() {
                break;
            }
            out.push(TargetStatus {
                target_type: c_str(&b[spec + 24..spec + 24 + TYPE_NAME_LEN]),
                status: c_str(&b[text_at..]),
            });
            let next = u32_at(b, spec + 20) as usize;
            if next <= pos {
                break;
            }
            pos = next;
        }
        out
    }

    /// The flags the kernel answered with.
    pub fn flags(&self) -> u32 {
        u32_at(&self.0, OFF_FLAGS)
    }

    /// The uuid field (zero-terminated); unused, but kept zeroed as the kernel requires.
    pub fn uuid_is_empty(&self) -> bool {
        self.0[OFF_UUID..OFF_UUID + UUID_LEN]
            .iter()
            .all(|&c| c == 0)
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_ne_bytes)
}

/// The text before the first zero byte.
fn c_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

/// One table line: `start length type params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub sector_start: u64,
    pub length: u64,
    pub target_type: String,
    pub params: String,
}

impl Target {
    /// The verity target for `params` with data and hash tree on `device`.
    pub fn verity(device: &str, params: &VerityParams) -> Self {
        Target {
            sector_start: 0,
            length: params.data_blocks * (BLOCK_SIZE / 512),
            target_type: "verity".into(),
            params: params.dm_table_params(device),
        }
    }

    /// `struct dm_target_spec` followed by the zero-terminated parameters, padded to 8 bytes.
    pub fn serialize(&self) -> Vec<u8> {
        let params_len = (self.params.len() + 1).div_ceil(8) * 8;
        let total = TARGET_SPEC_SIZE + params_len;
        let mut b = vec![0u8; total];
        b[0..8].copy_from_slice(&self.sector_start.to_ne_bytes());
        b[8..16].copy_from_slice(&self.length.to_ne_bytes());
        // status (16..20) is output only; next (20..24) is the distance to the next spec.
        put_u32(&mut b, 20, total as u32);
        let t = self.target_type.as_bytes();
        let n = t.len().min(TYPE_NAME_LEN - 1);
        b[24..24 + n].copy_from_slice(&t[..n]);
        b[TARGET_SPEC_SIZE..TARGET_SPEC_SIZE + self.params.len()]
            .copy_from_slice(self.params.as_bytes());
        b
    }
}

fn ioctl(control: &File, cmd: Cmd, name: &str, buf: &mut Buffer) -> Result<(), DmError> {
    // SAFETY: `buf` is a live, writable allocation of `data_size` bytes starting with a valid
    // `struct dm_ioctl` (built by `Buffer::new`); the kernel reads and writes only within
    // `data_size`, which is the buffer's length.
    let r = unsafe { libc::ioctl(control.as_raw_fd(), cmd.request() as _, buf.0.as_mut_ptr()) };
    if r < 0 {
        return Err(DmError::Ioctl {
            cmd,
            name: name.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Create `name` as a read-only verity device over `device`, load its table and activate it.
/// Returns the minor number: the device is `/dev/dm-<minor>`.
pub fn create_verity(name: &str, device: &Path, params: &VerityParams) -> Result<u32, DmError> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open(CONTROL)
        .map_err(DmError::Control)?;
    let mut version = Buffer::new(name, 0, &[])?;
    ioctl(&control, Cmd::Version, name, &mut version)?;
    let mut create = Buffer::new(name, READONLY_FLAG, &[])?;
    ioctl(&control, Cmd::DevCreate, name, &mut create)?;
    let target = Target::verity(&device.to_string_lossy(), params);
    let mut load = Buffer::table_load(name, &target)?;
    if let Err(e) = ioctl(&control, Cmd::TableLoad, name, &mut load) {
        let mut remove = Buffer::new(name, 0, &[])?;
        let _ = ioctl(&control, Cmd::DevRemove, name, &mut remove);
        return Err(e);
    }
    let mut resume = Buffer::new(name, READONLY_FLAG, &[])?;
    ioctl(&control, Cmd::DevSuspend, name, &mut resume)?;
    Ok(resume.minor().max(create.minor()))
}

/// The control node, open: for a thread that asks for a device's status again and again.
pub struct Control(File);

impl Control {
    pub fn open() -> Result<Control, DmError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTROL)
            .map(Control)
            .map_err(DmError::Control)
    }

    /// The status of every target of the live table of `name` (`DM_TABLE_STATUS`, `STATUSTYPE_INFO`).
    pub fn status(&self, name: &str) -> Result<Vec<TargetStatus>, DmError> {
        let mut buf = Buffer::new(name, 0, &[])?;
        ioctl(&self.0, Cmd::TableStatus, name, &mut buf)?;
        if buf.flags() & BUFFER_FULL_FLAG != 0 {
            return Err(DmError::StatusTooLarge(name.to_string()));
        }
        Ok(buf.target_statuses())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_header() {
        // _IOWR(0xfd, 0, struct dm_ioctl) with sizeof == 312 (0x138).
        assert_eq!(Cmd::Version.request(), 0xc138_fd00);
        assert_eq!(Cmd::DevCreate.request(), 0xc138_fd03);
        assert_eq!(Cmd::DevSuspend.request(), 0xc138_fd06);
        assert_eq!(Cmd::TableLoad.request(), 0xc138_fd09);
    }

    #[test]
    fn header_layout() {
        let b = Buffer::new("caisson-root", READONLY_FLAG, &[]).unwrap();
        assert_eq!(&b.0[0..12], &[4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(u32_at(&b.0, OFF_DATA_SIZE) as usize, b.0.len());
        assert_eq!(u32_at(&b.0, OFF_DATA_START), 312);
        assert_eq!(u32_at(&b.0, OFF_FLAGS), 1);
        assert_eq!(&b.0[48..60], b"caisson-root");
        assert_eq!(b.0[60], 0);
        assert!(b.uuid_is_empty());
        assert_eq!(OFF_UUID + UUID_LEN + 7, DM_IOCTL_SIZE);
        assert!(Buffer::new("", 0, &[]).is_err());
        assert!(Buffer::new(&"x".repeat(128), 0, &[]).is_err());
    }

    #[test]
    fn table_load_layout() {
        let p = VerityParams {
            root_hash: [0xab; 32],
            salt: [0xcd; 32],
            data_blocks: 10,
            hash_offset: 40960,
        };
        let t = Target::verity("/dev/vda2", &p);
        assert_eq!(t.length, 80);
        let b = Buffer::table_load("caisson-root", &t).unwrap();
        assert_eq!(u32_at(&b.0, OFF_TARGET_COUNT), 1);
        assert_eq!(u32_at(&b.0, OFF_FLAGS), READONLY_FLAG);
        let spec = &b.0[DM_IOCTL_SIZE..];
        assert_eq!(u64::from_ne_bytes(spec[0..8].try_into().unwrap()), 0);
        assert_eq!(u64::from_ne_bytes(spec[8..16].try_into().unwrap()), 80);
        let next = u32_at(spec, 20) as usize;
        assert_eq!(next % 8, 0);
        assert_eq!(&spec[24..31], b"verity\0");
        let params = &spec[TARGET_SPEC_SIZE..next];
        let text = std::str::from_utf8(params).unwrap().trim_end_matches('\0');
        assert_eq!(
            text,
            format!(
                "1 /dev/vda2 /dev/vda2 4096 4096 10 11 sha256 {} {}",
                "ab".repeat(32),
                "cd".repeat(32)
            )
        );
        assert_eq!(params[params.len() - 1], 0);
    }

    #[test]
    fn table_status_answers_are_read_by_next_from_data_start() {
        assert_eq!(Cmd::TableStatus.request(), 0xc138_fd0c);
        let mut b = Buffer::new("caisson-root", 0, &[]).unwrap();
        // What the kernel writes: two specs, each followed by its status, padded to 8 bytes.
        let mut put_spec = |at: usize, ty: &str, status: &str, next: u32| {
            let spec = DM_IOCTL_SIZE + at;
            b.0[spec + 20..spec + 24].copy_from_slice(&next.to_ne_bytes());
            b.0[spec + 24..spec + 24 + ty.len()].copy_from_slice(ty.as_bytes());
            let text = spec + TARGET_SPEC_SIZE;
            b.0[text..text + status.len()].copy_from_slice(status.as_bytes());
        };
        put_spec(0, "verity", "V", 48);
        put_spec(48, "linear", "", 96);
        put_u32(&mut b.0, OFF_TARGET_COUNT, 2);
        let got = b.target_statuses();
        assert_eq!(
            got,
            [
                TargetStatus {
                    target_type: "verity".into(),
                    status: "V".into()
                },
                TargetStatus {
                    target_type: "linear".into(),
                    status: String::new()
                }
            ]
        );
        // A count beyond what the buffer holds stops at its end, never past it.
        put_u32(&mut b.0, OFF_TARGET_COUNT, 1000);
        let n = b.target_statuses().len();
        assert!((2..1000).contains(&n), "{n}");
        let empty = Buffer::new("x", 0, &[]).unwrap();
        assert!(empty.target_statuses().is_empty());
    }

    #[test]
    fn minor_decoding() {
        let mut b = Buffer::new("x", 0, &[]).unwrap();
        // major 253, minor 3 encoded as huge_encode_dev does.
        let dev: u64 = 3 | (253 << 8);
        b.0[OFF_DEV..OFF_DEV + 8].copy_from_slice(&dev.to_ne_bytes());
        assert_eq!(b.minor(), 3);
        let dev: u64 = (300 & 0xff) | (253 << 8) | ((300 & !0xff) << 12);
        b.0[OFF_DEV..OFF_DEV + 8].copy_from_slice(&dev.to_ne_bytes());
        assert_eq!(b.minor(), 300);
    }
}
