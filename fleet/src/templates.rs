//! Rendering a unit's templates ([`crate::unit::templates`]) from the cluster's endpoints, and
//! writing the result into the unit's volume: only when the text changes, atomically (a temporary
//! file in the same directory, fsync, rename, fsync of the directory), and never through a
//! symbolic link the container may have put in its volume. No etcd here: the agent's side is
//! `crate::agent::templates`.
//!
//! # The template language and its context
//!
//! Templates are Jinja2 ([`minijinja`]), with undefined names an error (strict), no HTML escaping,
//! `trim_blocks` and `lstrip_blocks` on (a `{% ... %}` line leaves no blank line behind) and the
//! file's final newline kept. The context:
//!
//! - `services.<unit>` for each unit in the template's `services`: its healthy instances, sorted
//!   by id (so the output is the same for the same set, whatever order they registered in), an
//!   empty list when it has none. A unit not named in `services` is undefined. Each instance:
//!   - `id`: unique within its unit (the machine id for one instance per machine);
//!   - `address`: its address on the cluster network (a string, `10.42.1.2`);
//!   - `port`: its first port's number (undefined when it has no ports);
//!   - `ports`: its named ports, name to number (`ports.http`);
//!   - `machine`: the machine that runs it; `revision`: the unit revision it runs.
//!
//! Minijinja's built-in filters and tests are there (`sort(attribute="address")`, `join`,
//! `length`, `default`, `is defined`, ...). A load balancer's backends:
//!
//! ```jinja
//! backend web
//! {% for i in services.web %}
//!     server {{ i.id }} {{ i.address }}:{{ i.ports.http }} check
//! {% endfor %}
//! ```
//!
//! A template is at most [`MAX_SOURCE`] bytes, its output at most [`MAX_OUTPUT`], and its work is
//! bounded ([`FUEL`]): a template that loops without end fails instead of stalling the agent.

use caisson_net::endpoint::{Endpoints, Instance};
use rustix::fs::{AtFlags, Mode, OFlags};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::unit::Template;

/// The largest template source read.
pub const MAX_SOURCE: u64 = 1 << 20;
/// The largest rendered file written.
pub const MAX_OUTPUT: usize = 4 << 20;
/// The end of the temporary file's name beside a file being written (which no `dest` may
/// end with: [`crate::unit::templates::check`]).
pub const TMP_SUFFIX: &str = ".caisson-tmp";
/// Minijinja's fuel for one render: a few million instructions, far above any load balancer's
/// configuration for thousands of backends, and a bound on a loop without end.
pub const FUEL: u64 = 5_000_000;

/// Why a template was not rendered or written (the old file, if any, is left as it was).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The template file cannot be read, is too large, not UTF-8, or resolves (after symbolic
    /// links) outside the provisioned files.
    #[error("template {src}: {message}")]
    Source { src: String, message: String },
    /// It does not parse, or rendering it failed (an undefined name, a filter's error, out of fuel).
    #[error("template {src}: {message}")]
    Render { src: String, message: String },
    /// Its output is larger than [`MAX_OUTPUT`].
    #[error("template {src}: the rendered file is larger than {limit} bytes")]
    TooLarge { src: String, limit: usize },
    /// The rendered file cannot be written into the volume.
    #[error("template {src}: writing {path}: {message}")]
    Write {
        src: String,
        path: String,
        message: String,
    },
}

/// One instance as a template sees it.
#[derive(Serialize)]
struct InstanceView<'a> {
    id: &'a str,
    address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    ports: BTreeMap<&'a str, u16>,
    machine: &'a str,
    revision: i64,
}

impl<'a> InstanceView<'a> {
    fn new(i: &'a Instance) -> InstanceView<'a> {
        InstanceView {
            id: &i.id,
            address: i.address.to_string(),
            port: i.ports.first().map(|p| p.port),
            ports: i
                .ports
                .iter()
                .filter_map(|p| p.name.as_deref().map(|n| (n, p.port)))
                .collect(),
            machine: &i.machine,
            revision: i.revision,
        }
    }
}

/// The context of a template that sees `services` (see the module's doc).
fn context<'a>(
    endpoints: &'a Endpoints,
    services: &'a [String],
) -> BTreeMap<&'static str, BTreeMap<&'a str, Vec<InstanceView<'a>>>> {
    let mut by_unit = BTreeMap::new();
    for s in services {
        let mut list: Vec<&Instance> = endpoints.instances(s).iter().collect();
        list.sort_by(|a, b| (&a.id, a.address).cmp(&(&b.id, b.address)));
        by_unit.insert(
            s.as_str(),
            list.into_iter().map(InstanceView::new).collect::<Vec<_>>(),
        );
    }
    BTreeMap::from([("services", by_unit)])
}

/// A writer into memory that refuses to grow past a limit.
struct Capped {
    out: Vec<u8>,
    over: bool,
}

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > MAX_OUTPUT {
            self.over = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Renders `text` (the template named `name` in errors, its path) with the endpoints of
/// `services`.
pub fn render(
    name: &str,
    text: &str,
    endpoints: &Endpoints,
    services: &[String],
) -> Result<String, TemplateError> {
    let fail = |e: minijinja::Error| TemplateError::Render {
        src: name.to_string(),
        message: describe(&e),
    };
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_fuel(Some(FUEL));
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(true)
        .build()
        .map_err(fail)?;
    env.set_syntax(syntax);
    let template = env.template_from_named_str(name, text).map_err(fail)?;
    let ctx = minijinja::Value::from(minijinja::value::Serde(context(endpoints, services)));
    let mut out = Capped {
        out: Vec::new(),
        over: false,
    };
    let result = template.render_captured_to(ctx, &mut out).map(|_| ());
    if out.over {
        return Err(TemplateError::TooLarge {
            src: name.to_string(),
            limit: MAX_OUTPUT,
        });
    }
    result.map_err(fail)?;
    String::from_utf8(out.out).map_err(|_| TemplateError::Render {
        src: name.to_string(),
        message: "the output is not UTF-8".into(),
    })
}

/// A minijinja error in one line: what, and where (line) when it knows.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.kind().to_string();
    if let Some(d) = e.detail() {
        s = format!("{s}: {d}");
    }
    if let Some(line) = e.line() {
        s = format!("{s} (line {line})");
    }
    s
}

/// Reads a template's source: a provisioned file that, symbolic links followed, is still one
/// a unit may read ([`crate::unit::volumes::check_bind_source`]), at most [`MAX_SOURCE`] bytes.
pub fn read_source(src: &str) -> Result<String, TemplateError> {
    let fail = |message: String| TemplateError::Source {
        src: src.to_string(),
        message,
    };
    let real = std::fs::canonicalize(src).map_err(|e| {
        fail(format!(
            "{e} (provision the template on this machine under /etc/caisson/)"
        ))
    })?;
    let real_text = real.display().to_string();
    crate::unit::volumes::check_bind_source(&real_text)
        .map_err(|why| fail(format!("resolves to {real_text}: {why}")))?;
    let file = std::fs::File::open(&real).map_err(|e| fail(e.to_string()))?;
    let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_SOURCE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(e.to_string()))?;
    if bytes.len() as u64 > MAX_SOURCE {
        return Err(fail(format!("larger than {MAX_SOURCE} bytes")));
    }
    String::from_utf8(bytes).map_err(|_| fail("not UTF-8 text".into()))
}

/// What [`Renderer::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The file already held the rendered text: nothing written.
    Unchanged,
    /// The file was written (new or changed): the unit should reload it.
    Written,
    /// The volume's directory does not exist yet (the container was never started here):
    /// nothing written; a later call writes it.
    NoVolume,
}

/// What a file was when the renderer last wrote or read it: a file changed or replaced since
/// (by the container, by hand) no longer matches and is compared again.
type FileId = (u64, u64, u64, i64, i64);

fn file_id(dir: &OwnedFd, name: &str) -> Option<FileId> {
    let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).ok()?;
    Some((
        st.st_dev as u64,
        st.st_ino as u64,
        st.st_size as u64,
        st.st_mtime as i64,
        st.st_mtime_nsec as i64,
    ))
}

/// Renders templates and writes the files whose text changed; remembers what it last wrote
/// (or found) at each file, so an unchanged render costs no read and no write while the file
/// is as it left it.
#[derive(Debug, Default)]
pub struct Renderer {
    last: HashMap<PathBuf, (String, Option<FileId>)>,
    /// How many files it has written (for tests and logs).
    pub writes: u64,
}

impl Renderer {
    /// Reads `t.src`, renders it with `endpoints` and writes it to `t.dest` in the volume
    /// directory `<volume_root>/<unit>/<t.volume>` when the text differs from the file's. On an
    /// error the file is left as it was.
    pub fn apply(
        &mut self,
        unit: &str,
        t: &Template,
        volume_root: &Path,
        endpoints: &Endpoints,
    ) -> Result<Outcome, TemplateError> {
        let text = read_source(&t.src)?;
        self.apply_text(unit, t, &text, volume_root, endpoints)
    }

    /// [`Renderer::apply`] with the template's source already read.
    pub fn apply_text(
        &mut self,
        unit: &str,
        t: &Template,
        text: &str,
        volume_root: &Path,
        endpoints: &Endpoints,
    ) -> Result<Outcome, TemplateError> {
        let rendered = render(&t.src, text, endpoints, &t.services)?;
        let dir = volume_root.join(unit).join(&t.volume);
        let path = dir.join(&t.dest);
        let write_err = |message: String| TemplateError::Write {
            src: t.src.clone(),
            path: path.display().to_string(),
            message,
        };
        let root = match open_dir(rustix::fs::CWD, &dir) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(Outcome::NoVolume),
            Err(e) => return Err(write_err(format!("opening the volume: {e}"))),
        };
        let (parent, name) = walk(root, &t.dest).map_err(write_err)?;
        let id = file_id(&parent, name);
        let same = |(text, was): &(String, Option<FileId>)| *text == rendered && *was == id;
        if id.is_some() && self.last.get(&path).is_some_and(same) {
            return Ok(Outcome::Unchanged);
        }
        if read_existing(&parent, name).as_deref() == Some(rendered.as_bytes()) {
            self.last.insert(path, (rendered, id));
            return Ok(Outcome::Unchanged);
        }
        write_atomic(&parent, name, rendered.as_bytes()).map_err(write_err)?;
        self.writes += 1;
        let id = file_id(&parent, name);
        self.last.insert(path, (rendered, id));
        Ok(Outcome::Written)
    }

    /// Forgets the files of units this machine no longer runs.
    pub fn retain(&mut self, volume_root: &Path, keep: impl Fn(&str) -> bool) {
        self.last.retain(|p, _| {
            p.strip_prefix(volume_root)
                .ok()
                .and_then(|r| r.components().next())
                .is_some_and(|c| keep(&c.as_os_str().to_string_lossy()))
        });
    }
}

fn open_dir(
    at: impl std::os::fd::AsFd,
    name: impl rustix::path::Arg,
) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        at,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Opens (making them 0755 when missing) the directories of `dest` below `root`, never
/// following a symbolic link: the container can write its volume. The last directory and the
/// file's name.
fn walk(root: OwnedFd, dest: &str) -> Result<(OwnedFd, &str), String> {
    let mut parts: Vec<&str> = dest.split('/').collect();
    let name = parts.pop().unwrap_or(dest);
    let mut dir = root;
    for p in parts {
        dir = match open_dir(&dir, p) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => {
                rustix::fs::mkdirat(&dir, p, Mode::from_raw_mode(0o755))
                    .map_err(|e| format!("making directory {p}: {e}"))?;
                open_dir(&dir, p).map_err(|e| format!("opening directory {p}: {e}"))?
            }
            Err(e) => {
                return Err(format!(
                    "{p} is not a directory (a symbolic link is not followed): {e}"
                ))
            }
        };
    }
    Ok((dir, name))
}

/// The file's content when it is a regular file no larger than [`MAX_OUTPUT`] (never blocking
/// on a FIFO, never following a link).
fn read_existing(dir: &OwnedFd, name: &str) -> Option<Vec<u8>> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > MAX_OUTPUT as u64 {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(MAX_OUTPUT as u64).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// Writes `name` in `dir`: a temporary file beside it (mode 0644), fsync, rename over it,
/// fsync of the directory. A failure removes the temporary file and leaves the old one.
fn write_atomic(dir: &OwnedFd, name: &str, bytes: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = format!(".{name}{TMP_SUFFIX}");
    match rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(format!("removing the old {tmp}: {e}")),
    }
    let write = || -> Result<(), String> {
        let fd = rustix::fs::openat(
            dir,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map_err(|e| format!("creating {tmp}: {e}"))?;
        let mut file = std::fs::File::from(fd);
        file.set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| format!("chmod {tmp}: {e}"))?;
        file.write_all(bytes)
            .map_err(|e| format!("writing {tmp}: {e}"))?;
        file.sync_all().map_err(|e| format!("fsync {tmp}: {e}"))?;
        rustix::fs::renameat(dir, tmp.as_str(), dir, name)
            .map_err(|e| format!("renaming {tmp} to {name}: {e}"))
    };
    if let Err(e) = write() {
        let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
        return Err(e);
    }
    // The new file is in place: a failed directory fsync leaves it there (and owed its reload),
    // so it is logged rather than returned.
    if let Err(e) = rustix::fs::fsync(dir) {
        log::warn!("templates: fsync of the directory of {name}: {e}");
    }
    Ok(())
}

#[cfg(test)]
#[path = "templates_tests.rs"]
mod tests;
