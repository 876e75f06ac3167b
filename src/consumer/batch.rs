//! Batched inbox transactions: deliveries of one listener are gathered into
//! one transaction (a savepoint each) and one commit, and only then are
//! their outcomes handed back to be acknowledged or sent on. A batch closes
//! at [`ListenerOptions::batch_size`] deliveries or
//! [`ListenerOptions::batch_wait`] after its first, so a lone delivery at
//! low traffic is not held back; at most
//! [`ListenerOptions::concurrency`] batches run at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::consumer::inbox::{InboxTry, handle_batch_in_transaction};
use crate::consumer::listener::{HandlerRun, ListenerOptions};
use crate::consumer::message::ReceivedEvent;
use crate::database::PgPool;
use crate::error::ListenerError;
use crate::registry::QueuedRegistration;

/// One delivery waiting for its batch.
struct BatchRequest {
    event: Arc<ReceivedEvent>,
    attempt: u32,
    clear_attempts: bool,
    outcome: oneshot::Sender<HandlerRun>,
}

/// The gatherer of one listener's batches; dropping it (with the session)
/// lets the running batches finish and stops the gatherer.
pub(crate) struct Batcher {
    requests: mpsc::UnboundedSender<BatchRequest>,
}

impl Batcher {
    /// Starts gathering batches for `registration` (an inbox listener).
    pub(crate) fn start(registration: QueuedRegistration, pool: PgPool) -> Self {
        let (requests, incoming) = mpsc::unbounded_channel();
        tokio::spawn(gather(incoming, registration, pool));
        Self { requests }
    }

    /// Runs one delivery in the next batch; returns once the batch has
    /// committed (or failed).
    pub(crate) async fn run(
        &self,
        event: Arc<ReceivedEvent>,
        attempt: u32,
        clear_attempts: bool,
    ) -> HandlerRun {
        let (outcome, done) = oneshot::channel();
        let request = BatchRequest {
            event,
            attempt,
            clear_attempts,
            outcome,
        };
        if self.requests.send(request).is_err() {
            return HandlerRun::Infrastructure("the batch gatherer has stopped".to_owned());
        }
        done.await
            .unwrap_or_else(|_| HandlerRun::Infrastructure("the batch was abandoned".to_owned()))
    }
}

/// Takes a batch slot, waits for a first delivery, adds what arrives
/// within `batch_wait` (up to `batch_size`), and runs the batch on the
/// blocking pool; until every [`Batcher`] handle is gone.
async fn gather(
    mut incoming: mpsc::UnboundedReceiver<BatchRequest>,
    registration: QueuedRegistration,
    pool: PgPool,
) {
    let options = registration.options().clone();
    let slots = Arc::new(Semaphore::new(options.concurrency));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let Some(first) = incoming.recv().await else {
            return;
        };
        let mut batch = vec![first];
        let closes = tokio::time::Instant::now() + options.batch_wait;
        while batch.len() < options.batch_size {
            match incoming.try_recv() {
                Ok(request) => batch.push(request),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(closes, incoming.recv()).await {
                        Ok(Some(request)) => batch.push(request),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        let (listener, pool, options) = (Arc::clone(registration.listener()), pool.clone(), options.clone());
        tokio::spawn(async move {
            let (deliveries, outcomes): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .map(|r| ((r.event, r.attempt, r.clear_attempts), r.outcome))
                .unzip();
            let size = deliveries.len();
            let bound = batch_timeout(&options, size);
            let job = tokio::task::spawn_blocking(move || {
                // The slot goes with the thread: a batch that outlives its
                // bound still counts against the concurrency.
                let _slot = slot;
                let tries: Vec<InboxTry<'_>> = deliveries
                    .iter()
                    .map(|(event, attempt, clear_attempts)| InboxTry {
                        event,
                        attempt: *attempt,
                        clear_attempts: *clear_attempts,
                    })
                    .collect();
                handle_batch_in_transaction(&pool, listener.as_ref(), &tries, &options)
            });
            let runs: Vec<HandlerRun> = match tokio::time::timeout(bound, job).await {
                Ok(Ok(runs)) => runs,
                Ok(Err(join)) => (0..size)
                    .map(|_| {
                        HandlerRun::Failed(ListenerError::transient(format!("handler task failed: {join}")))
                    })
                    .collect(),
                Err(_) => (0..size)
                    .map(|_| {
                        HandlerRun::Failed(ListenerError::transient(format!(
                            "handler batch of {size} timed out after {bound:?}"
                        )))
                    })
                    .collect(),
            };
            for (outcome, run) in outcomes.into_iter().zip(runs) {
                let _ = outcome.send(run);
            }
        });
    }
}

/// A batch may take each delivery's timeout in turn.
fn batch_timeout(options: &ListenerOptions, size: usize) -> Duration {
    options
        .timeout
        .saturating_mul(u32::try_from(size).unwrap_or(u32::MAX))
}
