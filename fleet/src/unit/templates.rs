//! Config files the agent renders from the cluster's endpoints, as confd does: a template
//! provisioned under `/etc/caisson/` becomes a file in one of the unit's volumes, rewritten when
//! the rendered text changes, and then the unit is told (a command run in its container).
//!
//! ```toml
//! volumes = [{ name = "conf", path = "/usr/local/etc/haproxy" }]
//!
//! [[templates]]
//! src = "/etc/caisson/units/lb/haproxy.cfg.tmpl"   # provisioned, under /etc/caisson/ (as binds)
//! dest = "haproxy.cfg"                             # relative, inside the volume
//! volume = "conf"                                  # one of the unit's volumes
//! services = ["web"]                               # the units whose endpoints it sees
//! reload = ["/bin/sh", "-c", "kill -HUP 1"]        # optional: run in the container after a change
//! ```
//!
//! The file is written into the volume's directory on the machine, so it is there (and the same)
//! across container restarts and replacement; the template language and its context are in
//! `crate::templates`. `src` follows the bind rules ([`super::volumes::check_bind_source`]): a
//! template could otherwise copy the machine's own credentials into a container.

use serde::{Deserialize, Serialize};

/// The most templates one unit may carry.
pub const MAX_TEMPLATES: usize = 64;

/// One rendered file of a unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// The template, a provisioned file under [`super::volumes::BIND_ROOT`] (normalised).
    pub src: String,
    /// Where it is written, relative to the volume's directory (normalised, no `..`).
    pub dest: String,
    /// The unit's volume it is written into.
    pub volume: String,
    /// The units whose healthy instances the template sees (`services.<name>`).
    pub services: Vec<String>,
    /// Run in the unit's container after the file changed (none: the unit rereads it itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<Vec<String>>,
}

/// A field's error: the field and why.
type FieldError = (String, String);

/// `dest` without `.` components and repeated slashes; an error when it is empty, absolute,
/// has a `..` component, a NUL byte or names a directory.
pub fn normalise_dest(dest: &str) -> Result<String, String> {
    if dest.starts_with('/') {
        return Err(format!(
            "{dest:?} is absolute: give a path relative to the volume, e.g. \"haproxy.cfg\""
        ));
    }
    if dest.contains('\0') {
        return Err(format!("{dest:?} contains a NUL byte"));
    }
    if dest.ends_with('/') {
        return Err(format!("{dest:?} names a directory, not a file"));
    }
    let mut parts = Vec::new();
    for part in dest.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("{dest:?} has a `..` component")),
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(format!("{dest:?} names no file"));
    }
    if dest.ends_with(crate::templates::TMP_SUFFIX) {
        return Err(format!(
            "{dest:?} ends with {}, which the agent's temporary files do",
            crate::templates::TMP_SUFFIX
        ));
    }
    Ok(parts.join("/"))
}

/// Checks a unit's templates against its (checked) volumes: returns them normalised.
pub fn check(
    volumes: &[super::Volume],
    templates: &[Template],
) -> Result<Vec<Template>, FieldError> {
    if templates.len() > MAX_TEMPLATES {
        return Err((
            "templates".into(),
            format!("{} templates, more than {MAX_TEMPLATES}", templates.len()),
        ));
    }
    let mut out: Vec<Template> = Vec::new();
    for (i, t) in templates.iter().enumerate() {
        let f = |name: &str| format!("templates[{i}].{name}");
        let src = super::volumes::check_bind_source(&t.src).map_err(|m| (f("src"), m))?;
        let dest = normalise_dest(&t.dest).map_err(|m| (f("dest"), m))?;
        if !volumes.iter().any(|v| v.name == t.volume) {
            let names: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
            let why = if names.is_empty() {
                "the unit has no volumes: add one to `volumes` to write the file into".to_string()
            } else {
                format!("not one of the unit's volumes ({})", names.join(", "))
            };
            return Err((f("volume"), format!("{:?}: {why}", t.volume)));
        }
        if let Some(j) = out
            .iter()
            .position(|o| o.volume == t.volume && o.dest == dest)
        {
            return Err((
                f("dest"),
                format!(
                    "{dest} in volume {} is already written by templates[{j}]",
                    t.volume
                ),
            ));
        }
        if t.services.is_empty() {
            return Err((
                f("services"),
                "name at least one unit whose endpoints the template renders".into(),
            ));
        }
        for (k, s) in t.services.iter().enumerate() {
            if !super::valid_name(s) {
                return Err((
                    format!("templates[{i}].services[{k}]"),
                    format!("{s:?} is not a unit name"),
                ));
            }
            if t.services[..k].contains(s) {
                return Err((
                    format!("templates[{i}].services[{k}]"),
                    format!("{s} is listed twice"),
                ));
            }
        }
        if let Some(r) = &t.reload {
            if r.first().is_none_or(|p| p.is_empty()) {
                return Err((
                    f("reload"),
                    "the program (first word) is empty; leave reload out to run nothing".into(),
                ));
            }
        }
        out.push(Template {
            src,
            dest,
            volume: t.volume.clone(),
            services: t.services.clone(),
            reload: t.reload.clone(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use crate::unit::UnitSpec;

    const VOL: &str = "volumes = [{ name = \"conf\", path = \"/conf\" }]\n";
    const IMG: &str = "[image]\npath = \"/a.tar\"\n";

    fn parse(body: &str) -> Result<UnitSpec, String> {
        UnitSpec::parse("lb", &format!("{VOL}{IMG}{body}")).map_err(|e| e.to_string())
    }

    const GOOD: &str = "[[templates]]\nsrc = \"/etc/caisson//units/lb/./h.tmpl\"\n\
        dest = \"./etc//haproxy.cfg\"\nvolume = \"conf\"\nservices = [\"web\", \"api\"]\n\
        reload = [\"/bin/sh\", \"-c\", \"kill -HUP 1\"]\n";

    #[test]
    fn templates_parse_normalised_and_round_trip() {
        let u = parse(GOOD).unwrap();
        let t = &u.templates[0];
        assert_eq!(t.src, "/etc/caisson/units/lb/h.tmpl");
        assert_eq!(t.dest, "etc/haproxy.cfg");
        assert_eq!(t.services, ["web", "api"]);
        assert_eq!(t.reload.as_ref().unwrap()[0], "/bin/sh");
        assert_eq!(u.check(), Ok(()));
        let json = serde_json::to_string(&u).unwrap();
        assert_eq!(serde_json::from_str::<UnitSpec>(&json).unwrap(), u);
        // Without reload nothing is stored for it; without templates, nothing at all.
        let quiet =
            parse(&GOOD.replace("reload = [\"/bin/sh\", \"-c\", \"kill -HUP 1\"]\n", "")).unwrap();
        assert_eq!(quiet.templates[0].reload, None);
        assert!(!serde_json::to_string(&quiet).unwrap().contains("reload"));
        let plain = parse("").unwrap();
        assert!(!serde_json::to_string(&plain).unwrap().contains("templates"));
    }

    #[test]
    fn each_bad_field_is_named() {
        for (from, to, field) in [
            (
                "/etc/caisson//units/lb/./h.tmpl",
                "/var/lib/h.tmpl",
                "`templates[0].src`",
            ),
            (
                "/etc/caisson//units/lb/./h.tmpl",
                "etc/caisson/h",
                "`templates[0].src`",
            ),
            (
                "/etc/caisson//units/lb/./h.tmpl",
                "/etc/caisson/../h",
                "`templates[0].src`",
            ),
            (
                "/etc/caisson//units/lb/./h.tmpl",
                "/etc/caisson/fleet/client.key",
                "`templates[0].src`",
            ),
            (
                "./etc//haproxy.cfg",
                "/etc/haproxy.cfg",
                "`templates[0].dest`",
            ),
            (
                "./etc//haproxy.cfg",
                "../haproxy.cfg",
                "`templates[0].dest`",
            ),
            ("./etc//haproxy.cfg", "a/../../b", "`templates[0].dest`"),
            ("./etc//haproxy.cfg", ".", "`templates[0].dest`"),
            ("./etc//haproxy.cfg", "", "`templates[0].dest`"),
            ("./etc//haproxy.cfg", "etc/", "`templates[0].dest`"),
            (
                "./etc//haproxy.cfg",
                ".a.caisson-tmp",
                "`templates[0].dest`",
            ),
            (
                "volume = \"conf\"",
                "volume = \"data\"",
                "`templates[0].volume`",
            ),
            ("[\"web\", \"api\"]", "[]", "`templates[0].services`"),
            (
                "[\"web\", \"api\"]",
                "[\"Web\"]",
                "`templates[0].services[0]`",
            ),
            (
                "[\"web\", \"api\"]",
                "[\"web\", \"web\"]",
                "`templates[0].services[1]`",
            ),
            (
                "[\"/bin/sh\", \"-c\", \"kill -HUP 1\"]",
                "[]",
                "`templates[0].reload`",
            ),
            (
                "[\"/bin/sh\", \"-c\", \"kill -HUP 1\"]",
                "[\"\"]",
                "`templates[0].reload`",
            ),
            ("volume = \"conf\"", "volume = \"conf\"\nmode = 1", "mode"),
            ("src = ", "source = ", "source"),
        ] {
            let body = GOOD.replace(from, to);
            let e = parse(&body).unwrap_err();
            assert!(e.contains(field) && e.starts_with("unit lb"), "{body}: {e}");
        }
        let e = UnitSpec::parse("lb", &format!("{IMG}{GOOD}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`templates[0].volume`") && e.contains("no volumes"),
            "{e}"
        );
        let e = parse(&format!("{GOOD}{}", GOOD.replace("./etc//", "etc/"))).unwrap_err();
        assert!(
            e.contains("`templates[1].dest`") && e.contains("templates[0]"),
            "{e}"
        );
    }

    #[test]
    fn a_stored_unit_with_a_bad_template_is_refused() {
        let mut u = parse(GOOD).unwrap();
        u.templates[0].dest = "../../../etc/shadow".into();
        let e = u.check().unwrap_err().to_string();
        assert!(e.contains("`templates[0].dest`"), "{e}");
        u.templates[0].dest = "etc//haproxy.cfg".into();
        assert!(u.check().unwrap_err().to_string().contains("normalised"));
        u.templates[0].dest = "haproxy.cfg".into();
        u.templates[0].src = "/etc/caisson/fleet.toml".into();
        let e = u.check().unwrap_err().to_string();
        assert!(e.contains("`templates[0].src`"), "{e}");
    }
}
