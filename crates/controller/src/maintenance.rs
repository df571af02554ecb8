//! Maintenance: an admin's copy of a service on a *shared* machine (`vmatrix maintain`), where
//! it is upgraded, debugged or patched without live traffic, then committed as a new version.
//! A maintenance instance is never routed by the switch and never seen by the policy (so never
//! moved, scaled or dropped); it ends with `vmatrix discard`, or when it stayed unused for the
//! configured idle limit. Also host maintenance's way back: `undrain`.

use std::sync::Arc;
use std::time::Instant;

use vmatrix_core::api::{
    AgentCommand, AgentReply, InstanceInfo, MachineInfo, MachineRole, MachineState, Purpose,
};
use vmatrix_core::{ImageRef, InstanceId, InstanceState, ServiceName, ServiceSpec};

use crate::agents::unexpected;

use crate::actions::Start;
use crate::control::{short_version, ControlError, Controller, Result};
use crate::db::InstanceRow;

/// How long a commit may take: the disk is read whole (through its base) and hashed.
const COMMIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

fn bytes(n: u64) -> String {
    if n >= 1 << 30 {
        format!("{:.1} GiB", n as f64 / f64::from(1u32 << 30))
    } else {
        format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20))
    }
}

/// Who asked, as a request may name it: 1 to 200 printable characters.
pub(crate) fn check_author(author: &str) -> Result<()> {
    if author.is_empty() || author.len() > 200 || author.chars().any(char::is_control) {
        return Err(ControlError::BadRequest(
            "author: 1 to 200 printable characters, e.g. ann@ops".into(),
        ));
    }
    Ok(())
}

impl Controller {
    /// A shared machine for a maintenance instance of `spec`: `on` (which must be a shared
    /// machine that is up), else the shared machine with the most free memory that holds it.
    pub(crate) fn place_shared(&self, spec: &ServiceSpec, on: Option<&str>) -> Result<MachineInfo> {
        self.place_shared_among(spec, on, None)
    }

    /// [`Controller::place_shared`] on any shared machine but `except`.
    pub(crate) fn place_shared_except(
        &self,
        spec: &ServiceSpec,
        except: &str,
    ) -> Result<MachineInfo> {
        self.place_shared_among(spec, None, Some(except))
    }

    fn place_shared_among(
        &self,
        spec: &ServiceSpec,
        on: Option<&str>,
        except: Option<&str>,
    ) -> Result<MachineInfo> {
        let machines: Vec<MachineInfo> = self
            .machines()?
            .into_iter()
            .filter(|m| Some(m.name.as_str()) != except)
            .collect();
        let shared = |m: &MachineInfo| m.role == MachineRole::Shared && m.state == MachineState::Up;
        if let Some(name) = on {
            let m = machines
                .iter()
                .find(|m| m.name == name)
                .ok_or_else(|| ControlError::NotFound(format!("no machine {name}")))?;
            if !shared(m) {
                return Err(ControlError::Conflict(format!(
                    "machine {name} is {} and {}: maintenance instances run on a shared machine \
                     that is up (start an agent with --role shared)",
                    match m.role {
                        MachineRole::Dedicated => "dedicated",
                        MachineRole::Shared => "shared",
                    },
                    m.state
                )));
            }
        }
        let placed = self.placed_use()?;
        let used = |m: &MachineInfo| placed.get(&m.name).map_or(0, |u| u.1);
        let mut candidates: Vec<(u64, &MachineInfo)> = machines
            .iter()
            .filter(|m| shared(m) && on.is_none_or(|name| m.name == name))
            .map(|m| (u64::from(m.memory_mib).saturating_sub(used(m)), m))
            .collect();
        if candidates.is_empty() {
            return Err(ControlError::Conflict(
                "no shared machine is up: maintenance runs on a machine with role shared \
                 (`vmatrix up --shared 1`, or an agent started with --role shared)"
                    .into(),
            ));
        }
        candidates.sort_by_key(|(free, m)| (std::cmp::Reverse(*free), m.name.clone()));
        let (free, m) = candidates[0];
        if free < u64::from(spec.memory_mib) {
            return Err(ControlError::Conflict(format!(
                "no shared machine has {} MiB free for {} (the most free: {} MiB on {}); \
                 discard a maintenance instance first",
                spec.memory_mib, spec.name, free, m.name
            )));
        }
        Ok(m.clone())
    }

    /// Starts a maintenance instance of `service` (of tag `version` of its image, or `NAME:TAG`
    /// of another image) on a shared machine.
    pub async fn maintain(
        &self,
        service: &ServiceName,
        version: Option<&str>,
        on: Option<&str>,
        why: &str,
    ) -> Result<InstanceInfo> {
        let spec = self.spec_of(service)?;
        let image = version
            .map(|v| {
                let full = if v.contains(':') {
                    v.to_owned()
                } else {
                    format!("{}:{v}", spec.image.name)
                };
                ImageRef::parse(&full).map_err(|e| {
                    ControlError::BadRequest(format!("--version {v}: {e} (give TAG or NAME:TAG)"))
                })
            })
            .transpose()?;
        let i = self
            .activate_as(service, on, why, Start::Maintenance { image })
            .await?;
        self.touch_maintenance(&i.id);
        Ok(i)
    }

    /// Stores the disk of instance `id` as a new version `tag` of its image (the instance keeps
    /// running; its guest stops only while its disk is copied).
    pub async fn commit(
        &self,
        id: &InstanceId,
        tag: &ImageRef,
        message: Option<&str>,
        author: &str,
    ) -> Result<String> {
        self.timed("commit", self.commit_now(id, tag, message, author))
            .await
    }

    async fn commit_now(
        &self,
        id: &InstanceId,
        tag: &ImageRef,
        message: Option<&str>,
        author: &str,
    ) -> Result<String> {
        let _busy = self.claim(id)?;
        let row = self.row(id)?;
        if !matches!(
            row.info.state,
            InstanceState::Running | InstanceState::Paused
        ) {
            return Err(ControlError::Conflict(format!(
                "instance {id} is {}: only a running or paused instance's disk is committed",
                row.info.state.as_str()
            )));
        }
        check_author(author)?;
        if message.is_some_and(|m| m.len() > 4096) {
            return Err(ControlError::BadRequest(
                "--message: at most 4096 bytes".into(),
            ));
        }
        let machine = self.machine(&row.info.machine)?;
        let what = format!("commit {id} as {tag}");
        let why = message.unwrap_or("operator request");
        self.event(author, &what, why, "started");
        let command = AgentCommand::Commit {
            id: id.clone(),
            generation: row.info.generation,
            image: tag.clone(),
            author: author.to_owned(),
            message: message.map(str::to_owned),
        };
        let reply = self
            .send_within(&machine, &command, COMMIT_LIMIT)
            .await
            .and_then(|r| match r {
                AgentReply::Committed(c) => Ok(c),
                other => Err(unexpected(&machine, "committed", &other)),
            });
        if row.info.purpose == Purpose::Maintenance {
            self.touch_maintenance(id);
        }
        match reply {
            Ok(c) => {
                let outcome = if c.published {
                    format!(
                        "ok: {} is version {} (from {}): {} new chunk(s), {} stored, of {}; \
                         the guest paused {} ms{}; {:.1} s",
                        c.image,
                        short_version(&c.version),
                        short_version(&c.parent),
                        c.new_chunks,
                        bytes(c.new_stored_bytes),
                        bytes(c.logical_bytes),
                        c.paused_ms,
                        match c.frozen {
                            Some(n) =>
                                format!(" with {n} file system(s) frozen by its guest agent"),
                            None => String::new(),
                        },
                        c.seconds
                    )
                } else {
                    format!(
                        "ok: nothing changed: {} already is version {}",
                        c.image,
                        short_version(&c.version)
                    )
                };
                self.event(author, &what, why, &outcome);
                Ok(outcome)
            }
            Err(e) => {
                self.event(author, &what, why, &format!("failed: {e}"));
                Err(e)
            }
        }
    }

    /// Gives a drained machine back to the policy.
    pub fn undrain(&self, machine: &str, why: &str) -> Result<String> {
        let m = self
            .machines()?
            .into_iter()
            .find(|m| m.name == machine)
            .ok_or_else(|| ControlError::NotFound(format!("no machine {machine}")))?;
        if m.state != MachineState::Draining {
            return Ok(format!("{machine} is {}: nothing to undrain", m.state));
        }
        self.db(|d| d.set_draining(machine, false))?;
        self.event("api", &format!("undrain {machine}"), why, "ok");
        Ok(format!("{machine} is back in the pool"))
    }

    /// Records that an admin used maintenance instance `id` now (console, commit).
    pub(crate) fn touch_maintenance(&self, id: &InstanceId) {
        self.maintenance_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), Instant::now());
    }

    /// Discards the maintenance instances unused for longer than the idle limit (if one is
    /// set). One the controller has not seen used since it started counts from then.
    pub(crate) fn expire_maintenance(self: &Arc<Self>, rows: &[InstanceRow]) {
        let Some(limit) = *self
            .maintenance_idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        else {
            return;
        };
        let mut used = self
            .maintenance_used
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        used.retain(|id, _| rows.iter().any(|r| r.info.id == *id));
        for r in rows {
            if r.info.purpose != Purpose::Maintenance || !r.info.state.is_placed() {
                continue;
            }
            let since = *used.entry(r.info.id.clone()).or_insert_with(Instant::now);
            if since.elapsed() < limit {
                continue;
            }
            used.remove(&r.info.id);
            let (me, id) = (self.clone(), r.info.id.clone());
            let why = format!(
                "maintenance instance unused (no console, no commit) for {}s: the idle limit",
                limit.as_secs()
            );
            self.spawn_work(async move { me.discard(&id, &why).await.map(drop) });
        }
    }
}
