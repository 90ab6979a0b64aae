//! The agent's side of templates ([`crate::unit::templates`], rendered by [`crate::templates`]):
//! each tick, every template of every unit this machine runs is rendered from the current
//! endpoints; a file whose text changed is written into the unit's volume and the template's
//! `reload` command is run in the unit's running container.
//!
//! - A template that does not render (it cannot be read, does not parse, names something
//!   undefined, writes too much) leaves the old file in place; its error is returned for the
//!   unit's status and logged once per distinct error (and once when it renders again).
//! - A reload that fails (the exec fails or exits non-zero) is shown the same way and tried again
//!   on the next tick until it succeeds: the file on disk already changed. A unit whose container
//!   is not running owes no reload (it reads the file when it starts).
//! - A volume that does not exist yet (the unit's container was never created here) is skipped
//!   until it does; the first render after the container started then reloads it.
//! - Reloads run one after another within the tick, each bounded by [`Templates::reload_timeout`].

use crate::agent::{ContainerState, Runtime};
use crate::store::UnitStatus;
use crate::templates::{Outcome, Renderer, TemplateError};
use crate::unit::UnitSpec;
use caisson_net::endpoint::Endpoints;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

/// How long a reload command may run by default.
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The templates' state between ticks.
#[derive(Debug)]
pub struct Templates {
    /// Where the units' volumes are (`Config::volume_root`, the runtime's).
    pub volume_root: PathBuf,
    /// How long one reload command may run before it is killed.
    pub reload_timeout: Duration,
    pub renderer: Renderer,
    /// The last error of each (unit, what): logged when it changes.
    errors: BTreeMap<(String, String), String>,
    /// Reloads owed, as (unit, argv).
    pending: BTreeSet<(String, Vec<String>)>,
    /// Reads a template's source ([`crate::templates::read_source`]; tests give text).
    read: fn(&str) -> Result<String, TemplateError>,
}

impl Templates {
    pub fn new(volume_root: impl Into<PathBuf>) -> Templates {
        Templates {
            volume_root: volume_root.into(),
            reload_timeout: RELOAD_TIMEOUT,
            renderer: Renderer::default(),
            errors: BTreeMap::new(),
            pending: BTreeSet::new(),
            read: crate::templates::read_source,
        }
    }

    /// The call the agent's tick makes after reconciling: [`Templates::sync`], and each unit's
    /// errors written into its status (`error`, after any error it already has).
    pub async fn update<R: Runtime>(
        &mut self,
        desired: &BTreeMap<String, UnitSpec>,
        endpoints: &Endpoints,
        runtime: &R,
        statuses: &mut BTreeMap<String, UnitStatus>,
    ) {
        for (unit, e) in self.sync(desired, endpoints, runtime).await {
            if let Some(st) = statuses.get_mut(&unit) {
                st.error = Some(match st.error.take() {
                    Some(old) => format!("{old}; {e}"),
                    None => e,
                });
            }
        }
    }

    /// Renders the templates of the units in `desired` (this machine's), writes the changed
    /// files, runs the owed reloads in running containers. Each unit's errors, joined by `; `
    /// (units without an error are absent).
    pub async fn sync<R: Runtime>(
        &mut self,
        desired: &BTreeMap<String, UnitSpec>,
        endpoints: &Endpoints,
        runtime: &R,
    ) -> BTreeMap<String, String> {
        self.forget(desired);
        let mut now: BTreeMap<(String, String), String> = BTreeMap::new();
        for spec in desired.values().filter(|s| !s.templates.is_empty()) {
            self.render_unit(spec, endpoints, &mut now);
        }
        if !self.pending.is_empty() {
            self.reload(runtime, &mut now).await;
        }
        self.report(now)
    }

    /// Drops the state of units no longer wanted here.
    fn forget(&mut self, desired: &BTreeMap<String, UnitSpec>) {
        let wanted = |u: &str| desired.get(u).is_some_and(|s| !s.templates.is_empty());
        self.renderer.retain(&self.volume_root, wanted);
        self.pending.retain(|(u, _)| wanted(u));
        self.errors.retain(|(u, _), _| wanted(u));
    }

    fn render_unit(
        &mut self,
        spec: &UnitSpec,
        endpoints: &Endpoints,
        errors: &mut BTreeMap<(String, String), String>,
    ) {
        for (i, t) in spec.templates.iter().enumerate() {
            let applied = (self.read)(&t.src).and_then(|text| {
                self.renderer
                    .apply_text(&spec.name, t, &text, &self.volume_root, endpoints)
            });
            match applied {
                Ok(Outcome::Written) => {
                    log::info!(
                        "unit {}: rendered {} into {} of volume {}",
                        spec.name,
                        t.src,
                        t.dest,
                        t.volume
                    );
                    if let Some(argv) = &t.reload {
                        self.pending.insert((spec.name.clone(), argv.clone()));
                    }
                }
                Ok(Outcome::Unchanged | Outcome::NoVolume) => {}
                Err(e) => {
                    errors.insert(
                        (spec.name.clone(), format!("templates[{i}]")),
                        format!("templates[{i}]: {e}"),
                    );
                }
            }
        }
    }

    /// Runs the owed reloads of running units; a unit that is not running owes none.
    async fn reload<R: Runtime>(
        &mut self,
        runtime: &R,
        errors: &mut BTreeMap<(String, String), String>,
    ) {
        let running: BTreeSet<String> = match runtime.list().await {
            Ok(list) => list
                .into_iter()
                .filter(|c| c.state == ContainerState::Running)
                .map(|c| c.unit)
                .collect(),
            Err(e) => {
                log::debug!("templates: listing containers before reloads: {e}");
                return;
            }
        };
        self.pending.retain(|(u, _)| running.contains(u));
        for (unit, argv) in self.pending.clone() {
            let result = runtime.exec(&unit, &argv, self.reload_timeout).await;
            let why = match result {
                Ok(0) => {
                    log::info!("unit {unit}: reloaded ({})", argv.join(" "));
                    self.pending.remove(&(unit, argv));
                    continue;
                }
                Ok(code) => format!("exited with {code}"),
                Err(e) => e.to_string(),
            };
            let label = format!("reload {}", argv.join(" "));
            errors.insert((unit, label.clone()), format!("template {label}: {why}"));
        }
    }

    /// Logs the errors that are new or changed, and the ones gone; each unit's errors.
    fn report(&mut self, now: BTreeMap<(String, String), String>) -> BTreeMap<String, String> {
        for ((unit, what), e) in &now {
            let key = (unit.clone(), what.clone());
            if self.errors.get(&key) != Some(e) {
                log::warn!("unit {unit}: {e}");
            }
        }
        for (unit, what) in self.errors.keys() {
            if !now.contains_key(&(unit.clone(), what.clone())) {
                log::info!("unit {unit}: {what} works again");
            }
        }
        let mut out: BTreeMap<String, String> = BTreeMap::new();
        for ((unit, _), e) in &now {
            out.entry(unit.clone())
                .and_modify(|all| {
                    all.push_str("; ");
                    all.push_str(e);
                })
                .or_insert_with(|| e.clone());
        }
        self.errors = now;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::FakeRuntime;
    use caisson_net::endpoint::{Instance, Port, Proto};
    use std::net::Ipv4Addr;

    /// A unit `lb` with one template; its source is missing unless a test gives the text
    /// ([`Templates::read`]), so the tests need nothing under /etc.
    fn lb(reload: bool) -> UnitSpec {
        let reload = if reload {
            "reload = [\"/bin/sh\", \"-c\", \"kill -HUP 1\"]\n"
        } else {
            ""
        };
        UnitSpec::parse(
            "lb",
            &format!(
                "volumes = [{{ name = \"conf\", path = \"/conf\" }}]\n[image]\npath = \"/a.tar\"\n\
                 [[templates]]\nsrc = \"/etc/caisson/units/lb/no-such-file.tmpl\"\n\
                 dest = \"lb.cfg\"\nvolume = \"conf\"\nservices = [\"web\"]\n{reload}"
            ),
        )
        .unwrap()
    }

    fn endpoints(n: u8) -> Endpoints {
        let mut e = Endpoints::default();
        for i in 1..=n {
            e.insert(
                "web",
                Instance {
                    id: format!("m{i}"),
                    address: Ipv4Addr::new(10, 42, i, 2),
                    ports: vec![Port {
                        name: Some("http".into()),
                        port: 80,
                        proto: Proto::Tcp,
                    }],
                    machine: format!("m{i}"),
                    revision: 1,
                },
            );
        }
        e
    }

    #[tokio::test]
    async fn a_missing_template_is_an_error_of_its_unit_logged_and_reported() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("lb/conf")).unwrap();
        let rt = FakeRuntime::default();
        let desired = BTreeMap::from([("lb".to_string(), lb(true))]);
        let mut t = Templates::new(root.path());
        let mut statuses = BTreeMap::from([(
            "lb".to_string(),
            UnitStatus {
                state: "running".into(),
                exit_code: None,
                error: None,
                restarts: 0,
                since: 0,
                health_error: None,
            },
        )]);
        t.update(&desired, &endpoints(1), &rt, &mut statuses).await;
        let e = statuses["lb"].error.clone().unwrap();
        assert!(
            e.starts_with("templates[0]: template /etc/caisson/units/lb/no-such-file.tmpl")
                && e.contains("provision"),
            "{e}"
        );
        assert!(rt.execs.lock().unwrap().is_empty());
        assert!(!root.path().join("lb/conf/lb.cfg").exists());
        // The unit goes: its errors go with it.
        let errors = t.sync(&BTreeMap::new(), &endpoints(1), &rt).await;
        assert!(errors.is_empty() && t.errors.is_empty());
    }

    fn fixed(_: &str) -> Result<String, TemplateError> {
        Ok("{% for i in services.web %}{{ i.address }}:{{ i.ports.http }}\n{% endfor %}".into())
    }

    #[tokio::test]
    async fn reloads_run_in_running_containers_and_are_retried_until_they_succeed() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("lb/conf/lb.cfg");
        let rt = FakeRuntime::default();
        let desired = BTreeMap::from([("lb".to_string(), lb(true))]);
        let mut t = Templates::new(root.path());
        t.read = fixed;
        // No volume yet (never started here): nothing written, no error.
        assert!(t.sync(&desired, &endpoints(1), &rt).await.is_empty());
        assert!(!file.exists());
        rt.start(&desired["lb"], "h").await.unwrap();
        std::fs::create_dir_all(root.path().join("lb/conf")).unwrap();
        // Written; the reload's exec fails (the fake has no exit code for it): shown, owed.
        let e = t.sync(&desired, &endpoints(1), &rt).await;
        assert!(
            e["lb"].contains("template reload /bin/sh -c kill -HUP 1"),
            "{e:?}"
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "10.42.1.2:80\n");
        assert_eq!(t.renderer.writes, 1);
        rt.set_exec("lb", 1);
        let e = t.sync(&desired, &endpoints(1), &rt).await;
        assert!(e["lb"].contains("exited with 1"), "{e:?}");
        rt.set_exec("lb", 0);
        assert!(t.sync(&desired, &endpoints(1), &rt).await.is_empty());
        assert_eq!(rt.execs.lock().unwrap().len(), 3);
        // Same endpoints: nothing written, nothing run.
        assert!(t.sync(&desired, &endpoints(1), &rt).await.is_empty());
        assert_eq!((t.renderer.writes, rt.execs.lock().unwrap().len()), (1, 3));
        // Another instance: written and reloaded once.
        assert!(t.sync(&desired, &endpoints(2), &rt).await.is_empty());
        assert_eq!((t.renderer.writes, rt.execs.lock().unwrap().len()), (2, 4));
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "10.42.1.2:80\n10.42.2.2:80\n"
        );
        // A stopped container owes no reload; it reads the file when it starts.
        rt.exit("lb", 0);
        assert!(t.sync(&desired, &endpoints(3), &rt).await.is_empty());
        assert_eq!((t.renderer.writes, rt.execs.lock().unwrap().len()), (3, 4));
        // Without a reload command, nothing runs.
        let quiet = BTreeMap::from([("lb".to_string(), lb(false))]);
        rt.restart("lb").await.unwrap();
        assert!(t.sync(&quiet, &endpoints(1), &rt).await.is_empty());
        assert_eq!((t.renderer.writes, rt.execs.lock().unwrap().len()), (4, 4));
    }
}
