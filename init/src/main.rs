//! caisson-init: stage 1 when the initramfs marker exists, else stage 2 (PID1 on the root).

fn main() {
    if caisson_init::boot::in_initramfs() {
        caisson_init::boot::stage1_main()
    } else {
        caisson_init::stage2::main()
    }
}
