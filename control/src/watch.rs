//! The state as served: the replicated `State` together with a bounded
//! history of recent revisions and a broadcast of new ones, behind one lock
//! so that "list at R, then every change after R" has no gap and no
//! duplicate. Every replica has one; watches are served locally. Revisions
//! are kept encoded (`strait_proto::frame`): each is encoded once when
//! applied, and every watcher's response is cut from those bytes.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use strait_proto::frame::EncodedWatchResponse;
use strait_proto::v1::{EventType, WatchEvent, WatchResponse};
use tokio::sync::broadcast;

use crate::state::{Change, State, now_unix_nanos};

/// Why a watch could not start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WatchError {
    /// The requested revision is older than the retained history.
    #[error(
        "compacted: revision {requested} is older than the oldest retained revision {oldest}; re-list"
    )]
    Compacted { requested: u64, oldest: u64 },
}

/// A revision as watchers receive it, shared by all of them.
pub type Revision = Arc<EncodedWatchResponse>;

/// Where a new watcher starts.
pub struct Start {
    /// The full state (when starting from revision 0), to replace not merge.
    pub initial: Option<Revision>,
    /// Revisions after the requested one, from the history.
    pub backlog: Vec<Revision>,
    /// Everything committed after `initial`/`backlog`.
    pub live: broadcast::Receiver<Revision>,
}

/// A revision in the history, with when this replica applied it.
struct Published {
    revision: Revision,
    applied_unix_nanos: i64,
}

/// State plus watch history; see the module doc.
pub struct Store {
    state: State,
    history: VecDeque<Published>,
    /// Changes after this revision are all in `history`.
    oldest: u64,
    retain: usize,
    tx: broadcast::Sender<Revision>,
}

/// The handle everyone shares.
pub type Shared = Arc<RwLock<Store>>;

fn to_event(c: Change) -> WatchEvent {
    WatchEvent {
        r#type: c.event as i32,
        object: Some(c.object),
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

    /// Publishes what an apply changed as one revision, encoded once for
    /// every watcher. `commit_time_unix_nanos` is the time the write carries
    /// (stamped when it was accepted, before the Raft round).
    /// Takes the changes by value: their objects move into the response.
    pub fn publish(&mut self, changes: Vec<Change>, revision: u64, commit_time_unix_nanos: i64) {
        if changes.is_empty() {
            return;
        }
        let applied_unix_nanos = now_unix_nanos();
        let resp = Arc::new(EncodedWatchResponse::new(&WatchResponse {
            revision,
            events: changes.into_iter().map(to_event).collect(),
            initial: false,
            commit_time_unix_nanos,
        }));
        self.history.push_back(Published {
            revision: resp.clone(),
            applied_unix_nanos,
        });
        while self.history.len() > self.retain {
            if let Some(old) = self.history.pop_front() {
                self.oldest = old.revision.revision();
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
            .binary_search_by_key(&revision, |p| p.revision.revision())
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
    pub fn full(&self) -> Revision {
        Arc::new(EncodedWatchResponse::new(&WatchResponse {
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
        }))
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
            .filter(|p| p.revision.revision() > revision)
            .map(|p| p.revision.clone())
            .collect();
        Ok(Start {
            initial: None,
            backlog,
            live,
        })
    }
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

#[cfg(test)]
pub(crate) mod tests {
    use prost::Message;
    use strait_proto::Kind;
    use strait_proto::v1::{EventType, WatchResponse};

    use super::*;
    use crate::alloc::IpRange;
    use crate::service::Allocators;
    use crate::state::Command;

    pub(crate) fn store(retain: usize) -> Store {
        let alloc = Allocators {
            cluster_ips: IpRange::new("10.96.0.0/12".parse().expect("cidr")),
            node_ports: "30000-32767".parse().expect("range"),
            lb_ips: "192.0.2.0/28".parse().expect("pool"),
        };
        Store::new(State::new(alloc), retain)
    }

    /// Applies and publishes Pod `p` at `ip` as revision `index`.
    pub(crate) fn apply_pod(store: &mut Store, index: u64, ip: &str) {
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, labels: {{app: a}}}}\n\
             spec:\n  nodeName: node-1\n  containers:\n  - name: c\n\
             status: {{podIP: {ip}}}\n"
        );
        let object = strait_proto::manifest::parse(&yaml)
            .expect("manifest")
            .remove(0);
        let cmd = Command::Apply {
            object: object.encode_to_vec(),
            now_unix_nanos: 1_000 + i64::try_from(index).expect("small"),
        };
        let applied = store.state_mut().apply(&cmd, index);
        assert!(applied.outcome.is_ok(), "{:?}", applied.outcome);
        store.publish(
            applied.changes,
            index,
            1_000 + i64::try_from(index).expect("small"),
        );
    }

    fn decode(resp: &Revision, kinds: &[Kind]) -> Option<WatchResponse> {
        let frame = resp.frame(kinds)?;
        Some(WatchResponse::decode(frame.to_vec().as_slice()).expect("frame decodes"))
    }

    #[test]
    fn history_resumes_and_compacts() {
        let mut s = store(1);
        for (index, ip) in [(1, "10.0.0.1"), (2, "10.0.0.2"), (3, "10.0.0.3")] {
            apply_pod(&mut s, index, ip);
        }
        assert_eq!(s.oldest(), 2);
        assert_eq!(
            s.subscribe(1).err(),
            Some(WatchError::Compacted {
                requested: 1,
                oldest: 2
            })
        );
        let start = s.subscribe(2).expect("retained");
        assert!(start.initial.is_none());
        let [third] = start.backlog.as_slice() else {
            panic!("one revision after 2: {}", start.backlog.len());
        };
        let resp = decode(third, &[Kind::Pod]).expect("a Pod changed");
        assert_eq!(resp.revision, 3);
        assert_eq!(resp.commit_time_unix_nanos, 1_003);
        assert!(!resp.initial);
        assert_eq!(resp.events.len(), 1);
        assert_eq!(resp.events[0].r#type, EventType::Modified as i32);
        assert!(decode(third, &[Kind::Service]).is_none());

        assert!(s.applied_at(3).is_some_and(|t| t > 0));
        assert_eq!(s.applied_at(2), None, "no longer retained");
    }

    #[test]
    fn full_state_is_one_initial_response() {
        let mut s = store(10);
        apply_pod(&mut s, 1, "10.0.0.1");
        apply_pod(&mut s, 2, "10.0.0.2");
        let start = s.subscribe(0).expect("full state");
        let initial = start.initial.expect("initial");
        let resp = decode(&initial, &[Kind::Service]).expect("sent even when empty");
        assert!(resp.initial && resp.events.is_empty());
        let resp = decode(&initial, &[]).expect("all kinds");
        assert!(resp.initial);
        assert_eq!(resp.revision, s.state().revision());
        assert_eq!(resp.events.len(), 1);
        assert_eq!(resp.events[0].r#type, EventType::Added as i32);
    }

    #[tokio::test]
    async fn every_watcher_gets_the_same_encoded_revision() {
        let mut s = store(10);
        let mut a = s.subscribe(0).expect("subscribe").live;
        let mut b = s.subscribe(0).expect("subscribe").live;
        apply_pod(&mut s, 1, "10.0.0.1");
        let (a, b) = (a.recv().await.expect("a"), b.recv().await.expect("b"));
        assert_eq!(a.revision(), 1);
        assert!(Arc::ptr_eq(&a, &b));
    }
}
