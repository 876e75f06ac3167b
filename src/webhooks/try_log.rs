//! The delivery log's writer: concurrent deliveries' tries go into one
//! statement (group commit). Each handler hands its row over and waits
//! until a statement holding it has committed; whichever handler finds
//! no write under way writes every row waiting, its own among them, and
//! wakes the others. With 16 deliveries in flight that is one
//! transaction for several tries instead of one each, and no task or
//! connection of its own: the writing handler uses its own connection.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};

use diesel::PgConnection;

use super::endpoints::{NewTry, log_tries};

/// What a write came to, shared by the handlers whose rows it held.
type Written = Arc<OnceLock<Result<(), String>>>;

/// The writer one delivery listener shares between its handlers.
#[derive(Debug, Default)]
pub(crate) struct TryLog {
    state: Mutex<State>,
    written: Condvar,
}

#[derive(Debug, Default)]
struct State {
    waiting: Vec<(NewTry, Written)>,
    writing: bool,
}

impl TryLog {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Logs `entry`; returns once it is committed (or the statement
    /// holding it failed, with why).
    pub(crate) fn write(&self, conn: &mut PgConnection, entry: NewTry) -> Result<(), String> {
        let mine: Written = Arc::default();
        let mut state = self.lock();
        state.waiting.push((entry, Arc::clone(&mine)));
        loop {
            if let Some(result) = mine.get() {
                return result.clone();
            }
            if !state.writing {
                // Lead one write: everything waiting, this row included.
                state.writing = true;
                let batch = std::mem::take(&mut state.waiting);
                drop(state);
                let (rows, slots): (Vec<NewTry>, Vec<Written>) = batch.into_iter().unzip();
                let lead = Lead { log: self, slots };
                let result = log_tries(conn, &rows).map_err(|error| crate::error_chain(&error));
                for slot in &lead.slots {
                    let _ = slot.set(result.clone());
                }
                drop(lead);
                state = self.lock();
                continue;
            }
            state = self.written.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// A write under way: when it ends, even by a panic, its rows have an
/// outcome and the next write may start.
struct Lead<'a> {
    log: &'a TryLog,
    slots: Vec<Written>,
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        for slot in &self.slots {
            let _ = slot.set(Err("the delivery log write was abandoned".to_owned()));
        }
        self.log.lock().writing = false;
        self.log.written.notify_all();
    }
}
