//! The state as served: the replicated `State` together with a bounded
//! history of recent revisions and a broadcast of new ones, behind one lock
//! so that "list at R, then every change after R" has no gap and no
//! duplicate. Every replica has one; watches are served locally.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use strait_proto::Kind;
use strait_proto::v1::{EventType, WatchEvent, WatchResponse};
use tokio::sync::broadcast;

use crate::state::{Applied, Change, State, now_unix_nanos};

/// Why a watch could not start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WatchError {
    /// The requested revision is older than the retained history.
    #[error(
        "compacted: revision {requested} is older than the oldest retained revision {oldest}; re-list"
    )]
    Compacted { requested: u64, oldest: u64 },
}

/// Where a new watcher starts.
pub struct Start {
    /// The full state (when starting from revision 0), to replace not merge.
    pub initial: Option<Arc<WatchResponse>>,
    /// Revisions after the requested one, from the history.
    pub backlog: Vec<Arc<WatchResponse>>,
    /// Everything committed after `initial`/`backlog`.
    pub live: broadcast::Receiver<Arc<WatchResponse>>,
}

/// A revision in the history, with when this replica applied it.
struct Published {
    response: Arc<WatchResponse>,
    applied_unix_nanos: i64,
}

/// State plus watch history; see the module doc.
pub struct Store {
    state: State,
    history: VecDeque<Published>,
    /// Changes after this revision are all in `history`.
    oldest: u64,
    retain: usize,
    tx: broadcast::Sender<Arc<WatchResponse>>,
}

/// The handle everyone shares.
pub type Shared = Arc<RwLock<Store>>;

fn to_event(c: &Change) -> WatchEvent {
    WatchEvent {
        r#type: c.event as i32,
        object: Some(c.object.clone()),
    }
}

impl Store {
    /// `retain`: how many revisions of history to keep for resuming watchers.
    pub fn new(state: State, retain: usize) -> Self {
        let (tx, _) = broadcast::channel(retain.clamp(64, 4096));
        Self {
            oldest: state.revision(),
            state,
            history: VecDeque::new(),
            retain: retain.max(1),
            tx,
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// The oldest revision a watcher may resume from.
    pub fn oldest(&self) -> u64 {
        self.oldest
    }

    /// Publishes what an apply changed as one revision.
    /// `commit_time_unix_nanos` is the time the write carries (stamped when
    /// it was accepted, before the Raft round).
    pub fn publish(&mut self, applied: &Applied, revision: u64, commit_time_unix_nanos: i64) {
        if applied.changes.is_empty() {
            return;
        }
        let applied_unix_nanos = now_unix_nanos();
        let resp = Arc::new(WatchResponse {
            revision,
            events: applied.changes.iter().map(to_event).collect(),
            initial: false,
            commit_time_unix_nanos,
        });
        self.history.push_back(Published {
            response: resp.clone(),
            applied_unix_nanos,
        });
        while self.history.len() > self.retain {
            if let Some(old) = self.history.pop_front() {
                self.oldest = old.response.revision;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(resp);
    }

    /// When this replica applied (and published) `revision`, by its clock,
    /// while the revision is in the history. On the leader that is the
    /// commit time, give or take the hand-off to the state machine.
    pub fn applied_at(&self, revision: u64) -> Option<i64> {
        let i = self
            .history
            .binary_search_by_key(&revision, |p| p.response.revision)
            .ok()?;
        self.history.get(i).map(|p| p.applied_unix_nanos)
    }

    pub fn state_mut(&mut self) -> &mut State {
        &mut self.state
    }

    /// Replaces the whole state (a snapshot was installed): history no longer
    /// connects, so live watchers get the full state to replace theirs.
    pub fn replace(&mut self, state: State) {
        self.state = state;
        self.history.clear();
        self.oldest = self.state.revision();
        let _ = self.tx.send(self.full());
    }

    /// The full state as one `initial` response.
    pub fn full(&self) -> Arc<WatchResponse> {
        Arc::new(WatchResponse {
            revision: self.state.revision(),
            events: self
                .state
                .list(None, "")
                .map(|o| WatchEvent {
                    r#type: EventType::Added as i32,
                    object: Some(o.clone()),
                })
                .collect(),
            initial: true,
            commit_time_unix_nanos: 0,
        })
    }

    /// Starts a watch from `revision` (0 = full state first).
    pub fn subscribe(&self, revision: u64) -> Result<Start, WatchError> {
        let live = self.tx.subscribe();
        if revision == 0 {
            return Ok(Start {
                initial: Some(self.full()),
                backlog: Vec::new(),
                live,
            });
        }
        if revision < self.oldest {
            return Err(WatchError::Compacted {
                requested: revision,
                oldest: self.oldest,
            });
        }
        let backlog = self
            .history
            .iter()
            .filter(|p| p.response.revision > revision)
            .map(|p| p.response.clone())
            .collect();
        Ok(Start {
            initial: None,
            backlog,
            live,
        })
    }
}

/// Keeps only events of `kinds` (all when empty); None when nothing is left
/// and the response is not a full-state replacement.
pub fn filter(resp: &WatchResponse, kinds: &[Kind]) -> Option<WatchResponse> {
    let events: Vec<WatchEvent> = resp
        .events
        .iter()
        .filter(|e| {
            kinds.is_empty()
                || e.object
                    .as_ref()
                    .and_then(|o| o.kind())
                    .is_some_and(|k| kinds.contains(&k))
        })
        .cloned()
        .collect();
    if events.is_empty() && !resp.initial {
        return None;
    }
    Some(WatchResponse {
        revision: resp.revision,
        events,
        initial: resp.initial,
        commit_time_unix_nanos: resp.commit_time_unix_nanos,
    })
}

/// A read guard on the state, for request handlers.
pub fn read(shared: &Shared) -> RwLockReadGuard<'_, Store> {
    shared
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A write guard, for the state machine.
pub fn write(shared: &Shared) -> std::sync::RwLockWriteGuard<'_, Store> {
    shared
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
