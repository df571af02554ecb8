//! A small client of etcd's v3 API through its JSON gateway (`POST /v3/...`), with what the
//! controller needs for its state and its leadership: ranges, transactions and leases.
//!
//! Not the `etcd-client` crate: it compiles etcd's protobuf files at build time and needs
//! `protoc`, which a fresh machine does not have (and plain `cargo test` must build with
//! nothing installed); the gateway is etcd's own documented HTTP API and six calls suffice.
//! Blocking (`ureq`), because the state store's callers are synchronous: see `mirror.rs`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

/// Errors talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered.
    #[error(
        "etcd at {endpoints}: {message}; is etcd running there (`vmatrix up --ha` starts one) \
         and is --state right?"
    )]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// What the last one said.
        message: String,
    },
    /// etcd answered with an error.
    #[error("etcd refused {what}: {message}")]
    Refused {
        /// The call.
        what: String,
        /// etcd's message.
        message: String,
    },
    /// A reply or a stored value did not parse.
    #[error("etcd's reply to {what} does not parse: {message}")]
    Bad {
        /// The call or key.
        what: String,
        /// Why.
        message: String,
    },
    /// The `etcd://` address is malformed.
    #[error("{0}")]
    Address(String),
}

type Result<T> = std::result::Result<T, EtcdError>;

/// A key and its value as etcd stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The revision that created the key (0: never).
    pub create_revision: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

/// One comparison of a transaction.
#[derive(Debug, Clone)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key holds this value.
    ValueIs(String, Vec<u8>),
}

/// One operation of a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    /// Sets a key (attached to a lease when not 0).
    Put(String, Vec<u8>, i64),
    /// Removes a key.
    Delete(String),
    /// Reads a key.
    Get(String),
}

/// etcd's limit on operations in one transaction (`--max-txn-ops`, 128 by default).
pub const MAX_TXN_OPS: usize = 100;
/// What one transaction may carry (etcd refuses requests over 1.5 MiB by default).
pub const MAX_TXN_BYTES: usize = 1 << 20;

/// A client of one etcd cluster (any of its members).
#[derive(Debug)]
pub struct Etcd {
    endpoints: Vec<String>,
    current: AtomicUsize,
    agent: ureq::Agent,
    prefix: String,
}

// The gateway writes int64 as strings and leaves out fields at their defaults.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn b64(s: &[u8]) -> String {
    B64.encode(s)
}

/// The key just after every key that starts with `prefix` (etcd's `range_end`).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[derive(Deserialize)]
struct RawKv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    create_revision: Value,
    #[serde(default)]
    lease: Value,
}

impl RawKv {
    fn decode(self, what: &str) -> Result<Kv> {
        let bad = |m: String| EtcdError::Bad {
            what: what.to_owned(),
            message: m,
        };
        let key = B64.decode(&self.key).map_err(|e| bad(e.to_string()))?;
        Ok(Kv {
            key: String::from_utf8(key).map_err(|e| bad(e.to_string()))?,
            value: B64.decode(&self.value).map_err(|e| bad(e.to_string()))?,
            create_revision: int(&self.create_revision),
            lease: int(&self.lease),
        })
    }
}

impl Etcd {
    /// A client for `etcd://HOST:PORT[,HOST:PORT…][/PREFIX]` (the prefix under which this
    /// matrix keeps its keys; `/vmatrix` by default).
    pub fn from_url(url: &str) -> Result<Self> {
        let rest = url.strip_prefix("etcd://").ok_or_else(|| {
            EtcdError::Address(format!(
                "{url:?}: use etcd://HOST:PORT[,HOST:PORT…][/PREFIX]"
            ))
        })?;
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) if !p.trim_matches('/').is_empty() => {
                (h, format!("/{}", p.trim_matches('/')))
            }
            Some((h, _)) => (h, "/vmatrix".to_owned()),
            None => (rest, "/vmatrix".to_owned()),
        };
        let mut endpoints = Vec::new();
        for h in hosts.split(',').filter(|h| !h.is_empty()) {
            if h.parse::<std::net::SocketAddr>().is_err() && !h.contains(':') {
                return Err(EtcdError::Address(format!(
                    "{url:?}: {h:?} is not HOST:PORT"
                )));
            }
            endpoints.push(format!("http://{h}"));
        }
        if endpoints.is_empty() {
            return Err(EtcdError::Address(format!(
                "{url:?}: name at least one HOST:PORT"
            )));
        }
        Ok(Self {
            endpoints,
            current: AtomicUsize::new(0),
            // Well inside the leader's lease (3 s) for one member; the next member is tried
            // after it.
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_millis(500))
                .timeout(Duration::from_secs(2))
                .build(),
            prefix,
        })
    }

    /// Where this matrix's keys live (`/vmatrix` by default).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The members, as given.
    pub fn endpoints(&self) -> String {
        self.endpoints.join(",")
    }

    /// One call, to the member that answered last, else the others in turn.
    fn call(&self, path: &str, body: &Value) -> Result<Value> {
        self.call_within(path, body, None)
    }

    /// [`Etcd::call`], each attempt within `limit` (default: the client's 2 s).
    fn call_within(&self, path: &str, body: &Value, limit: Option<Duration>) -> Result<Value> {
        let n = self.endpoints.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut last = String::new();
        for i in 0..n {
            let at = (first + i) % n;
            let url = format!("{}{path}", self.endpoints[at]);
            let mut req = self.agent.post(&url);
            if let Some(l) = limit {
                req = req.timeout(l);
            }
            match req.send_json(body.clone()) {
                Ok(resp) => {
                    self.current.store(at, Ordering::Relaxed);
                    return resp.into_json::<Value>().map_err(|e| EtcdError::Bad {
                        what: path.to_owned(),
                        message: e.to_string(),
                    });
                }
                Err(ureq::Error::Status(code, resp)) => {
                    let text = resp.into_string().unwrap_or_default();
                    let message = serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| {
                            v.get("message")
                                .or_else(|| v.get("error"))
                                .and_then(|m| m.as_str().map(str::to_owned))
                        })
                        .unwrap_or(text);
                    // A member that lost its quorum answers 503: another may not have.
                    if code == 503 {
                        last = format!("{url}: {message}");
                        continue;
                    }
                    return Err(EtcdError::Refused {
                        what: path.to_owned(),
                        message: format!("HTTP {code}: {message}"),
                    });
                }
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        Err(EtcdError::Unreachable {
            endpoints: self.endpoints(),
            message: last,
        })
    }

    /// Every key under `prefix`, in key order (read in pages).
    pub fn range_prefix(&self, prefix: &str) -> Result<Vec<Kv>> {
        let end = prefix_end(prefix);
        let mut from = prefix.as_bytes().to_vec();
        let mut out = Vec::new();
        loop {
            let reply = self.call(
                "/v3/kv/range",
                &json!({"key": b64(&from), "range_end": b64(&end), "limit": 1000}),
            )?;
            let kvs: Vec<RawKv> = serde_json::from_value(reply["kvs"].clone()).unwrap_or_default();
            let more = reply["more"].as_bool().unwrap_or(false);
            for kv in kvs {
                out.push(kv.decode(prefix)?);
            }
            match (more, out.last()) {
                (true, Some(last)) => {
                    from = last.key.as_bytes().to_vec();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    /// One key.
    pub fn get(&self, key: &str) -> Result<Option<Kv>> {
        let reply = self.call("/v3/kv/range", &json!({"key": b64(key.as_bytes())}))?;
        let kvs: Vec<RawKv> = serde_json::from_value(reply["kvs"].clone()).unwrap_or_default();
        kvs.into_iter().next().map(|k| k.decode(key)).transpose()
    }

    /// A transaction: `success` if every comparison holds, else `failure`. Returns whether
    /// it succeeded and the keys its `Get`s read (absent keys left out).
    pub fn txn(
        &self,
        compare: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<(bool, Vec<Kv>)> {
        let cmp: Vec<Value> = compare
            .iter()
            .map(|c| match c {
                Compare::Absent(k) => json!({"key": b64(k.as_bytes()), "target": "CREATE",
                    "result": "EQUAL", "create_revision": "0"}),
                Compare::ValueIs(k, v) => json!({"key": b64(k.as_bytes()), "target": "VALUE",
                    "result": "EQUAL", "value": b64(v)}),
            })
            .collect();
        let ops = |ops: &[Op]| -> Vec<Value> {
            ops.iter()
                .map(|o| match o {
                    Op::Put(k, v, lease) => json!({"request_put": {"key": b64(k.as_bytes()),
                        "value": b64(v), "lease": lease.to_string()}}),
                    Op::Delete(k) => {
                        json!({"request_delete_range": {"key": b64(k.as_bytes())}})
                    }
                    Op::Get(k) => json!({"request_range": {"key": b64(k.as_bytes())}}),
                })
                .collect()
        };
        let reply = self.call(
            "/v3/kv/txn",
            &json!({"compare": cmp, "success": ops(success), "failure": ops(failure)}),
        )?;
        let succeeded = reply["succeeded"].as_bool().unwrap_or(false);
        let mut read = Vec::new();
        for r in reply["responses"].as_array().into_iter().flatten() {
            let kvs: Vec<RawKv> =
                serde_json::from_value(r["response_range"]["kvs"].clone()).unwrap_or_default();
            for kv in kvs {
                read.push(kv.decode("a transaction")?);
            }
        }
        Ok((succeeded, read))
    }

    /// Sets `key` to `value` unless it exists; returns what it holds afterwards.
    pub fn put_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>> {
        let (_, read) = self.txn(
            &[Compare::Absent(key.to_owned())],
            &[Op::Put(key.to_owned(), value.to_vec(), 0)],
            &[Op::Get(key.to_owned())],
        )?;
        Ok(read
            .into_iter()
            .next()
            .map(|kv| kv.value)
            .unwrap_or_else(|| value.to_vec()))
    }

    /// A new lease of `ttl`; its id.
    pub fn grant(&self, ttl: Duration) -> Result<i64> {
        let reply = self.call(
            "/v3/lease/grant",
            &json!({"TTL": ttl.as_secs().max(1).to_string(), "ID": "0"}),
        )?;
        match int(&reply["ID"]) {
            0 => Err(EtcdError::Bad {
                what: "lease grant".into(),
                message: format!("no lease id in {reply}"),
            }),
            id => Ok(id),
        }
    }

    /// Renews lease `id`; the seconds it has left (0: it expired).
    pub fn keep_alive(&self, id: i64) -> Result<i64> {
        // Short: a renewal that comes later than a third of the lease is worth nothing.
        let reply = self.call_within(
            "/v3/lease/keepalive",
            &json!({"ID": id.to_string()}),
            Some(Duration::from_millis(800)),
        )?;
        Ok(int(&reply["result"]["TTL"]))
    }

    /// Ends lease `id` and every key attached to it.
    pub fn revoke(&self, id: i64) -> Result<()> {
        self.call("/v3/lease/revoke", &json!({"ID": id.to_string()}))
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_with_their_prefix() {
        let e = Etcd::from_url("etcd://127.0.0.1:2379,127.0.0.1:22379/m1").unwrap();
        assert_eq!(
            e.endpoints(),
            "http://127.0.0.1:2379,http://127.0.0.1:22379"
        );
        assert_eq!(e.prefix(), "/m1");
        assert_eq!(
            Etcd::from_url("etcd://127.0.0.1:2379").unwrap().prefix(),
            "/vmatrix"
        );
        for bad in ["http://x:1", "etcd://", "etcd://nohost"] {
            assert!(Etcd::from_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_prefix_ends_just_after_its_keys() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
