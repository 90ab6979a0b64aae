//! HTTP downloads with retries on transient failures.

use std::io::Read;
use std::time::Duration;

use crate::cache::Sink;
use crate::error::DebianError;

/// How many times a transient failure is tried in all.
const ATTEMPTS: u32 = 4;
/// The first pause between attempts; it doubles each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// A shared HTTP client (cheap to clone).
#[derive(Clone)]
pub(crate) struct Http {
    client: reqwest::blocking::Client,
}

impl Http {
    pub fn new() -> Result<Http, DebianError> {
        let client = reqwest::blocking::Client::builder()
            .user_agent(concat!("caisson-debian/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(20))
            .timeout(Duration::from_secs(30 * 60))
            .build()
            .map_err(|e| DebianError::Http {
                url: String::new(),
                reason: format!("cannot set up an HTTP client: {e}"),
                transient: false,
            })?;
        Ok(Http { client })
    }

    /// Streams `url` into `sink`, calling `progress` with each chunk's length. Stops with an
    /// error once the body grows past `limit` bytes.
    pub fn download(
        &self,
        url: &str,
        sink: &mut Sink,
        limit: u64,
        progress: &dyn Fn(u64),
    ) -> Result<(), DebianError> {
        let mut response = self.get(url)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = response
                .read(&mut buf)
                .map_err(|e| http_error(url, &e, true))?;
            if n == 0 {
                return Ok(());
            }
            if sink.size() + n as u64 > limit {
                return Err(DebianError::Http {
                    url: url.to_string(),
                    reason: format!("body is larger than the expected {limit} bytes"),
                    transient: false,
                });
            }
            sink.write_all(&buf[..n])?;
            progress(n as u64);
        }
    }

    /// The whole body of `url` (for small files), retrying transient failures.
    pub fn bytes(&self, url: &str) -> Result<Vec<u8>, DebianError> {
        retry(url, || {
            let mut out = Vec::new();
            self.get(url)?
                .read_to_end(&mut out)
                .map_err(|e| http_error(url, &e, true))?;
            Ok(out)
        })
    }

    fn get(&self, url: &str) -> Result<reqwest::blocking::Response, DebianError> {
        let response = self.client.get(url).send().map_err(|e| {
            let transient = e.is_connect() || e.is_timeout() || e.is_request() || e.is_body();
            http_error(url, &e, transient)
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let transient =
            status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429;
        Err(DebianError::Http {
            url: url.to_string(),
            reason: format!("server answered {status}"),
            transient,
        })
    }
}

fn http_error(url: &str, e: &dyn std::error::Error, transient: bool) -> DebianError {
    let mut reason = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        reason.push_str(&format!(": {s}"));
        source = s.source();
    }
    DebianError::Http {
        url: url.to_string(),
        reason,
        transient,
    }
}

/// Runs `attempt` until it succeeds, fails for good, or [`ATTEMPTS`] transient failures.
pub(crate) fn retry<T>(
    url: &str,
    mut attempt: impl FnMut() -> Result<T, DebianError>,
) -> Result<T, DebianError> {
    let mut pause = FIRST_BACKOFF;
    let mut n = 1;
    loop {
        match attempt() {
            Err(DebianError::Http {
                transient: true,
                reason,
                ..
            }) if n < ATTEMPTS => {
                log::warn!("{url}: {reason}; retrying in {pause:?}");
                std::thread::sleep(pause);
                pause *= 2;
                n += 1;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn transient() -> DebianError {
        DebianError::Http {
            url: "u".into(),
            reason: "reset".into(),
            transient: true,
        }
    }

    #[test]
    fn retries_transient_then_gives_up() {
        let calls = Cell::new(0);
        let r: Result<(), _> = retry("u", || {
            calls.set(calls.get() + 1);
            Err(transient())
        });
        assert!(r.is_err());
        assert_eq!(calls.get(), ATTEMPTS);
    }

    #[test]
    fn fatal_is_not_retried_and_success_stops() {
        let calls = Cell::new(0);
        let r: Result<(), _> = retry("u", || {
            calls.set(calls.get() + 1);
            Err(DebianError::Http {
                url: "u".into(),
                reason: "404".into(),
                transient: false,
            })
        });
        assert!(r.is_err());
        assert_eq!(calls.get(), 1);
        let calls = Cell::new(0);
        let r = retry("u", || {
            calls.set(calls.get() + 1);
            if calls.get() < 2 {
                Err(transient())
            } else {
                Ok(7)
            }
        });
        assert_eq!(r.unwrap(), 7);
    }
}
