//! Loading the kernel modules named in a list file (paths relative to `/`, one per line, in
//! dependency order, as the builder writes them).

use crate::sys::Syscall;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

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

/// The two stage-2 module lists: `early` (what the machine's own devices need: the network and
/// console drivers, fw_cfg, vfat for the ESP) and `late` (the spec's modules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum List {
    Early,
    Late,
}

/// Which lists have been loaded; whoever needs a module waits for its list.
#[derive(Debug, Clone, Default)]
pub struct Loading(Arc<(Mutex<Option<List>>, Condvar)>);

impl Loading {
    /// A handle on which `list` (and every list before it) is already loaded.
    pub fn loaded(list: List) -> Loading {
        let l = Loading::default();
        l.mark(list);
        l
    }

    /// Loads `lists` (list file paths under `/`, in order) on a thread and returns at once. With
    /// no thread, loads them here.
    pub fn start(sys: Arc<dyn Syscall>, lists: Vec<(List, &'static str)>) -> Loading {
        let l = Loading::default();
        let spawned = {
            let (sys, lists, l) = (sys.clone(), lists.clone(), l.clone());
            std::thread::Builder::new()
                .name("modules".into())
                .spawn(move || l.load(sys.as_ref(), &lists))
        };
        if let Err(e) = spawned {
            log::warn!("no thread for the modules ({e}); loading them now");
            l.load(sys.as_ref(), &lists);
        }
        l
    }

    fn load(&self, sys: &dyn Syscall, lists: &[(List, &'static str)]) {
        for (which, path) in lists {
            load_list(sys, Path::new("/"), path);
            self.mark(*which);
        }
    }

    fn mark(&self, list: List) {
        let (done, cv) = &*self.0;
        let mut d = done.lock().unwrap_or_else(|p| p.into_inner());
        if d.is_none_or(|had| had < list) {
            *d = Some(list);
        }
        cv.notify_all();
    }

    /// True once `list` is loaded.
    pub fn is_loaded(&self, list: List) -> bool {
        let (done, _) = &*self.0;
        let d = done.lock().unwrap_or_else(|p| p.into_inner());
        d.is_some_and(|had| had >= list)
    }

    /// Waits until `list` is loaded.
    pub fn wait(&self, list: List) {
        let (done, cv) = &*self.0;
        let mut d = done.lock().unwrap_or_else(|p| p.into_inner());
        while !d.is_some_and(|had| had >= list) {
            d = cv.wait(d).unwrap_or_else(|p| p.into_inner());
        }
    }
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

    #[test]
    fn waiting_for_a_list_returns_once_it_and_the_ones_before_it_are_loaded() {
        let l = Loading::default();
        assert!(!l.is_loaded(List::Early));
        let waiter = {
            let l = l.clone();
            std::thread::spawn(move || l.wait(List::Late))
        };
        l.mark(List::Early);
        assert!(l.is_loaded(List::Early) && !l.is_loaded(List::Late));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished(), "waits for the late list");
        l.mark(List::Late);
        waiter.join().unwrap();
        assert!(Loading::loaded(List::Late).is_loaded(List::Early));
    }

    #[test]
    fn the_thread_loads_the_lists_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let sys = Arc::new(Recording::new(tmp.path()));
        let l = Loading::start(
            sys.clone(),
            vec![
                (List::Early, "/no-early-list"),
                (List::Late, "/no-late-list"),
            ],
        );
        l.wait(List::Late);
        assert!(l.is_loaded(List::Early));
    }
}
