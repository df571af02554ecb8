//! The controller's state: SQLite, with numbered schema migrations. Everything the
//! controller knows survives a `kill -9`: services (desired), machines and instances
//! (observed and placed), and the event log. Embedded (a file), or on etcd for controllers in
//! high availability: the same database in memory, every change written to etcd before the
//! call returns (`mirror.rs`).

use std::path::Path;
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};
use vmatrix_core::api::MachineState;
use vmatrix_core::api::{
    Event, InstanceInfo, MachineInfo, MachineRole, Purpose, RolloutStatus, SavedState,
};
use vmatrix_core::{InstanceId, InstanceState, ServiceName, ServiceSpec};

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite failed.
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored row does not parse.
    #[error("state database holds a bad row: {0}")]
    Bad(String),
    /// etcd failed.
    #[error("state on etcd: {0}")]
    Etcd(#[from] crate::etcd::EtcdError),
    /// This controller may no longer write its state on etcd (it lost the lead, or a write
    /// failed and memory may be ahead of etcd): it must stop.
    #[error("state on etcd: {0}; this controller stops (another takes over, or restart it)")]
    Lost(String),
}

type Result<T> = std::result::Result<T, DbError>;

const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE services (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
     CREATE TABLE machines (name TEXT PRIMARY KEY, address TEXT NOT NULL, role TEXT NOT NULL,
        vcpus INTEGER NOT NULL, memory_mib INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL,
        draining INTEGER NOT NULL DEFAULT 0);
     CREATE TABLE instances (id TEXT PRIMARY KEY, service TEXT NOT NULL, machine TEXT NOT NULL,
        state TEXT NOT NULL, generation INTEGER NOT NULL, endpoint TEXT NOT NULL,
        version TEXT NOT NULL, saved TEXT, seq INTEGER NOT NULL);
     CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL,
        who TEXT NOT NULL, what TEXT NOT NULL, why TEXT NOT NULL, outcome TEXT NOT NULL);",
    // 2: services marked dropped (the switch refuses their requests).
    "CREATE TABLE dropped (service TEXT PRIMARY KEY);",
    // 3: who dropped it: the policy (short of capacity: only the excess is refused, and the
    // policy may undrop it) or an operator (everything is refused until an operator undrops).
    "ALTER TABLE dropped ADD COLUMN by_policy INTEGER NOT NULL DEFAULT 0;
     UPDATE dropped SET by_policy = 1 WHERE (SELECT who FROM events
        WHERE what = 'drop ' || dropped.service ORDER BY id DESC LIMIT 1) = 'policy';",
    // 4: pinned versions: `image` is the NAME:TAG an instance was activated from, `version`
    // the version id it resolved to (older rows kept the tag in `version`: it moves to
    // `image`, and the id is learnt from the agent's next report). Durable operations.
    "ALTER TABLE instances ADD COLUMN image TEXT NOT NULL DEFAULT '';
     UPDATE instances SET image = version, version = '' WHERE version LIKE '%:%';
     CREATE TABLE operations (id INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL,
        state TEXT NOT NULL, result TEXT NOT NULL DEFAULT '', created_ms INTEGER NOT NULL,
        finished_ms INTEGER);",
    // 5: operators' pins (an explicit placement holds until `until_ms`), apart from the rows
    // that operations rewrite.
    "CREATE TABLE pins (instance TEXT PRIMARY KEY, until_ms INTEGER NOT NULL);",
    // 6: what an instance is for (`live`, or an admin's `maintenance` copy).
    "ALTER TABLE instances ADD COLUMN purpose TEXT NOT NULL DEFAULT 'live';",
    // 7: rollouts (one per service, the last; JSON `RolloutStatus`), and the version each
    // service runs after a rollout, with the one before (what `rollback` returns to).
    "CREATE TABLE rollouts (service TEXT PRIMARY KEY, status TEXT NOT NULL);
     CREATE TABLE service_versions (service TEXT PRIMARY KEY, image TEXT NOT NULL,
        version TEXT NOT NULL, previous_image TEXT NOT NULL, previous_version TEXT NOT NULL);",
    // 8: each instance's own address on the service network (bridged networking).
    "ALTER TABLE instances ADD COLUMN address TEXT NOT NULL DEFAULT '';",
    // 9: each instance's slot in its service (services with volumes; 0: none).
    "ALTER TABLE instances ADD COLUMN slot INTEGER NOT NULL DEFAULT 0;",
    // 10: each machine's own credential, given when it joined (bound to its name).
    "CREATE TABLE credentials (machine TEXT PRIMARY KEY, secret TEXT NOT NULL,
        joined_ms INTEGER NOT NULL);",
    // 11: names an operator approved to join, and names that asked and wait.
    "CREATE TABLE approved (machine TEXT PRIMARY KEY, at_ms INTEGER NOT NULL);
     CREATE TABLE pending (machine TEXT PRIMARY KEY, address TEXT NOT NULL,
        asked_ms INTEGER NOT NULL);",
    // 12: the matrix's certificate authority (one row): it signs each machine's certificate.
    "CREATE TABLE authority (id INTEGER PRIMARY KEY CHECK (id = 1), cert TEXT NOT NULL,
        key TEXT NOT NULL);",
];

/// The version a service runs after a rollout, and the one before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceVersion {
    /// `NAME:TAG`.
    pub image: String,
    /// Version id.
    pub version: String,
    /// Before the last rollout: `NAME:TAG`.
    pub previous_image: String,
    /// Before the last rollout: version id.
    pub previous_version: String,
}

/// Where a durable operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpState {
    /// Recorded, its task runs.
    Running,
    /// It ended well.
    Done,
    /// It failed; the instance was left as it was.
    Failed,
    /// The controller stopped while it ran; the instance was settled from what its machines
    /// report.
    Interrupted,
}

impl OpState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        [Self::Running, Self::Done, Self::Failed, Self::Interrupted]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

/// One durable operation.
#[derive(Debug, Clone, PartialEq)]
pub struct OpRow {
    /// Its id.
    pub id: u64,
    /// What was asked.
    pub op: vmatrix_core::api::Operation,
    /// Where it is.
    pub state: OpState,
    /// Its outcome, once settled.
    pub result: String,
}

/// One instance row.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRow {
    /// The API view.
    pub info: InstanceInfo,
    /// Where its suspended state is.
    pub saved: Option<SavedState>,
    /// Per-service sequence number used in its id.
    pub seq: u64,
}

/// The state database.
pub struct Db {
    conn: Connection,
    /// On etcd: where changes go.
    mirror: Option<crate::mirror::Mirror>,
}

/// Migrates `conn` up to schema version `upto`; how many migrations ran.
fn migrate(conn: &Connection, upto: usize) -> Result<usize> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let current: i64 = conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_version",
        [],
        |r| r.get(0),
    )?;
    let mut ran = 0;
    for (i, m) in MIGRATIONS
        .iter()
        .enumerate()
        .take(upto)
        .skip(current as usize)
    {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(m)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            params![i as i64 + 1],
        )?;
        tx.commit()?;
        ran += 1;
    }
    Ok(ran)
}

impl Db {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        migrate(&conn, MIGRATIONS.len())?;
        Ok(Self { conn, mirror: None })
    }

    /// Loads the state kept on etcd (under its prefix) and keeps it there: every change is
    /// written back, guarded by `guard` (this controller's leadership key), before the call
    /// that made it returns to [`Db::flush`]'s caller. State written by an older schema is
    /// migrated and written back whole.
    pub fn open_etcd(etcd: Arc<crate::etcd::Etcd>, guard: crate::mirror::Guard) -> Result<Self> {
        let stored = crate::mirror::stored_version(&etcd)?;
        if stored > MIGRATIONS.len() {
            return Err(DbError::Bad(format!(
                "the state under {} on etcd has schema version {stored}, newer than this \
                 vMatrix's {}: run the newer version",
                etcd.prefix(),
                MIGRATIONS.len()
            )));
        }
        let conn = Connection::open_in_memory()?;
        migrate(&conn, stored)?;
        conn.execute("DELETE FROM schema_version", [])?;
        let keys = crate::mirror::load(&etcd, &conn)?;
        let rows = keys.len();
        let mut mirror = crate::mirror::Mirror::attach(etcd, guard, &conn, keys)?;
        let mut db = Self { conn, mirror: None };
        if migrate(&db.conn, MIGRATIONS.len())? > 0 {
            mirror.mark_all(&db.conn)?;
        }
        db.mirror = Some(mirror);
        db.flush()?;
        tracing::info!("state loaded from etcd: {rows} rows, schema version {stored}");
        Ok(db)
    }

    /// Writes what changed since the last call to etcd (nothing to do for the embedded store,
    /// whose statements are durable when they return). An error means this controller must
    /// stop: it may no longer write its state.
    pub fn flush(&mut self) -> Result<()> {
        match &mut self.mirror {
            Some(m) => m.flush(&self.conn),
            None => Ok(()),
        }
    }

    /// Every row of every table as JSON, in order (tests compare stores with it).
    pub fn dump(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for t in crate::mirror::tables(&self.conn)? {
            let mut st = self
                .conn
                .prepare(&format!("SELECT * FROM \"{t}\" ORDER BY rowid"))?;
            let names: Vec<String> = st.column_names().iter().map(|s| s.to_string()).collect();
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let mut obj = serde_json::Map::new();
                for (i, n) in names.iter().enumerate() {
                    obj.insert(n.clone(), crate::mirror::to_json(r.get_ref(i)?));
                }
                out.push(format!("{t} {}", serde_json::Value::Object(obj)));
            }
        }
        Ok(out)
    }

    /// Replaces the desired services.
    pub fn set_services(&self, services: &[ServiceSpec]) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        // A WHERE clause: a bare DELETE empties the table without naming its rows, and the
        // state on etcd learns of changes row by row (mirror.rs).
        tx.execute("DELETE FROM services WHERE name IS NOT NULL", [])?;
        for s in services {
            let spec = serde_json::to_string(s).map_err(|e| DbError::Bad(e.to_string()))?;
            tx.execute(
                "INSERT INTO services (name, spec) VALUES (?1, ?2)",
                params![s.name.as_str(), spec],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Records a service's rollout.
    pub fn put_rollout(&self, r: &RolloutStatus) -> Result<()> {
        let status = serde_json::to_string(r).map_err(|e| DbError::Bad(e.to_string()))?;
        self.conn.execute(
            "INSERT OR REPLACE INTO rollouts (service, status) VALUES (?1, ?2)",
            params![r.service.as_str(), status],
        )?;
        Ok(())
    }

    /// Every service's last rollout.
    pub fn rollouts(&self) -> Result<Vec<RolloutStatus>> {
        let mut st = self
            .conn
            .prepare("SELECT status FROM rollouts ORDER BY service")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        rows.map(|r| serde_json::from_str(&r?).map_err(|e| DbError::Bad(e.to_string())))
            .collect()
    }

    /// Records the version a service runs now (and the one before).
    pub fn set_service_version(&self, service: &ServiceName, v: &ServiceVersion) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO service_versions (service, image, version, previous_image, previous_version)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![service.as_str(), v.image, v.version, v.previous_image, v.previous_version],
        )?;
        Ok(())
    }

    /// The version a service runs after its last rollout, if it had one.
    pub fn service_version(&self, service: &ServiceName) -> Result<Option<ServiceVersion>> {
        let mut st = self.conn.prepare(
            "SELECT image, version, previous_image, previous_version FROM service_versions WHERE service = ?1",
        )?;
        let mut rows = st.query_map(params![service.as_str()], |r| {
            Ok(ServiceVersion {
                image: r.get(0)?,
                version: r.get(1)?,
                previous_image: r.get(2)?,
                previous_version: r.get(3)?,
            })
        })?;
        Ok(rows.next().transpose()?)
    }

    /// The desired services.
    pub fn services(&self) -> Result<Vec<ServiceSpec>> {
        let mut st = self
            .conn
            .prepare("SELECT spec FROM services ORDER BY name")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        rows.map(|r| {
            let s = r?;
            serde_json::from_str(&s).map_err(|e| DbError::Bad(e.to_string()))
        })
        .collect()
    }

    /// Marks or clears a service as dropped; true when that changed anything. The policy
    /// neither overrides nor clears an operator's drop; an operator's drop or undrop overrides
    /// the policy's.
    pub fn set_dropped(
        &self,
        service: &ServiceName,
        dropped: bool,
        by_policy: bool,
    ) -> Result<bool> {
        let changed = if dropped {
            self.conn.execute(
                "INSERT INTO dropped (service, by_policy) VALUES (?1, ?2)
                 ON CONFLICT(service) DO UPDATE SET by_policy = 0
                 WHERE excluded.by_policy = 0 AND dropped.by_policy = 1",
                params![service.as_str(), by_policy],
            )?
        } else if by_policy {
            self.conn.execute(
                "DELETE FROM dropped WHERE service = ?1 AND by_policy = 1",
                params![service.as_str()],
            )?
        } else {
            self.conn.execute(
                "DELETE FROM dropped WHERE service = ?1",
                params![service.as_str()],
            )?
        };
        Ok(changed > 0)
    }

    /// Services marked dropped, and whether the policy did it.
    pub fn dropped(&self) -> Result<Vec<(String, bool)>> {
        let mut st = self
            .conn
            .prepare("SELECT service, by_policy FROM dropped ORDER BY service")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records a heartbeat.
    pub fn upsert_machine(&self, m: &MachineInfo, now_ms: u64) -> Result<()> {
        let role = match m.role {
            MachineRole::Dedicated => "dedicated",
            MachineRole::Shared => "shared",
        };
        self.conn.execute(
            "INSERT INTO machines (name, address, role, vcpus, memory_mib, last_seen_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(name) DO UPDATE SET address = ?2, role = ?3, vcpus = ?4, memory_mib = ?5, last_seen_ms = ?6",
            params![m.name, m.address, role, m.vcpus, m.memory_mib, now_ms as i64],
        )?;
        Ok(())
    }

    /// Every machine's credential: (machine, secret).
    pub fn credentials(&self) -> Result<Vec<(String, String)>> {
        let mut st = self
            .conn
            .prepare("SELECT machine, secret FROM credentials ORDER BY machine")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Records machine `name`'s credential; false (and nothing changed) if it has one.
    pub fn add_credential(&self, name: &str, secret: &str, now_ms: u64) -> Result<bool> {
        Ok(self.conn.execute(
            "INSERT INTO credentials (machine, secret, joined_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(machine) DO NOTHING",
            params![name, secret, now_ms as i64],
        )? > 0)
    }

    /// The matrix's authority: (certificate, key), PEM.
    pub fn authority(&self) -> Result<Option<(String, String)>> {
        Ok(self
            .conn
            .query_row("SELECT cert, key FROM authority WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?)
    }

    /// Records the matrix's authority unless there is one (two controllers may race).
    pub fn add_authority(&self, cert: &str, key: &str) -> Result<bool> {
        Ok(self.conn.execute(
            "INSERT INTO authority (id, cert, key) VALUES (1, ?1, ?2) ON CONFLICT(id) DO NOTHING",
            params![cert, key],
        )? > 0)
    }

    /// Whether an operator approved name `name` to join.
    pub fn is_approved(&self, name: &str) -> Result<bool> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM approved WHERE machine = ?1",
            params![name],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    /// Approves name `name` to join (it leaves the pending list).
    pub fn approve(&self, name: &str, now_ms: u64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO approved (machine, at_ms) VALUES (?1, ?2) ON CONFLICT(machine) DO NOTHING",
            params![name, now_ms as i64],
        )?;
        self.conn
            .execute("DELETE FROM pending WHERE machine = ?1", params![name])?;
        Ok(())
    }

    /// Records that `name` asked to join from `address` and waits.
    pub fn ask(&self, name: &str, address: &str, now_ms: u64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO pending (machine, address, asked_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(machine) DO UPDATE SET address = ?2, asked_ms = ?3",
            params![name, address, now_ms as i64],
        )?;
        Ok(())
    }

    /// Names that asked to join and wait: (name, address, asked_ms).
    pub fn pending(&self) -> Result<Vec<(String, String, u64)>> {
        let mut st = self
            .conn
            .prepare("SELECT machine, address, asked_ms FROM pending ORDER BY machine")?;
        let rows = st.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Forgets machine `name`'s credential, approval and request to join; whether it had any.
    pub fn forget(&self, name: &str) -> Result<bool> {
        let mut n = 0;
        for table in ["credentials", "approved", "pending"] {
            n += self.conn.execute(
                &format!("DELETE FROM {table} WHERE machine = ?1"),
                params![name],
            )?;
        }
        Ok(n > 0)
    }

    /// Marks a machine as draining (no new placements).
    pub fn set_draining(&self, name: &str, draining: bool) -> Result<bool> {
        Ok(self.conn.execute(
            "UPDATE machines SET draining = ?2 WHERE name = ?1",
            params![name, draining as i64],
        )? > 0)
    }

    /// Every machine, with `state` computed from its last heartbeat.
    pub fn machines(&self, now_ms: u64, down_after_ms: u64) -> Result<Vec<MachineInfo>> {
        let mut st = self.conn.prepare(
            "SELECT name, address, role, vcpus, memory_mib, last_seen_ms, draining FROM machines ORDER BY name",
        )?;
        let rows = st.query_map([], |r| {
            let last: i64 = r.get(5)?;
            let draining: i64 = r.get(6)?;
            let role: String = r.get(2)?;
            Ok(MachineInfo {
                name: r.get(0)?,
                address: r.get(1)?,
                role: if role == "shared" {
                    MachineRole::Shared
                } else {
                    MachineRole::Dedicated
                },
                vcpus: r.get(3)?,
                memory_mib: r.get(4)?,
                state: if now_ms.saturating_sub(last as u64) > down_after_ms {
                    MachineState::Down
                } else if draining != 0 {
                    MachineState::Draining
                } else {
                    MachineState::Up
                },
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Pins `id` where it is until `until_ms` (Unix ms).
    pub fn pin(&self, id: &InstanceId, until_ms: u64) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO pins (instance, until_ms) VALUES (?1, ?2)",
            params![id.as_str(), until_ms as i64],
        )?;
        Ok(())
    }

    /// Removes `id`'s pin; false when it had none.
    pub fn unpin(&self, id: &InstanceId) -> Result<bool> {
        Ok(self
            .conn
            .execute("DELETE FROM pins WHERE instance = ?1", params![id.as_str()])?
            > 0)
    }

    /// Every instance that is not discarded.
    pub fn instances(&self) -> Result<Vec<InstanceRow>> {
        let mut st = self.conn.prepare(
            "SELECT id, service, machine, state, generation, endpoint, version, saved, seq, image,
                    COALESCE(pins.until_ms, 0), purpose, address, slot FROM instances LEFT JOIN pins ON pins.instance = instances.id
             WHERE state != 'discarded' ORDER BY service, seq",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, Option<String>>(7)?,
                r.get::<_, i64>(8)?,
                r.get::<_, String>(9)?,
                r.get::<_, i64>(10)?,
                r.get::<_, String>(11)?,
                r.get::<_, String>(12)?,
                r.get::<_, i64>(13)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (
                id,
                service,
                machine,
                state,
                generation,
                endpoint,
                version,
                saved,
                seq,
                image,
                pin,
                purpose,
                address,
                slot,
            ) = row?;
            let bad = |what: &str| DbError::Bad(format!("instance {id}: {what}"));
            out.push(InstanceRow {
                info: InstanceInfo {
                    id: InstanceId::new(id.clone()).map_err(|_| bad("id"))?,
                    service: ServiceName::new(service).map_err(|_| bad("service"))?,
                    image,
                    version,
                    machine,
                    state: InstanceState::parse(&state).ok_or_else(|| bad("state"))?,
                    endpoint,
                    generation: generation as u64,
                    pinned_until_ms: pin.max(0) as u64,
                    purpose: Purpose::parse(&purpose).ok_or_else(|| bad("purpose"))?,
                    address: if address.is_empty() {
                        None
                    } else {
                        Some(address.parse().map_err(|_| bad("address"))?)
                    },
                    slot: u32::try_from(slot).map_err(|_| bad("slot"))?,
                },
                saved: saved
                    .map(|s| serde_json::from_str(&s))
                    .transpose()
                    .map_err(|_| bad("saved state"))?,
                seq: seq as u64,
            });
        }
        Ok(out)
    }

    /// One instance.
    pub fn instance(&self, id: &InstanceId) -> Result<Option<InstanceRow>> {
        Ok(self.instances()?.into_iter().find(|r| r.info.id == *id))
    }

    /// Inserts or replaces an instance row.
    pub fn put_instance(&self, row: &InstanceRow) -> Result<()> {
        let saved = row
            .saved
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| DbError::Bad(e.to_string()))?;
        let i = &row.info;
        self.conn.execute(
            "INSERT OR REPLACE INTO instances (id, service, machine, state, generation, endpoint, version, saved, seq, image, purpose, address, slot)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![i.id.as_str(), i.service.as_str(), i.machine, i.state.as_str(), i.generation as i64, i.endpoint, i.version, saved, row.seq as i64, i.image, i.purpose.as_str(), i.address.map(|a| a.to_string()).unwrap_or_default(), i64::from(i.slot)],
        )?;
        Ok(())
    }

    /// The service-network addresses not to give out: those of every instance row, discarded
    /// ones included until their rows are pruned (a day later) — a VM whose machine was lost may
    /// still run with its address, and hosts may still send to it.
    pub fn addresses_in_use(&self) -> Result<std::collections::HashSet<std::net::Ipv4Addr>> {
        let mut st = self
            .conn
            .prepare("SELECT address FROM instances WHERE address != ''")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = std::collections::HashSet::new();
        for a in rows {
            if let Ok(a) = a?.parse() {
                out.insert(a);
            }
        }
        Ok(out)
    }

    /// The next per-service sequence number (ids are never reused).
    pub fn next_seq(&self, service: &ServiceName) -> Result<u64> {
        let n: i64 = self.conn.query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM instances WHERE service = ?1",
            params![service.as_str()],
            |r| r.get(0),
        )?;
        Ok(n as u64 + 1)
    }

    /// Appends to the event log.
    pub fn event(
        &self,
        at_ms: u64,
        who: &str,
        what: &str,
        why: &str,
        outcome: &str,
    ) -> Result<u64> {
        self.conn.execute(
            "INSERT INTO events (at_ms, who, what, why, outcome) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![at_ms as i64, who, what, why, outcome],
        )?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    /// Events after `after`, oldest first, at most `limit`.
    pub fn events(&self, after: u64, limit: u32) -> Result<Vec<Event>> {
        let mut st = self.conn.prepare(
            "SELECT id, at_ms, who, what, why, outcome FROM events WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = st.query_map(params![after as i64, limit], |r| {
            Ok(Event {
                id: r.get::<_, i64>(0)? as u64,
                at_ms: r.get::<_, i64>(1)? as u64,
                who: r.get(2)?,
                what: r.get(3)?,
                why: r.get(4)?,
                outcome: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records a new operation (state `running`); returns its id.
    pub fn add_op(&self, op: &vmatrix_core::api::Operation, now_ms: u64) -> Result<u64> {
        let text = serde_json::to_string(op).map_err(|e| DbError::Bad(e.to_string()))?;
        self.conn.execute(
            "INSERT INTO operations (op, state, created_ms) VALUES (?1, 'running', ?2)",
            params![text, now_ms as i64],
        )?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    /// Settles an operation, once: false if it was settled already.
    pub fn settle_op(&self, id: u64, state: OpState, result: &str, now_ms: u64) -> Result<bool> {
        Ok(self.conn.execute(
            "UPDATE operations SET state = ?2, result = ?3, finished_ms = ?4
             WHERE id = ?1 AND state = 'running'",
            params![id as i64, state.as_str(), result, now_ms as i64],
        )? > 0)
    }

    /// One operation.
    pub fn op(&self, id: u64) -> Result<Option<OpRow>> {
        Ok(self.ops_where("id = ?1", params![id as i64])?.pop())
    }

    /// Operations still `running` (after a restart: the ones whose task died with the last
    /// process).
    pub fn running_ops(&self) -> Result<Vec<OpRow>> {
        self.ops_where("state = 'running'", [])
    }

    fn ops_where(&self, filter: &str, p: impl rusqlite::Params) -> Result<Vec<OpRow>> {
        let mut st = self.conn.prepare(&format!(
            "SELECT id, op, state, result FROM operations WHERE {filter} ORDER BY id"
        ))?;
        let rows = st.query_map(p, |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, op, state, result) = row?;
            let bad = |what: &str| DbError::Bad(format!("operation {id}: {what}"));
            out.push(OpRow {
                id: id as u64,
                op: serde_json::from_str(&op).map_err(|_| bad("body"))?,
                state: OpState::parse(&state).ok_or_else(|| bad("state"))?,
                result,
            });
        }
        Ok(out)
    }

    /// Forgets what is older than `before_ms`: settled operations, discarded instances, and
    /// events beyond the newest `keep_events`.
    pub fn prune(&self, before_ms: u64, keep_events: u64) -> Result<()> {
        self.conn.execute(
            "DELETE FROM operations WHERE state != 'running' AND finished_ms < ?1",
            params![before_ms as i64],
        )?;
        // Discarded rows keep their seq only while it is the service's highest (ids are never
        // reused).
        self.conn.execute(
            "DELETE FROM instances WHERE state = 'discarded' AND seq < (SELECT MAX(seq) FROM
             instances AS i WHERE i.service = instances.service)",
            [],
        )?;
        self.conn.execute(
            "DELETE FROM pins WHERE until_ms < ?1 OR instance NOT IN
             (SELECT id FROM instances WHERE state != 'discarded')",
            params![crate::control::now_ms() as i64],
        )?;
        self.conn.execute(
            "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?1",
            params![keep_events as i64],
        )?;
        Ok(())
    }

    /// A machine by name.
    pub fn machine(
        &self,
        name: &str,
        now_ms: u64,
        down_after_ms: u64,
    ) -> Result<Option<MachineInfo>> {
        Ok(self
            .machines(now_ms, down_after_ms)?
            .into_iter()
            .find(|m| m.name == name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operators_drop_outranks_the_policys_and_only_changes_are_reported() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Db::open(&dir.path().join("state.db")).expect("open");
        let web = ServiceName::new("web").expect("name");
        assert!(db.set_dropped(&web, true, true).unwrap(), "policy drops");
        assert!(
            !db.set_dropped(&web, true, true).unwrap(),
            "again: nothing changes"
        );
        assert_eq!(db.dropped().unwrap(), vec![("web".to_owned(), true)]);
        assert!(
            db.set_dropped(&web, true, false).unwrap(),
            "the operator takes it over"
        );
        assert_eq!(db.dropped().unwrap(), vec![("web".to_owned(), false)]);
        assert!(!db.set_dropped(&web, true, true).unwrap());
        assert!(
            !db.set_dropped(&web, false, true).unwrap(),
            "the policy cannot clear it"
        );
        assert_eq!(db.dropped().unwrap().len(), 1);
        assert!(
            db.set_dropped(&web, false, false).unwrap(),
            "the operator can"
        );
        assert!(db.dropped().unwrap().is_empty());
    }
}
