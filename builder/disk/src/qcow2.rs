//! The qcow2 copy of a raw disk, for QEMU.

use crate::tempout::TempOut;
use crate::tools::{run, Tool};
use crate::DiskError;
use std::path::Path;

/// Converts the raw disk `raw` to qcow2 at `out` (under a temporary name first).
pub fn to_qcow2(raw: &Path, out: &Path) -> Result<(), DiskError> {
    let tmp = TempOut::new(out)?;
    let args = [
        "convert".as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        raw.as_os_str(),
        tmp.path().as_os_str(),
    ];
    run(Tool::QemuImg, raw, args, &[])?;
    tmp.commit()
}
