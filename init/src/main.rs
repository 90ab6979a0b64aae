//! caisson-init: stage 1 when the initramfs marker exists, else stage 2 (PID1 on the root).
//!
//! `no_main`: the standard runtime's start-up aborts the process when stdin, stdout or stderr is
//! closed and `/dev/null` cannot be opened, which is exactly the state of PID1 in an initramfs
//! without `/dev/console`. Stage 1 attaches the console itself once devtmpfs is mounted.
#![no_main]

#[no_mangle]
pub extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    caisson_init::boot::entry()
}
