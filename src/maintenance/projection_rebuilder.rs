//! The projection rebuilder (run by a worker for each projection it
//! runs, see [`crate::projection`]): every
//! [`REBUILD_POLL`](crate::projection::REBUILD_POLL) it looks at the
//! projection's row; when a rebuild was requested (`outbox projection
//! rebuild NAME`), or one stopped half way (its worker died), it rebuilds
//! the projection. Workers running the same projection take turns on an
//! advisory lock held for the rebuild, so one rebuilds; if it dies its
//! session ends, the lock goes with it, and another resumes from the
//! checkpoint.

use std::sync::Arc;
use std::time::Duration;

use diesel::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Bool, Text};

use super::{MaintenanceService, Step};
use crate::error::Result;
use crate::projection::{self, Projection};
use crate::upcast::Upcasters;

/// Rebuilds one projection when asked.
pub(crate) struct ProjectionRebuilder {
    pub(crate) projection: Arc<dyn Projection>,
    pub(crate) upcasters: Arc<Upcasters>,
    pub(crate) period: Duration,
}

#[derive(QueryableByName)]
struct State {
    #[diesel(sql_type = Text)]
    state: String,
}

#[derive(QueryableByName)]
struct Locked {
    #[diesel(sql_type = Bool)]
    locked: bool,
}

impl MaintenanceService for ProjectionRebuilder {
    const NAME: &'static str = "projection_rebuilder";
    const ROWS_TOTAL: Option<&'static str> = None;
    const RUN_AT_START: bool = true;

    fn period(&self) -> Duration {
        self.period
    }

    fn run_once(&self, conn: &mut PgConnection) -> Result<Step> {
        let name = self.projection.name();
        // One read a period; the row is written only when missing (a
        // projection this database has not seen yet).
        let state = diesel::sql_query("SELECT state FROM outbox_projections WHERE name = $1")
            .bind::<Text, _>(name)
            .get_results::<State>(conn)?;
        let Some(State { state }) = state.into_iter().next() else {
            projection::ensure_row(conn, name)?;
            return Ok(Step::done(0));
        };
        if state == "live" {
            return Ok(Step::done(0));
        }
        let key = format!("outbox_projection:{name}");
        let locked = diesel::sql_query("SELECT pg_try_advisory_lock(hashtextextended($1, 0)) AS locked")
            .bind::<Text, _>(&key)
            .get_result::<Locked>(conn)?
            .locked;
        if !locked {
            // Another worker is rebuilding it.
            return Ok(Step::done(0));
        }
        let rebuilt = projection::rebuild(
            conn,
            self.projection.as_ref(),
            &self.upcasters,
            projection::REBUILD_BATCH,
        );
        let unlocked = diesel::sql_query("SELECT pg_advisory_unlock(hashtextextended($1, 0)) AS locked")
            .bind::<Text, _>(&key)
            .get_result::<Locked>(conn);
        rebuilt?;
        unlocked?;
        Ok(Step::done(0))
    }
}
