//! Pins: versions that something outside the repository uses right now — an agent's running
//! instances read their base lazily through an export, so the version must outlive any tag
//! move or removal. Each holder (one per agent) owns one object `pins/<holder>.json` listing
//! its versions; GC treats a pinned version like a tagged one.
//!
//! A holder that disappears for good leaves its pins behind: GC keeps those versions (never
//! lose a server's disk) and reports who holds them; `Repository::set_pins(holder, &[])`
//! releases them.

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::repo::Repository;

/// One holder's pins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pins {
    /// Who holds them (`agent-rm1`).
    pub holder: String,
    /// Version ids in use.
    pub versions: Vec<String>,
    /// When they were last written (Unix seconds).
    pub updated: u64,
}

fn key(holder: &str) -> Result<String> {
    if holder.is_empty()
        || holder.len() > 128
        || !holder
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || holder.starts_with('.')
    {
        return Err(StoreError::BadName(format!(
            "pin holder {holder:?}: use 1-128 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(format!("pins/{holder}.json"))
}

impl Repository {
    /// Replaces `holder`'s pins with `versions` (durably); an empty list removes them.
    pub fn set_pins(&self, holder: &str, versions: &[String]) -> Result<()> {
        let key = key(holder)?;
        if versions.is_empty() {
            return self.backend.delete(&key);
        }
        let pins = Pins {
            holder: holder.to_owned(),
            versions: versions.to_vec(),
            updated: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let bytes = serde_json::to_vec(&pins).map_err(|e| StoreError::Corrupt {
            what: key.clone(),
            reason: e.to_string(),
        })?;
        self.backend.put_durable(&key, &bytes)
    }

    /// Every holder's pins.
    pub fn pins(&self) -> Result<Vec<Pins>> {
        let mut out = Vec::new();
        for (key, _) in self.backend.list("pins/")? {
            let Some(bytes) = self.backend.get(&key)? else {
                continue;
            };
            let pins: Pins = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                what: key.clone(),
                reason: e.to_string(),
            })?;
            out.push(pins);
        }
        Ok(out)
    }
}
