//! The state store on etcd: the same SQLite schema and queries as the embedded store, run on
//! an in-memory database that is loaded from etcd when this controller takes the lead, and
//! whose every changed row is written back to etcd before the call that changed it returns.
//!
//! One key per row, `PREFIX/rows/TABLE/KEY` (KEY: the row's primary key, or its rowid in a
//! table without one), holding `{"rowid": …, "row": {column: value…}}`. SQLite's update hook
//! names the rowid of each row a statement touched; after the call, each named row is read as
//! it is now and put under its key (or its key deleted, if it is gone) — so a rolled-back
//! change writes the old row again, which is harmless. Two deletions do not reach the hook:
//! rows that `INSERT OR REPLACE` removes (the new row has the same primary key, so its put
//! overwrites them) and a `DELETE` without `WHERE` (the truncate optimisation: the store's
//! queries always name the rows they delete). Every write is a transaction that holds only while
//! this controller's leadership key is still its own: a controller that lost the lead cannot
//! overwrite its successor's state.
//!
//! Why not a second implementation of every query over etcd keys: the queries (the drop rules,
//! pruning, sequence numbers) would then exist twice and drift; here both stores run the very
//! same code, and the shared tests compare them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::Connection;
use serde_json::{Map, Value};

use crate::db::DbError;
use crate::etcd::{Compare, Etcd, Op, MAX_TXN_BYTES, MAX_TXN_OPS};

/// Where this controller may write: the leadership key and the value it put there.
#[derive(Debug, Clone)]
pub struct Guard {
    /// The leadership key.
    pub key: String,
    /// This controller's value in it.
    pub value: Vec<u8>,
}

/// Rows changed since the last flush: (table, rowid).
type Changed = Arc<Mutex<BTreeSet<(String, i64)>>>;

/// Which etcd key holds which row, both ways.
#[derive(Default)]
pub(crate) struct Keys {
    by_row: HashMap<(String, i64), String>,
    by_key: HashMap<String, i64>,
}

impl Keys {
    /// How many rows have keys.
    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Row `rowid` of `table` is now under `key`; the key it was under before, if another.
    fn set(&mut self, table: &str, rowid: i64, key: &str) -> Option<String> {
        // A row replaced under the same key (INSERT OR REPLACE) left its old rowid behind.
        if let Some(old) = self.by_key.insert(key.to_owned(), rowid) {
            if old != rowid {
                self.by_row.remove(&(table.to_owned(), old));
            }
        }
        let before = self
            .by_row
            .insert((table.to_owned(), rowid), key.to_owned())?;
        if before == key {
            return None;
        }
        if self.by_key.get(&before) == Some(&rowid) {
            self.by_key.remove(&before);
        }
        Some(before)
    }

    /// Row `rowid` of `table` is gone; the key to delete, if it had one.
    fn gone(&mut self, table: &str, rowid: i64) -> Option<String> {
        let key = self.by_row.remove(&(table.to_owned(), rowid))?;
        (self.by_key.get(&key) == Some(&rowid)).then(|| {
            self.by_key.remove(&key);
            key
        })
    }
}

/// The link between the in-memory database and etcd.
pub(crate) struct Mirror {
    etcd: Arc<Etcd>,
    guard: Guard,
    changed: Changed,
    keys: Keys,
    /// Each table's primary key columns (none: the rowid is the key).
    pks: HashMap<String, Vec<String>>,
    /// Set once a write failed: memory and etcd may differ, nothing more is written.
    broken: Option<String>,
}

fn rows_prefix(etcd: &Etcd) -> String {
    format!("{}/rows/", etcd.prefix())
}

pub(crate) fn tables(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut st = conn.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'
         ORDER BY name",
    )?;
    let rows = st.query_map([], |r| r.get::<_, String>(0))?;
    rows.collect()
}

/// Each table's primary key columns, in key order.
fn primary_keys(conn: &Connection) -> rusqlite::Result<HashMap<String, Vec<String>>> {
    let mut out = HashMap::new();
    for t in tables(conn)? {
        let mut st = conn.prepare(&format!("PRAGMA table_info(\"{t}\")"))?;
        let mut cols: Vec<(i64, String)> = st
            .query_map([], |r| Ok((r.get::<_, i64>(5)?, r.get::<_, String>(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        cols.retain(|(pk, _)| *pk > 0);
        cols.sort();
        out.insert(t, cols.into_iter().map(|(_, c)| c).collect());
    }
    Ok(out)
}

pub(crate) fn to_json(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::from(i),
        ValueRef::Real(f) => Value::from(f),
        ValueRef::Text(t) => Value::from(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => serde_json::json!({ "b64": B64.encode(b) }),
    }
}

fn from_json(v: &Value) -> Option<SqlValue> {
    Some(match v {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => SqlValue::Integer(i),
            None => SqlValue::Real(n.as_f64()?),
        },
        Value::String(s) => SqlValue::Text(s.clone()),
        Value::Object(o) => SqlValue::Blob(B64.decode(o.get("b64")?.as_str()?).ok()?),
        Value::Array(_) => return None,
    })
}

/// One part of a key: integers zero-padded (they sort), anything else percent-encoded.
fn key_part(v: &Value) -> String {
    match v {
        Value::Number(n) => match n.as_i64() {
            Some(i) => format!("{i:020}"),
            None => n.to_string(),
        },
        Value::String(s) => {
            let mut out = String::new();
            for b in s.bytes() {
                if b.is_ascii_alphanumeric() || b"_.-".contains(&b) {
                    out.push(b as char);
                } else {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
            out
        }
        other => key_part(&Value::from(other.to_string())),
    }
}

impl Mirror {
    /// Row `rowid` of `table` as it is now: its key and stored value, if it exists.
    fn read_row(
        &self,
        conn: &Connection,
        table: &str,
        rowid: i64,
    ) -> rusqlite::Result<Option<(String, Vec<u8>)>> {
        let mut st = conn.prepare(&format!("SELECT * FROM \"{table}\" WHERE rowid = ?1"))?;
        let names: Vec<String> = st.column_names().iter().map(|s| s.to_string()).collect();
        let mut rows = st.query([rowid])?;
        let Some(r) = rows.next()? else {
            return Ok(None);
        };
        let mut obj = Map::new();
        for (i, name) in names.iter().enumerate() {
            obj.insert(name.clone(), to_json(r.get_ref(i)?));
        }
        let pk = self.pks.get(table).cloned().unwrap_or_default();
        let key = if pk.is_empty() {
            format!("rowid{rowid:020}")
        } else {
            pk.iter()
                .map(|c| key_part(obj.get(c).unwrap_or(&Value::Null)))
                .collect::<Vec<_>>()
                .join("/")
        };
        let value = serde_json::json!({ "rowid": rowid, "row": Value::Object(obj) });
        Ok(Some((
            format!("{}{table}/{key}", rows_prefix(&self.etcd)),
            value.to_string().into_bytes(),
        )))
    }
}

/// A stored row: its rowid and columns.
fn parse_stored(key: &str, value: &[u8]) -> Result<(i64, Map<String, Value>), DbError> {
    let bad = |m: &str| DbError::Bad(format!("etcd key {key}: {m}"));
    let v: Value = serde_json::from_slice(value).map_err(|e| bad(&e.to_string()))?;
    let rowid = v["rowid"].as_i64().ok_or_else(|| bad("no rowid"))?;
    match &v["row"] {
        Value::Object(o) => Ok((rowid, o.clone())),
        _ => Err(bad("no row")),
    }
}

/// The schema version etcd's rows were written with (0: no state yet).
pub(crate) fn stored_version(etcd: &Etcd) -> Result<usize, DbError> {
    let kvs = etcd.range_prefix(&format!("{}schema_version/", rows_prefix(etcd)))?;
    let mut v = 0;
    for kv in kvs {
        let (_, row) = parse_stored(&kv.key, &kv.value)?;
        v = v.max(row.get("version").and_then(Value::as_u64).unwrap_or(0) as usize);
    }
    Ok(v)
}

/// Loads every row under the prefix into `conn` (whose schema is at the version they were
/// written with, its `schema_version` table empty); which key holds which row.
pub(crate) fn load(etcd: &Etcd, conn: &Connection) -> Result<Keys, DbError> {
    let known: BTreeSet<String> = tables(conn)?.into_iter().collect();
    let prefix = rows_prefix(etcd);
    let kvs = etcd.range_prefix(&prefix)?;
    let mut keys = Keys::default();
    let tx = conn.unchecked_transaction()?;
    for kv in &kvs {
        let bad = |m: &str| DbError::Bad(format!("etcd key {}: {m}", kv.key));
        let rest = &kv.key[prefix.len()..];
        let (table, _) = rest.split_once('/').ok_or_else(|| bad("not TABLE/KEY"))?;
        if !known.contains(table) {
            return Err(bad(
                "a table this version does not know: was it written by a newer vMatrix?",
            ));
        }
        let (rowid, row) = parse_stored(&kv.key, &kv.value)?;
        let mut cols = vec!["rowid".to_owned()];
        let mut vals = vec![SqlValue::Integer(rowid)];
        for (name, v) in &row {
            if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(bad("a column name that is not a plain word"));
            }
            cols.push(format!("\"{name}\""));
            vals.push(from_json(v).ok_or_else(|| bad("a value that is no SQLite value"))?);
        }
        let marks: Vec<String> = (1..=vals.len()).map(|i| format!("?{i}")).collect();
        tx.execute(
            &format!(
                "INSERT INTO \"{table}\" ({}) VALUES ({})",
                cols.join(", "),
                marks.join(", ")
            ),
            rusqlite::params_from_iter(vals),
        )?;
        keys.set(table, rowid, &kv.key);
    }
    tx.commit()?;
    load_sequences(etcd, conn)?;
    Ok(keys)
}

impl Mirror {
    /// Starts recording the rows `conn` changes; `keys`: where the loaded rows are.
    pub(crate) fn attach(
        etcd: Arc<Etcd>,
        guard: Guard,
        conn: &Connection,
        keys: Keys,
    ) -> Result<Self, DbError> {
        let changed: Changed = Arc::default();
        let sink = changed.clone();
        conn.update_hook(Some(
            move |_: rusqlite::hooks::Action, _db: &str, table: &str, rowid: i64| {
                if let Ok(mut c) = sink.lock() {
                    c.insert((table.to_owned(), rowid));
                }
            },
        ));
        Ok(Self {
            etcd,
            guard,
            changed,
            keys,
            pks: primary_keys(conn)?,
            broken: None,
        })
    }

    /// Marks every row of every table changed (after a schema migration rewrote them), and
    /// learns the tables' keys again.
    pub(crate) fn mark_all(&mut self, conn: &Connection) -> Result<(), DbError> {
        self.pks = primary_keys(conn)?;
        let mut all = Vec::new();
        for t in tables(conn)? {
            let mut st = conn.prepare(&format!("SELECT rowid FROM \"{t}\""))?;
            let ids = st.query_map([], |r| r.get::<_, i64>(0))?;
            for id in ids {
                all.push((t.clone(), id?));
            }
        }
        let mut c = self.changed.lock().unwrap_or_else(|e| e.into_inner());
        c.extend(all);
        Ok(())
    }

    /// Writes every changed row to etcd, in transactions that hold only while this controller
    /// leads. After a failure nothing more is written (memory may be ahead of etcd).
    pub(crate) fn flush(&mut self, conn: &Connection) -> Result<(), DbError> {
        if let Some(why) = &self.broken {
            return Err(DbError::Lost(why.clone()));
        }
        let changed = std::mem::take(&mut *self.changed.lock().unwrap_or_else(|e| e.into_inner()));
        if changed.is_empty() {
            return Ok(());
        }
        // The state each key ends in: a put wins over a delete of the same key (its row moved
        // to another rowid, or another row took its rowid).
        let mut puts = BTreeMap::new();
        let mut deletes = BTreeSet::new();
        for (table, rowid) in &changed {
            match self.read_row(conn, table, *rowid)? {
                Some((key, value)) => {
                    if let Some(before) = self.keys.set(table, *rowid, &key) {
                        deletes.insert(before);
                    }
                    puts.insert(key, value);
                }
                None => {
                    if let Some(key) = self.keys.gone(table, *rowid) {
                        deletes.insert(key);
                    }
                }
            }
        }
        // AUTOINCREMENT's high-water marks (SQLite keeps them in a table no hook reports):
        // ids of pruned rows are not given out again after a failover.
        let tables: BTreeSet<&str> = changed.iter().map(|(t, _)| t.as_str()).collect();
        for t in tables {
            if let Some(seq) = sequence(conn, t)? {
                puts.insert(seq_key(&self.etcd, t), seq.to_string().into_bytes());
            }
        }
        let mut ops: Vec<Op> = deletes
            .into_iter()
            .filter(|k| !puts.contains_key(k))
            .map(Op::Delete)
            .collect();
        // The schema version last: a change that takes more than one transaction (a migration
        // rewrites every row) never shows a new version over rows not yet written.
        let version = format!("{}schema_version/", rows_prefix(&self.etcd));
        let (last, first): (Vec<_>, Vec<_>) =
            puts.into_iter().partition(|(k, _)| k.starts_with(&version));
        ops.extend(first.into_iter().chain(last).map(|(k, v)| Op::Put(k, v, 0)));
        let guard = [Compare::ValueIs(
            self.guard.key.clone(),
            self.guard.value.clone(),
        )];
        let result = within_runtime(|| {
            for chunk in chunks(&ops) {
                let (ok, _) = self.etcd.txn(&guard, chunk, &[])?;
                if !ok {
                    return Err(DbError::Lost(format!(
                        "another controller leads now ({} is no longer this one's)",
                        self.guard.key
                    )));
                }
            }
            Ok(())
        });
        if let Err(e) = &result {
            self.broken = Some(e.to_string());
        }
        result
    }
}

/// `ops` in transactions etcd takes: at most [`MAX_TXN_OPS`] operations and about
/// [`MAX_TXN_BYTES`] each.
fn chunks(ops: &[Op]) -> Vec<&[Op]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, op) in ops.iter().enumerate() {
        let size = match op {
            Op::Put(k, v, _) => k.len() + v.len(),
            Op::Delete(k) | Op::Get(k) => k.len(),
        };
        if i > start && (i - start >= MAX_TXN_OPS || bytes + size > MAX_TXN_BYTES) {
            out.push(&ops[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < ops.len() {
        out.push(&ops[start..]);
    }
    out
}

fn seq_key(etcd: &Etcd, table: &str) -> String {
    format!("{}/seq/{table}", etcd.prefix())
}

/// The AUTOINCREMENT high-water mark of `table`, if it has one.
fn sequence(conn: &Connection, table: &str) -> rusqlite::Result<Option<i64>> {
    let mut st = conn.prepare("SELECT seq FROM sqlite_sequence WHERE name = ?1")?;
    let mut rows = st.query([table])?;
    Ok(match rows.next()? {
        Some(r) => Some(r.get(0)?),
        None => None,
    })
}

/// Restores the AUTOINCREMENT high-water marks kept on etcd.
fn load_sequences(etcd: &Etcd, conn: &Connection) -> Result<(), DbError> {
    let prefix = format!("{}/seq/", etcd.prefix());
    for kv in etcd.range_prefix(&prefix)? {
        let table = &kv.key[prefix.len()..];
        let seq: i64 = std::str::from_utf8(&kv.value)
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| DbError::Bad(format!("etcd key {}: not a number", kv.key)))?;
        match sequence(conn, table)? {
            Some(now) if now >= seq => {}
            Some(_) => {
                conn.execute(
                    "UPDATE sqlite_sequence SET seq = ?2 WHERE name = ?1",
                    rusqlite::params![table, seq],
                )?;
            }
            None => {
                conn.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES (?1, ?2)",
                    rusqlite::params![table, seq],
                )?;
            }
        }
    }
    Ok(())
}

/// Runs blocking `f` so that a multi-threaded runtime moves its other tasks elsewhere.
fn within_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transactions_stay_within_etcds_limits() {
        let small: Vec<Op> = (0..250).map(|i| Op::Delete(format!("k{i}"))).collect();
        let sizes: Vec<usize> = chunks(&small).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![100, 100, 50]);
        let big: Vec<Op> = (0..5)
            .map(|i| Op::Put(format!("k{i}"), vec![0; 400 << 10], 0))
            .collect();
        let sizes: Vec<usize> = chunks(&big).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![2, 2, 1]);
        assert!(chunks(&[]).is_empty());
    }

    #[test]
    fn a_row_replaced_under_its_key_leaves_no_stale_delete() {
        let mut k = Keys::default();
        assert_eq!(k.set("t", 1, "a"), None);
        // INSERT OR REPLACE: the same key at a new rowid; rowid 1 is gone unreported.
        assert_eq!(k.set("t", 2, "a"), None);
        // Rowid 1 taken by another row: nothing of key "a" is deleted.
        assert_eq!(k.set("t", 1, "b"), None);
        assert_eq!(k.gone("t", 2), Some("a".to_owned()));
        assert_eq!(k.gone("t", 2), None);
        assert_eq!(k.len(), 1);
    }
}
