//! caisson-init: stage 1 when the initramfs marker exists, else stage 2 (PID1 on the root).
//!
//! `no_main`: the standard runtime's start-up aborts the process when stdin, stdout or stderr is
//! closed and `/dev/null` cannot be opened, which is exactly the state of PID1 in an initramfs
//! without `/dev/console`. Stage 1 attaches the console itself once devtmpfs is mounted.
#![no_main]

// With abort, a panic on any of the init's threads ends PID 1 and the kernel panics: the catching
// in `caisson_init::guard` would be dead code. `ci/build` builds this binary with
// CARGO_PROFILE_RELEASE_PANIC=unwind; the workspace's release profile aborts.
#[cfg(panic = "abort")]
compile_error!(
    "caisson-init must be built with panic = \"unwind\" (ci/build sets \
     CARGO_PROFILE_RELEASE_PANIC=unwind for it): with abort, a panic in any of its threads ends \
     PID 1 and panics the kernel (see init/src/guard.rs and init/PANICS.md)"
);

#[no_mangle]
pub extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    caisson_init::boot::entry()
}
