//! Instance states and the one function that says which moves between them are legal.
//!
//! ```text
//!            activate                ready
//!  (none) ───────────▶ activating ─────────▶ running ──suspend──▶ suspending ──▶ suspended
//!                          │                  │   ▲                                  │
//!                          │ fail             │   │ moved, cancelled                 │ resume
//!                          ▼                  ▼   │                                  ▼
//!                        failed ◀──fail── migrating                              activating
//!                          │
//!                          ▼ discard
//!                      discarded
//! ```
//!
//! Also: a suspend or a move that is given up (`cancelled`) goes back to running, and a resume
//! that never started (`resume-failed`) goes back to suspended with its saved state.

use serde::{Deserialize, Serialize};

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// Being booted or resumed on its machine.
    Activating,
    /// Serving.
    Running,
    /// A warm standby: paused in memory on its machine, serving nothing, using no CPU; it
    /// serves again milliseconds after it is unpaused.
    Paused,
    /// Moving to another machine.
    Migrating,
    /// Saving its state into the repository.
    Suspending,
    /// Dormant: its state is in the repository.
    Suspended,
    /// Broken: it will be discarded and replaced.
    Failed,
    /// Thrown away.
    Discarded,
}

/// What happened to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transition {
    /// It answers its health check.
    Ready,
    /// A move to another machine started.
    MigrateStarted,
    /// The move finished (it runs on the destination).
    Moved,
    /// A suspend started.
    SuspendStarted,
    /// The suspend finished.
    Suspended,
    /// A resume started.
    Resume,
    /// A resume did not start: it stays suspended, its saved state intact.
    ResumeFailed,
    /// A migration or suspend was given up; the guest runs on where it was.
    Cancelled,
    /// Something broke.
    Fail,
    /// It is thrown away.
    Discard,
    /// Its vCPUs were stopped (a warm standby).
    Pause,
    /// Its vCPUs run again.
    Unpause,
}

/// An illegal move between states.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an instance that is {from:?} cannot take {transition:?}")]
pub struct IllegalTransition {
    /// The state it was in.
    pub from: InstanceState,
    /// What was attempted.
    pub transition: Transition,
}

impl InstanceState {
    /// The state after `t`, or why `t` is not allowed now.
    pub fn next(self, t: Transition) -> Result<InstanceState, IllegalTransition> {
        use InstanceState as S;
        use Transition as T;
        let next = match (self, t) {
            (S::Activating, T::Ready) => S::Running,
            (S::Running, T::Ready) => S::Running,
            (S::Running, T::MigrateStarted) => S::Migrating,
            (S::Migrating, T::Moved) => S::Running,
            (S::Running | S::Paused, T::SuspendStarted) => S::Suspending,
            (S::Running | S::Paused, T::Pause) => S::Paused,
            (S::Paused | S::Running, T::Unpause) => S::Running,
            (S::Suspending, T::Suspended) => S::Suspended,
            (S::Suspended, T::Resume) => S::Activating,
            (S::Activating, T::ResumeFailed) => S::Suspended,
            (S::Migrating | S::Suspending, T::Cancelled) => S::Running,
            (S::Activating | S::Running | S::Paused | S::Migrating | S::Suspending, T::Fail) => {
                S::Failed
            }
            (S::Failed | S::Suspended | S::Activating | S::Running | S::Paused, T::Discard) => {
                S::Discarded
            }
            (S::Activating, _)
            | (S::Running, _)
            | (S::Paused, _)
            | (S::Migrating, _)
            | (S::Suspending, _)
            | (S::Suspended, _)
            | (S::Failed, _)
            | (S::Discarded, _) => {
                return Err(IllegalTransition {
                    from: self,
                    transition: t,
                })
            }
        };
        Ok(next)
    }

    /// Whether the instance occupies a machine (counts against its capacity).
    pub fn is_placed(self) -> bool {
        matches!(
            self,
            Self::Activating | Self::Running | Self::Paused | Self::Migrating | Self::Suspending
        )
    }

    /// The lower-case name used in the API and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Activating => "activating",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Migrating => "migrating",
            Self::Suspending => "suspending",
            Self::Suspended => "suspended",
            Self::Failed => "failed",
            Self::Discarded => "discarded",
        }
    }

    /// Parses [`InstanceState::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Activating,
            Self::Running,
            Self::Paused,
            Self::Migrating,
            Self::Suspending,
            Self::Suspended,
            Self::Failed,
            Self::Discarded,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::InstanceState as S;
    use super::Transition as T;

    #[test]
    fn the_life_of_an_instance() {
        let s = S::Activating.next(T::Ready).unwrap();
        let s = s.next(T::MigrateStarted).unwrap().next(T::Moved).unwrap();
        let s = s
            .next(T::SuspendStarted)
            .unwrap()
            .next(T::Suspended)
            .unwrap();
        assert_eq!(s, S::Suspended);
        assert_eq!(s.next(T::Resume).unwrap(), S::Activating);
        assert_eq!(
            S::Activating.next(T::ResumeFailed).unwrap(),
            S::Suspended,
            "a resume that did not start"
        );
        assert_eq!(
            S::Suspending.next(T::Cancelled).unwrap(),
            S::Running,
            "a suspend given up"
        );
        assert!(S::Running.next(T::ResumeFailed).is_err());
        assert_eq!(
            S::Migrating
                .next(T::Fail)
                .unwrap()
                .next(T::Discard)
                .unwrap(),
            S::Discarded
        );
    }

    #[test]
    fn illegal_moves_are_typed_errors() {
        assert!(S::Suspended.next(T::MigrateStarted).is_err());
        assert!(S::Discarded.next(T::Ready).is_err());
        assert!(S::Migrating.next(T::SuspendStarted).is_err());
        let e = S::Failed.next(T::Ready).unwrap_err();
        assert!(e.to_string().contains("Failed"));
    }

    #[test]
    fn names_round_trip() {
        for s in [
            S::Activating,
            S::Running,
            S::Migrating,
            S::Suspending,
            S::Suspended,
            S::Failed,
            S::Discarded,
        ] {
            assert_eq!(S::parse(s.as_str()), Some(s));
        }
    }
}
