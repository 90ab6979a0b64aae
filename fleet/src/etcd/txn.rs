//! Transactions: comparisons, operations and the answer.

use super::wire::{b64, range_json};
use super::KeyValue;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

/// What a comparison looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The key's last modification revision (0: the key does not exist).
    ModRevision(i64),
    /// The key's creation revision (0: the key does not exist).
    CreateRevision(i64),
    /// The key's version (number of puts since creation; 0: absent).
    Version(i64),
    /// The key's value.
    Value(Vec<u8>),
}

/// A comparison in a transaction: `key`'s target `op` the given value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    /// Compare every key starting with `key` (each must satisfy the comparison; an empty range
    /// compares as one absent key).
    pub prefix: bool,
    pub op: CmpOp,
    pub target: Target,
}

/// How a comparison compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

impl Compare {
    /// `key` is absent.
    pub fn absent(key: impl Into<String>) -> Compare {
        Compare {
            key: key.into(),
            prefix: false,
            op: CmpOp::Equal,
            target: Target::CreateRevision(0),
        }
    }

    /// `key` was last changed at `rev` (0: `key` is absent).
    pub fn mod_revision(key: impl Into<String>, rev: i64) -> Compare {
        Compare {
            key: key.into(),
            prefix: false,
            op: CmpOp::Equal,
            target: Target::ModRevision(rev),
        }
    }

    /// No key starting with `prefix` was written after revision `rev` (deletions are not
    /// seen): the compare-and-swap of a set of keys read at `rev`.
    pub fn unchanged_since(prefix: impl Into<String>, rev: i64) -> Compare {
        Compare {
            key: prefix.into(),
            prefix: true,
            op: CmpOp::Less,
            target: Target::ModRevision(rev + 1),
        }
    }

    /// `key` holds exactly `value`.
    pub fn value(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Compare {
        Compare {
            key: key.into(),
            prefix: false,
            op: CmpOp::Equal,
            target: Target::Value(value.into()),
        }
    }

    pub(super) fn to_json(&self) -> Value {
        let result = match self.op {
            CmpOp::Equal => "EQUAL",
            CmpOp::NotEqual => "NOT_EQUAL",
            CmpOp::Greater => "GREATER",
            CmpOp::Less => "LESS",
        };
        let mut v = json!({ "result": result, "key": b64(&self.key) });
        if self.prefix {
            v["range_end"] = json!(B64.encode(super::prefix_end(self.key.as_bytes())));
        }
        let (target, field, value) = match &self.target {
            Target::ModRevision(r) => ("MOD", "mod_revision", json!(r.to_string())),
            Target::CreateRevision(r) => ("CREATE", "create_revision", json!(r.to_string())),
            Target::Version(r) => ("VERSION", "version", json!(r.to_string())),
            Target::Value(x) => ("VALUE", "value", json!(B64.encode(x))),
        };
        v["target"] = json!(target);
        v[field] = value;
        v
    }
}

/// An operation inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Put `value` at `key`, attached to `lease` (0: none).
    Put {
        key: String,
        value: Vec<u8>,
        lease: i64,
    },
    /// Delete `key` (or every key with the prefix, when `prefix`).
    Delete { key: String, prefix: bool },
    /// Read `key` (or every key with the prefix, when `prefix`).
    Get { key: String, prefix: bool },
}

impl Op {
    /// A put without a lease.
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: 0,
        }
    }

    /// A delete of one key.
    pub fn delete(key: impl Into<String>) -> Op {
        Op::Delete {
            key: key.into(),
            prefix: false,
        }
    }

    pub(super) fn to_json(&self) -> Value {
        match self {
            Op::Put { key, value, lease } => json!({ "request_put": {
                "key": b64(key), "value": B64.encode(value), "lease": lease.to_string() } }),
            Op::Delete { key, prefix } => {
                json!({ "request_delete_range": range_json(key, *prefix) })
            }
            Op::Get { key, prefix } => json!({ "request_range": range_json(key, *prefix) }),
        }
    }
}

/// The answer to a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether every comparison held (and the `success` operations ran).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: i64,
    /// The results of the operations' reads, in order (empty for puts and deletes).
    pub responses: Vec<Vec<KeyValue>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_json() {
        let c = Compare::mod_revision("k", 5).to_json();
        assert_eq!(c["target"], "MOD");
        assert_eq!(c["mod_revision"], "5");
        assert_eq!(Compare::absent("k").to_json()["create_revision"], "0");
        let c = Compare::unchanged_since("/a/", 7).to_json();
        assert_eq!(c["result"], "LESS");
        assert_eq!(c["mod_revision"], "8");
        assert_eq!(c["range_end"], B64.encode("/a0"));
    }
}
