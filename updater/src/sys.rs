//! The one system call the updater needs that rustix does not wrap: `sync_file_range(2)`,
//! through the `libc` crate's binding.

use std::os::fd::AsRawFd;

/// Starts writing the dirty pages of `len` bytes at `offset` of `file` to its device, without
/// waiting for them (a later `fsync` still waits for them and reports their errors).
pub fn start_writeback(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    // SAFETY: sync_file_range takes no pointers; the descriptor is open for as long as `file`
    // is borrowed, which outlives the call.
    let r = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Write;

    #[test]
    fn writeback_starts_on_a_written_file_and_refuses_offsets_out_of_range() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        super::start_writeback(&f, 0, 8192).unwrap();
        let err = super::start_writeback(&f, u64::MAX, 1).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }
}
