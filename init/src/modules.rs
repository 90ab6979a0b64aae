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

/// The stage-2 module lists, in the order they load: `Sources` (what the machine-config search
/// needs from the kernel: fw_cfg), `Early` (the machine's own devices: vfat for the ESP, the
/// network and console drivers) and `Late` (the spec's modules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum List {
    Sources,
    Early,
    Late,
}

/// Which lists have been loaded; whoever needs a module waits for its list. The loading may be
/// prepared and begun later. One thread loads the lists in order, but no further than the last
/// list asked for: `begin` asks for all of them, `wait` for the one it waits for. So a boot that
/// needs only the first list before its services start does not load the others beside them,
/// and no waiter can wait for a thread that was never started.
#[derive(Clone, Default)]
pub struct Loading(Arc<(Mutex<State>, Condvar)>);

#[derive(Default)]
struct State {
    loaded: Option<List>,
    /// The last list the thread may load.
    wanted: Option<List>,
    pending: Option<Pending>,
}

/// What a prepared loading will load, once begun.
struct Pending {
    sys: Arc<dyn Syscall>,
    lists: Vec<(List, &'static str)>,
}

impl std::fmt::Debug for Loading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state();
        f.debug_struct("Loading")
            .field("loaded", &state.loaded)
            .field("wanted", &state.wanted)
            .field("begun", &state.pending.is_none())
            .finish()
    }
}

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
        let l = Loading::prepare(sys, lists);
        l.begin();
        l
    }

    /// Like `start`, but nothing loads before `begin` or the first `wait`.
    pub fn prepare(sys: Arc<dyn Syscall>, lists: Vec<(List, &'static str)>) -> Loading {
        let l = Loading::default();
        l.state().pending = Some(Pending { sys, lists });
        l
    }

    /// Lets every list load, starting the thread if it has not started yet.
    pub fn begin(&self) {
        self.want(List::Late);
    }

    /// Lets the lists up to `list` load, starting the thread if it has not started yet.
    fn want(&self, list: List) {
        let pending = {
            let mut d = self.state();
            if d.wanted.is_none_or(|had| had < list) {
                d.wanted = Some(list);
                self.0 .1.notify_all();
            }
            d.pending.take()
        };
        let Some(Pending { sys, lists }) = pending else {
            return;
        };
        let spawned = {
            let (sys, lists, l) = (sys.clone(), lists.clone(), self.clone());
            std::thread::Builder::new()
                .name("modules".into())
                .spawn(move || l.load(sys.as_ref(), &lists))
        };
        if let Err(e) = spawned {
            log::warn!("no thread for the modules ({e}); loading them now");
            self.want(List::Late);
            self.load(sys.as_ref(), &lists);
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0 .0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn load(&self, sys: &dyn Syscall, lists: &[(List, &'static str)]) {
        for (which, path) in lists {
            {
                let cv = &self.0 .1;
                let mut d = self.state();
                // This list is wanted, or a list asked for is not loaded yet (it may be
                // missing from `lists`: then the next one stands for it).
                while !d
                    .wanted
                    .is_some_and(|w| w >= *which || d.loaded.is_none_or(|had| had < w))
                {
                    d = cv.wait(d).unwrap_or_else(|p| p.into_inner());
                }
            }
            load_list(sys, Path::new("/"), path);
            self.mark(*which);
        }
    }

    fn mark(&self, list: List) {
        let mut d = self.state();
        if d.loaded.is_none_or(|had| had < list) {
            d.loaded = Some(list);
        }
        self.0 .1.notify_all();
    }

    /// True once `list` is loaded.
    pub fn is_loaded(&self, list: List) -> bool {
        self.state().loaded.is_some_and(|had| had >= list)
    }

    /// Waits until `list` is loaded, letting it (and the lists before it) load first.
    pub fn wait(&self, list: List) {
        self.want(list);
        let cv = &self.0 .1;
        let mut d = self.state();
        while d.loaded.is_none_or(|had| had < list) {
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

    #[test]
    fn a_prepared_loading_starts_on_begin_or_on_the_first_wait() {
        let tmp = tempfile::tempdir().unwrap();
        let sys = Arc::new(Recording::new(tmp.path()));
        let lists = || {
            vec![
                (List::Early, "/no-early-list"),
                (List::Late, "/no-late-list"),
            ]
        };
        let l = Loading::prepare(sys.clone(), lists());
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!l.is_loaded(List::Early), "nothing loads before it begins");
        l.wait(List::Late);
        assert!(l.is_loaded(List::Early));

        let l = Loading::prepare(sys, lists());
        l.begin();
        l.begin();
        let started = std::time::Instant::now();
        while !l.is_loaded(List::Late) {
            assert!(started.elapsed().as_secs() < 10, "begin starts the loading");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(format!("{l:?}").contains("begun: true"));
    }

    #[test]
    fn a_wait_for_the_first_list_loads_no_further_until_more_is_asked_for() {
        let tmp = tempfile::tempdir().unwrap();
        let sys = Arc::new(Recording::new(tmp.path()));
        let l = Loading::prepare(
            sys.clone(),
            vec![
                (List::Sources, "/no-sources-list"),
                (List::Early, "/no-early-list"),
                (List::Late, "/no-late-list"),
            ],
        );
        l.wait(List::Sources);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !l.is_loaded(List::Early),
            "only what was asked for loads: {l:?}"
        );
        l.begin();
        l.wait(List::Late);

        // A list asked for but not given: the next one stands for it, and no more.
        let l = Loading::prepare(
            sys,
            vec![
                (List::Early, "/no-early-list"),
                (List::Late, "/no-late-list"),
            ],
        );
        l.wait(List::Sources);
        assert!(l.is_loaded(List::Early));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!l.is_loaded(List::Late), "{l:?}");
    }
}
