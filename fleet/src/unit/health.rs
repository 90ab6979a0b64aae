//! A unit's `[health]` table: how the agent checks that an instance works (see
//! `crate::agent::health` for what it does with the answers).
//!
//! ```toml
//! [health]                  # exactly one of exec, http or tcp
//! exec = ["test", "-f", "/tmp/ok"]            # run in the container: exit 0 is healthy
//! # http = "http://127.0.0.1:8080/healthz"     # GET: 2xx or 3xx is healthy
//! # tcp = 8080                                 # a TCP connection is accepted
//! interval = "10s"          # between the end of one check and the next (default 10s)
//! timeout = "5s"            # each check's deadline (default 5s)
//! retries = 3               # consecutive failures that make it unhealthy (default 3)
//! start_period = "0s"       # failures this soon after a start do not count (default 0s)
//! ```
//!
//! The http and tcp checks reach the container only: the URL's host must be `127.0.0.1` or
//! `localhost` (the container, which shares the host's network today; once containers have
//! addresses of their own the check goes to the container's address), and only `http://`.
//! Durations are a number and a unit (`ms`, `s`, `m`, `h`), or several (`1m30s`).

use serde::{Deserialize, Serialize};

/// A validated health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub probe: Probe,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub retries: u32,
    pub start_period_ms: u64,
}

/// What a check does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Probe {
    /// Runs this command in the container; exit 0 is healthy.
    Exec(Vec<String>),
    /// GETs this path on this port of the container; a 2xx or 3xx answer is healthy.
    Http { port: u16, path: String },
    /// Connects to this TCP port of the container.
    Tcp(u16),
}

/// The `[health]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HealthFile {
    exec: Option<Vec<String>>,
    http: Option<String>,
    tcp: Option<i64>,
    interval: Option<String>,
    timeout: Option<String>,
    retries: Option<i64>,
    start_period: Option<String>,
}

pub const DEFAULT_INTERVAL_MS: u64 = 10_000;
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_RETRIES: u32 = 3;
/// As Docker: failures count from the start unless the unit gives a start period.
pub const DEFAULT_START_PERIOD_MS: u64 = 0;
/// The shortest interval and timeout (a check every few milliseconds is a busy loop).
pub const MIN_MS: u64 = 10;
/// The longest interval, timeout or start period: a day.
pub const MAX_MS: u64 = 86_400_000;
/// The most retries.
pub const MAX_RETRIES: u32 = 1000;

/// A field's error: the field (under `health.`) and why.
type FieldError = (String, String);

fn bad(field: &str, message: String) -> FieldError {
    (format!("health.{field}"), message)
}

/// Parses a duration: `500ms`, `10s`, `2m`, `1h`, or several run together (`1m30s`).
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let why = || format!("{text:?} is not a duration such as \"500ms\", \"10s\", \"2m\" or \"1h\"");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(why());
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let number: u64 = rest[..digits].parse().map_err(|_| why())?;
        rest = &rest[digits..];
        let letters = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let scale = match &rest[..letters] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(why()),
        };
        rest = &rest[letters..];
        total = number
            .checked_mul(scale)
            .and_then(|n| total.checked_add(n))
            .ok_or_else(why)?;
    }
    Ok(total)
}

/// Parses the `http` form `http://127.0.0.1:PORT/PATH` (or `localhost`): port and path.
fn parse_http(url: &str) -> Result<(u16, String), String> {
    let why = |m: &str| format!("{url:?}: {m} (write http://127.0.0.1:PORT/PATH)");
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| why("only http:// URLs to the container are checked"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| why("the port is missing"))?;
    if host != "127.0.0.1" && host != "localhost" {
        return Err(why(
            "the host must be 127.0.0.1 or localhost: the check goes to the container only",
        ));
    }
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => return Err(why("the port is not a number from 1 to 65535")),
    };
    if path.bytes().any(|b| b.is_ascii_control() || b == b' ') || path.contains('#') {
        return Err(why("the path has spaces, control characters or a fragment"));
    }
    Ok((port, path.to_string()))
}

fn duration(field: &str, text: Option<&str>, default: u64, min: u64) -> Result<u64, FieldError> {
    let Some(text) = text else {
        return Ok(default);
    };
    let ms = parse_duration(text).map_err(|m| bad(field, m))?;
    if ms < min || ms > MAX_MS {
        return Err(bad(
            field,
            format!("{text:?} is not between {min}ms and 24h"),
        ));
    }
    Ok(ms)
}

impl HealthFile {
    /// Validates the table.
    pub(super) fn check(self) -> Result<Health, FieldError> {
        let probe = match (self.exec, self.http, self.tcp) {
            (Some(argv), None, None) => Probe::Exec(argv),
            (None, Some(url), None) => {
                let (port, path) = parse_http(&url).map_err(|m| bad("http", m))?;
                Probe::Http { port, path }
            }
            (None, None, Some(port)) => match u16::try_from(port) {
                Ok(p) if p > 0 => Probe::Tcp(p),
                _ => return Err(bad("tcp", format!("{port} is not a port number (1-65535)"))),
            },
            _ => {
                return Err((
                    "health".into(),
                    "give exactly one of exec, http or tcp".into(),
                ))
            }
        };
        let retries = match self.retries {
            None => DEFAULT_RETRIES,
            Some(n) => match u32::try_from(n) {
                Ok(n) if (1..=MAX_RETRIES).contains(&n) => n,
                _ => {
                    return Err(bad(
                        "retries",
                        format!("{n} is not between 1 and {MAX_RETRIES}"),
                    ))
                }
            },
        };
        let health = Health {
            probe,
            interval_ms: duration(
                "interval",
                self.interval.as_deref(),
                DEFAULT_INTERVAL_MS,
                MIN_MS,
            )?,
            timeout_ms: duration(
                "timeout",
                self.timeout.as_deref(),
                DEFAULT_TIMEOUT_MS,
                MIN_MS,
            )?,
            retries,
            start_period_ms: duration(
                "start_period",
                self.start_period.as_deref(),
                DEFAULT_START_PERIOD_MS,
                0,
            )?,
        };
        health.check()?;
        Ok(health)
    }
}

impl Health {
    /// Checks a health check read back from etcd (written without `submit`, perhaps).
    pub fn check(&self) -> Result<(), FieldError> {
        match &self.probe {
            Probe::Exec(argv) => {
                if argv.first().is_none_or(|a| a.is_empty()) {
                    return Err(bad("exec", "the program (first word) is empty".into()));
                }
                if argv.iter().any(|a| a.contains('\0')) {
                    return Err(bad("exec", "an argument contains a NUL byte".into()));
                }
            }
            Probe::Http { port, path } => {
                parse_http(&format!("http://127.0.0.1:{port}{path}"))
                    .map_err(|m| bad("http", m))?;
                if !path.starts_with('/') {
                    return Err(bad("http", format!("{path:?} does not start with /")));
                }
            }
            Probe::Tcp(0) => return Err(bad("tcp", "0 is not a port number".into())),
            Probe::Tcp(_) => {}
        }
        for (field, ms, min) in [
            ("interval", self.interval_ms, MIN_MS),
            ("timeout", self.timeout_ms, MIN_MS),
            ("start_period", self.start_period_ms, 0),
        ] {
            if ms < min || ms > MAX_MS {
                return Err(bad(field, format!("{ms}ms is not between {min}ms and 24h")));
            }
        }
        if self.retries == 0 || self.retries > MAX_RETRIES {
            return Err(bad(
                "retries",
                format!("{} is not between 1 and {MAX_RETRIES}", self.retries),
            ));
        }
        Ok(())
    }

    pub fn interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.interval_ms)
    }
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms)
    }
    pub fn start_period(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.start_period_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unit::UnitSpec;

    const IMG: &str = "[image]\npath = \"/a.tar\"\n";

    fn health(table: &str) -> Result<Option<Health>, String> {
        UnitSpec::parse("t", &format!("{IMG}[health]\n{table}"))
            .map(|u| u.health)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(500));
        assert_eq!(parse_duration("10s"), Ok(10_000));
        assert_eq!(parse_duration("2m"), Ok(120_000));
        assert_eq!(parse_duration("1h"), Ok(3_600_000));
        assert_eq!(parse_duration("1m30s"), Ok(90_000));
        for bad in [
            "",
            "10",
            "s",
            "1.5s",
            "-1s",
            "10 s",
            "1d",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn defaults_and_forms() {
        let h = health("tcp = 8080").unwrap().unwrap();
        assert_eq!(
            h,
            Health {
                probe: Probe::Tcp(8080),
                interval_ms: 10_000,
                timeout_ms: 5_000,
                retries: 3,
                start_period_ms: 0,
            }
        );
        let h = health(
            "http = \"http://localhost:8080/healthz?full=1\"\ninterval = \"100ms\"\ntimeout = \"1m30s\"\nretries = 5\nstart_period = \"30s\"",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            h.probe,
            Probe::Http {
                port: 8080,
                path: "/healthz?full=1".into()
            }
        );
        assert_eq!(
            (h.interval_ms, h.timeout_ms, h.retries, h.start_period_ms),
            (100, 90_000, 5, 30_000)
        );
        let h = health("http = \"http://127.0.0.1:80\"").unwrap().unwrap();
        assert_eq!(
            h.probe,
            Probe::Http {
                port: 80,
                path: "/".into()
            }
        );
        let h = health("exec = [\"test\", \"-f\", \"/tmp/ok\"]")
            .unwrap()
            .unwrap();
        assert_eq!(
            h.probe,
            Probe::Exec(vec!["test".into(), "-f".into(), "/tmp/ok".into()])
        );
        assert_eq!(h.check(), Ok(()));
        // No table: no check, and the stored spec (and its hash) has no health field at all.
        let u = UnitSpec::parse("t", IMG).unwrap();
        assert!(u.health.is_none());
        assert!(!serde_json::to_string(&u).unwrap().contains("health"));
    }

    #[test]
    fn errors_name_the_unit_and_field() {
        let cases = [
            ("", "`health`"),
            ("tcp = 1\nexec = [\"x\"]", "exactly one"),
            ("tcp = 0", "`health.tcp`"),
            ("tcp = 70000", "`health.tcp`"),
            ("exec = []", "`health.exec`"),
            ("exec = [\"\"]", "`health.exec`"),
            ("http = \"https://127.0.0.1:1/\"", "`health.http`"),
            ("http = \"http://10.0.0.1:80/\"", "container only"),
            ("http = \"http://127.0.0.1/\"", "port is missing"),
            ("http = \"http://127.0.0.1:0/\"", "`health.http`"),
            ("http = \"http://127.0.0.1:80/a b\"", "`health.http`"),
            ("tcp = 1\ninterval = \"10\"", "`health.interval`"),
            ("tcp = 1\ninterval = \"1ms\"", "`health.interval`"),
            ("tcp = 1\ntimeout = \"2d\"", "`health.timeout`"),
            ("tcp = 1\ntimeout = \"25h\"", "`health.timeout`"),
            ("tcp = 1\nstart_period = \"x\"", "`health.start_period`"),
            ("tcp = 1\nretries = 0", "`health.retries`"),
            ("tcp = 1\nretries = -1", "`health.retries`"),
            ("tcp = 1\nretry = 3", "retry"),
        ];
        for (table, want) in cases {
            let e = health(table).unwrap_err();
            assert!(e.contains(want) && e.contains("unit t"), "{table:?}: {e}");
        }
    }

    #[test]
    fn a_stored_check_is_checked_again() {
        let mut u = UnitSpec::parse("t", &format!("{IMG}[health]\ntcp = 80")).unwrap();
        assert_eq!(u.check(), Ok(()));
        let good = u.health.clone().unwrap();
        for bad in [
            Health {
                interval_ms: 0,
                ..good.clone()
            },
            Health {
                retries: 0,
                ..good.clone()
            },
            Health {
                probe: Probe::Http {
                    port: 80,
                    path: "x".into(),
                },
                ..good.clone()
            },
            Health {
                probe: Probe::Exec(vec![]),
                ..good
            },
        ] {
            u.health = Some(bad);
            assert!(u.check().unwrap_err().to_string().contains("health"));
        }
    }
}
