//! Loading the kernel modules named in a list file (paths relative to `/`, one per line, in
//! dependency order, as the builder writes them).

use crate::sys::Syscall;
use std::path::Path;

/// The module paths in a list file's text (blank lines and `#` comments skipped).
pub fn parse_list(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// Load every module of the list at `list` (absolute, taken under `root`). A missing list loads
/// nothing; a module that fails is logged and the rest are still loaded. Returns how many loaded.
pub fn load_list(sys: &dyn Syscall, root: &Path, list: &str) -> usize {
    let list_path = root.join(list.trim_start_matches('/'));
    let text = match std::fs::read_to_string(&list_path) {
        Ok(t) => t,
        Err(e) => {
            log::warn!("no module list {}: {e}", list_path.display());
            return 0;
        }
    };
    let mut loaded = 0;
    for m in parse_list(&text) {
        let path = root.join(m.trim_start_matches('/'));
        match sys.load_module(&path) {
            Ok(()) => {
                log::debug!("loaded {m}");
                loaded += 1;
            }
            Err(e) => log::error!("loading module {m} failed: {e}"),
        }
    }
    log::info!("loaded {loaded} modules from {list}");
    loaded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Call, Recording};

    #[test]
    fn loads_in_order_and_continues_after_a_failure() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("list"),
            "# comment\na.ko\n\nb.ko.zst\n/c.ko\n",
        )
        .unwrap();
        let sys = Recording::new(tmp.path());
        sys.fail_on("b.ko");
        assert_eq!(load_list(&sys, tmp.path(), "/list"), 2);
        assert_eq!(
            sys.calls(),
            [
                Call::LoadModule("/a.ko".into()),
                Call::LoadModule("/b.ko.zst".into()),
                Call::LoadModule("/c.ko".into())
            ]
        );
        assert_eq!(load_list(&sys, tmp.path(), "/missing"), 0);
    }
}
