//! Well-known paths: in the root, in the initramfs and on the ESP.

use crate::Slot;

/// Where the ESP is mounted on a running machine.
pub const ESP_MOUNT: &str = "/efi";
/// Service definitions shipped in the image.
pub const IMAGE_SERVICES_DIR: &str = "/usr/lib/caisson/services";
/// Service definitions provisioned on the machine.
pub const ETC_SERVICES_DIR: &str = "/etc/caisson/services";
/// The init's control socket.
pub const CONTROL_SOCKET: &str = "/run/caisson/init.sock";
/// Written when every required service is ready.
pub const READY_FILE: &str = "/run/caisson/ready";
/// Written by the updater (strategy `etcd-lock`) with the version waiting in the other slot; the
/// fleet agent takes the fleet's reboot lock, then asks the init to reboot.
pub const REBOOT_NEEDED: &str = "/run/caisson/reboot-needed";
/// Written by the updater once this boot has settled: the booted entry is blessed (a pending
/// update's success recorded), or the boot loader fell back and the rollback was recorded. One
/// line, `blessed <version>` or `rolled-back <from> <running>`. The fleet agent gives back the
/// slot of the fleet's reboot lock it took before the reboot only once this file exists; /run
/// is empty again after each reboot.
pub const BOOT_SETTLED: &str = "/run/caisson/boot-settled";
/// Written by the init when the running root fails dm-verity verification
/// ([`crate::corruption::VerityFailure`]): the updater copies no chunk from that slot.
pub const VERITY_FAILED: &str = "/run/caisson/verity-failed";
/// Per-service log files.
pub const LOG_DIR: &str = "/var/log/caisson";
/// The software bill of materials in the root.
pub const SBOM: &str = "/usr/lib/caisson/sbom.json";
/// Public keys that may sign update manifests.
pub const UPDATE_KEYS_DIR: &str = "/usr/lib/caisson/update-keys";
/// The name of the virtio-serial port that carries the control socket to the host.
pub const VIRTIO_CONTROL_PORT: &str = "org.caisson.ctl";

/// Marks the initramfs: stage 1 runs when this file exists.
pub const INITRD_MARKER: &str = "/etc/initrd-release";
/// Ordered list of module files (relative to `/`) that stage 1 loads, one per line.
pub const INITRD_MODULES_LIST: &str = "/etc/caisson/initrd-modules";
/// Ordered list of module files (relative to `/`, one per line) that stage 2 loads first from the
/// root: what finding the machine config needs from the kernel (fw_cfg).
pub const ROOT_MODULES_SOURCES_LIST: &str = "/usr/lib/caisson/modules.sources";
/// Ordered list of module files that stage 2 loads next: the machine's own devices (vfat for the
/// ESP, the network and console drivers).
pub const ROOT_MODULES_LIST: &str = "/usr/lib/caisson/modules";
/// Ordered list of module files that stage 2 loads on a thread while services start: the
/// spec's `kernel.modules` (bridge, netfilter...), which no service needs in its first moments.
pub const ROOT_MODULES_LATE_LIST: &str = "/usr/lib/caisson/modules.late";
/// Where stage 1 mounts the verified root.
pub const SYSROOT: &str = "/sysroot";
/// The name of the dm-verity device stage 1 creates.
pub const VERITY_DM_NAME: &str = "caisson-root";

/// On `state` (mounted at /var): the upper and work directories of the /etc overlay.
pub const STATE_ETC_UPPER: &str = "lib/caisson/etc/upper";
pub const STATE_ETC_WORK: &str = "lib/caisson/etc/work";
/// On `state`: the machine id, created on first boot.
pub const STATE_MACHINE_ID: &str = "lib/caisson/machine-id";
/// On `state`: written once the partition has been grown to the end of the disk.
pub const STATE_GROWN_MARKER: &str = "lib/caisson/state-grown";

/// On the ESP: the default EFI binary (systemd-boot).
pub const ESP_BOOT_EFI: &str = "EFI/BOOT/BOOTX64.EFI";
/// On the ESP: systemd-boot's configuration.
pub const ESP_LOADER_CONF: &str = "loader/loader.conf";
/// On the ESP: the directory of boot entries.
pub const ESP_ENTRIES_DIR: &str = "loader/entries";

/// On the ESP: the directory holding a version's kernel and initramfs for one slot.
pub fn esp_payload_dir(version: &str, slot: Slot) -> String {
    format!("caisson/{version}-{slot}")
}

/// On the ESP: the kernel of a version in a slot.
pub fn esp_kernel(version: &str, slot: Slot) -> String {
    format!("{}/vmlinuz", esp_payload_dir(version, slot))
}

/// On the ESP: the initramfs of a version in a slot.
pub fn esp_initrd(version: &str, slot: Slot) -> String {
    format!("{}/initrd", esp_payload_dir(version, slot))
}
