//! What each machine reports of its routes to the other hosts' subnets, so that `caisson-fleet
//! network status` can say whether every route is in place: `network/routes/<id>` holds a
//! [`RouteReport`], written by the machine under its lease when it changes.

use super::NetworkError;
use crate::etcd::Client;
use crate::records::{self, Invalid};
use crate::registry::Keys;
use caisson_net::cluster::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One machine's routes to the other hosts' subnets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteReport {
    /// The machine's own subnet.
    pub own: Option<Ipv4Net>,
    /// Each other host's subnet and the state of the route to it: [`OK`], [`FOREIGN`] or
    /// `error: <why>`.
    pub routes: BTreeMap<Ipv4Net, String>,
}

/// The route is in place, made by the agent.
pub const OK: &str = "ok";
/// A route someone else made covers the subnet; the agent left it alone.
pub const FOREIGN: &str = "foreign";

impl RouteReport {
    /// The state of the route to `subnet`, if the machine reports one.
    pub fn state(&self, subnet: &Ipv4Net) -> Option<&str> {
        self.routes.get(subnet).map(String::as_str)
    }
}

/// Writes `report` as machine `machine`'s under `lease`.
pub async fn report(
    client: &Client,
    keys: &Keys,
    machine: &str,
    lease: i64,
    report: &RouteReport,
) -> Result<(), NetworkError> {
    let key = keys.route_report(machine);
    let value = serde_json::to_vec(report).map_err(|source| NetworkError::Encode {
        key: key.clone(),
        source,
    })?;
    client.put(&key, value, lease).await?;
    Ok(())
}

/// Every machine's report, by machine id, and the records that do not decode.
pub async fn reports(
    client: &Client,
    keys: &Keys,
) -> Result<(BTreeMap<String, RouteReport>, Vec<Invalid>), NetworkError> {
    let prefix = keys.route_reports();
    let r = client.range(&prefix, true).await?;
    let mut good = BTreeMap::new();
    let mut invalid = Vec::new();
    for kv in &r.kvs {
        let machine = kv.key.strip_prefix(&prefix).unwrap_or(&kv.key).to_string();
        match records::decode(
            &kv.key,
            &kv.value,
            kv.mod_revision,
            |_: &RouteReport| Ok(()),
        ) {
            Ok(report) => {
                good.insert(machine, report);
            }
            Err(bad) => invalid.push(bad),
        }
    }
    Ok((good, invalid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_reads_back() {
        let mut r = RouteReport {
            own: Some("10.42.1.0/24".parse().unwrap()),
            ..Default::default()
        };
        r.routes.insert("10.42.2.0/24".parse().unwrap(), OK.into());
        r.routes.insert(
            "10.42.3.0/24".parse().unwrap(),
            "error: no route to host".into(),
        );
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"own":"10.42.1.0/24","routes":{"10.42.2.0/24":"ok","10.42.3.0/24":"error: no route to host"}}"#
        );
        let back: RouteReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.state(&"10.42.2.0/24".parse().unwrap()), Some(OK));
        assert_eq!(back.state(&"10.42.4.0/24".parse().unwrap()), None);
    }
}
