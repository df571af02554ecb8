//! `commit`: the instance's disk, as its guest sees it now, stored as a new version derived
//! from the version it runs. The guest stops only while its overlay is copied; the copy is read
//! through the base (this machine's export of it) and only the chunks it changed are new.

use std::sync::Arc;
use std::time::Instant;

use vmatrix_core::api::{AgentReply, CommitReport};
use vmatrix_core::{ImageRef, InstanceId};
use vmatrix_store::CommitInfo;

use crate::machine::{lock, Agent, AgentError, Held, Result};

impl Agent {
    pub(crate) async fn commit(
        self: Arc<Self>,
        id: InstanceId,
        generation: u64,
        image: ImageRef,
        author: String,
        message: Option<String>,
    ) -> Result<AgentReply> {
        self.fence(&id, generation)?;
        let started = Instant::now();
        let parent = {
            let slots = lock(&self.slots);
            let s = slots
                .get(&id)
                .ok_or_else(|| AgentError::Unknown(id.clone()))?;
            s.version.clone()
        };
        let scratch = self.scratch_dir()?;
        let copy = scratch.join(format!("commit-{id}-{generation}.disk"));
        // The VM leaves its slot only for the copy; its state does not change.
        let Held::Guest(mut guest) = self.take_with(&id, generation, "commit", None)? else {
            return Err(AgentError::Other(format!("instance {id} has no VM here")));
        };
        let copied = guest.copy_disk(&copy).await;
        if !self.put_back(&id, generation, Held::Guest(guest), |_| Ok(())) {
            let _ = std::fs::remove_file(&copy);
            return Err(AgentError::Unknown(id));
        }
        let (format, copied) = match copied {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&copy);
                return Err(e.into());
            }
        };
        let repo = self.repo.clone();
        let (disk, tag) = (copy.clone(), image.clone());
        let parent_for = parent.clone();
        let stored = tokio::task::spawn_blocking(move || {
            repo.commit(
                &disk,
                format,
                &tag,
                CommitInfo {
                    parent: (!parent_for.is_empty()).then_some(parent_for.as_str()),
                    author: &author,
                    message: message.as_deref(),
                },
                &scratch,
                &|_| {},
            )
        })
        .await;
        let _ = std::fs::remove_file(&copy);
        let report = stored.map_err(|e| AgentError::Other(format!("the commit's task: {e}")))??;
        tracing::info!(
            instance = %id,
            image = %image,
            version = %report.version,
            new_chunks = report.new_chunks,
            "committed"
        );
        Ok(AgentReply::Committed(CommitReport {
            image: image.to_string(),
            version: report.version,
            parent,
            published: report.published,
            logical_bytes: report.logical_bytes,
            new_chunks: report.new_chunks,
            new_stored_bytes: report.new_stored_bytes,
            paused_ms: copied.paused.as_millis() as u64,
            frozen: copied.frozen,
            seconds: started.elapsed().as_secs_f64(),
        }))
    }
}
