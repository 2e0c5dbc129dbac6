//! Groups the writes that reach the leader together into one proposal:
//! openraft appends and replicates the entries of one message to its core
//! as a batch, so N concurrent writes cost one log submission, one flush
//! notification and one replication wake-up instead of N.
//!
//! Nothing waits on a timer to fill a batch: the proposer takes the writes
//! queued once the request tasks that were ready have run, so a lone write
//! is proposed at once and batches grow only with the load.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use openraft::error::{ClientWriteError, Fatal};
use openraft::raft::WriteResult;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::raft::{Raft, Response, TypeConfig};
use crate::state::Command;

/// Most writes proposed in one message to the Raft core.
const MAX_BATCH: usize = 256;

/// Writes queued for the proposer before callers wait to queue theirs.
const QUEUE: usize = 4096;

/// Why a proposal was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// Raft refused the entry (not the leader, or the entry was discarded
    /// by a leader change before it committed).
    #[error(transparent)]
    Write(#[from] ClientWriteError<TypeConfig>),
    /// The Raft core has stopped.
    #[error(transparent)]
    Fatal(#[from] Fatal<TypeConfig>),
}

struct Proposal {
    cmd: Command,
    reply: oneshot::Sender<Result<Response, ProposeError>>,
}

/// A handle to the proposer task; clones share it. The task ends when the
/// last handle is dropped.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Proposal>,
}

impl Proposer {
    /// Starts the proposer task on the current runtime; each batch's size
    /// goes to `metrics`.
    pub fn spawn(raft: Arc<Raft>, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(raft, metrics, rx));
        Self { tx }
    }

    /// Proposes `cmd` and waits until it is committed and applied on this
    /// replica (which must be the leader), returning the state machine's
    /// response.
    pub async fn propose(&self, cmd: Command) -> Result<Response, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Proposal { cmd, reply })
            .await
            .map_err(|_| Fatal::Stopped)?;
        rx.await.unwrap_or(Err(ProposeError::Fatal(Fatal::Stopped)))
    }
}

async fn run(raft: Arc<Raft>, metrics: Arc<Metrics>, mut rx: mpsc::Receiver<Proposal>) {
    let mut queued = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut queued, MAX_BATCH).await > 0 {
        // Let the request tasks that are already runnable queue their
        // writes before taking them: without this the proposer wakes for
        // each write as it arrives and batches stay at one.
        tokio::task::yield_now().await;
        while queued.len() < MAX_BATCH {
            let Ok(p) = rx.try_recv() else { break };
            queued.push(p);
        }
        metrics.proposed(queued.len());
        let (cmds, replies): (Vec<_>, Vec<_>) = queued.drain(..).map(|p| (p.cmd, p.reply)).unzip();
        match raft.client_write_many(cmds).await {
            // The results come in log order; delivering them must not hold
            // up the next proposal.
            Ok(results) => {
                tokio::spawn(deliver(results, replies));
            }
            Err(fatal) => {
                for reply in replies {
                    let _ = reply.send(Err(fatal.clone().into()));
                }
            }
        }
    }
}

/// Hands each write its result, in the order they were proposed.
async fn deliver(
    mut results: BoxStream<'static, Result<WriteResult<TypeConfig>, Fatal<TypeConfig>>>,
    replies: Vec<oneshot::Sender<Result<Response, ProposeError>>>,
) {
    let mut replies = replies.into_iter();
    while let Some(result) = results.next().await {
        let Some(reply) = replies.next() else { break };
        let result = match result {
            Ok(Ok(written)) => Ok(written.response),
            Ok(Err(refused)) => Err(refused.into()),
            Err(fatal) => Err(fatal.into()),
        };
        // The caller may have given up (its request was cancelled).
        let _ = reply.send(result);
    }
    // The stream ends early only when the core stopped.
    for reply in replies {
        let _ = reply.send(Err(Fatal::Stopped.into()));
    }
}
