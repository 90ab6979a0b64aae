//! The gateway's JSON: base64 keys and values, 64-bit integers as strings, zero values omitted.

use super::{KeyValue, RangeResponse, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

pub(super) fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

/// The JSON of a key or a prefix range.
pub(super) fn range_json(key: &str, prefix: bool) -> Value {
    let mut v = json!({ "key": b64(key) });
    if prefix {
        v["range_end"] = json!(B64.encode(prefix_end(key.as_bytes())));
    }
    v
}

/// The first key after every key that starts with `prefix` (`\0`: the whole keyspace).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// etcd's gateway sends 64-bit integers as strings and omits zero values.
pub(super) fn int64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        S(String),
        I(i64),
    }
    match N::deserialize(d)? {
        N::I(i) => Ok(i),
        N::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

#[derive(Deserialize, Default)]
pub(super) struct RawHeader {
    #[serde(default, deserialize_with = "int64")]
    pub(super) revision: i64,
}

#[derive(Deserialize, Default)]
pub(super) struct RawHeaderOnly {
    #[serde(default)]
    pub(super) header: RawHeader,
}

#[derive(Deserialize, Default)]
pub(super) struct RawKv {
    #[serde(default)]
    pub(super) key: String,
    #[serde(default)]
    pub(super) value: String,
    #[serde(default, deserialize_with = "int64")]
    pub(super) create_revision: i64,
    #[serde(default, deserialize_with = "int64")]
    pub(super) mod_revision: i64,
    #[serde(default, deserialize_with = "int64")]
    pub(super) version: i64,
    #[serde(default, deserialize_with = "int64")]
    pub(super) lease: i64,
}

impl RawKv {
    pub(super) fn decode(self) -> Result<KeyValue> {
        Ok(KeyValue {
            key: String::from_utf8_lossy(&B64.decode(self.key)?).into_owned(),
            value: B64.decode(self.value)?,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        })
    }
}

#[derive(Deserialize, Default)]
pub(super) struct RawRange {
    #[serde(default)]
    pub(super) header: RawHeader,
    #[serde(default)]
    pub(super) kvs: Vec<RawKv>,
}

impl RawRange {
    pub(super) fn decode(self) -> Result<RangeResponse> {
        Ok(RangeResponse {
            revision: self.header.revision,
            kvs: self
                .kvs
                .into_iter()
                .map(RawKv::decode)
                .collect::<Result<_>>()?,
        })
    }
}

#[derive(Deserialize, Default)]
pub(super) struct RawDelete {
    #[serde(default, deserialize_with = "int64")]
    pub(super) deleted: i64,
}

#[derive(Deserialize, Default)]
pub(super) struct RawTxnOp {
    #[serde(default)]
    pub(super) response_range: Option<RawRange>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawTxn {
    #[serde(default)]
    pub(super) header: RawHeader,
    #[serde(default)]
    pub(super) succeeded: bool,
    #[serde(default)]
    pub(super) responses: Vec<RawTxnOp>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawLease {
    #[serde(rename = "ID", default, deserialize_with = "int64")]
    pub(super) id: i64,
    #[serde(rename = "TTL", default, deserialize_with = "int64")]
    pub(super) ttl: i64,
}

#[derive(Deserialize, Default)]
pub(super) struct RawKeepAlive {
    #[serde(default)]
    pub(super) result: Option<RawLease>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    pub(super) fn decodes_gateway_json() {
        let text = r#"{"header":{"revision":"7"},"kvs":[{"key":"YQ==","value":"eA==",
            "create_revision":"2","mod_revision":"7","version":"3"}],"count":"1"}"#;
        let r: RawRange = serde_json::from_str(text).unwrap();
        let r = r.decode().unwrap();
        assert_eq!(r.revision, 7);
        assert_eq!(r.kvs[0].key, "a");
        assert_eq!(r.kvs[0].value, b"x");
        assert_eq!(r.kvs[0].lease, 0);
    }
}
