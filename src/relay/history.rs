//! What relays published recently, from `published_at` (a BRIN index
//! answers the last hour; see migration 000008).

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Timestamptz};

use crate::error::{Error, Result};

/// Events published in one minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, QueryableByName, serde::Serialize)]
pub struct PublishedMinute {
    /// The minute's start.
    #[diesel(sql_type = Timestamptz)]
    pub minute: DateTime<Utc>,
    /// Rows marked published in it (rows pruned since are not counted).
    #[diesel(sql_type = BigInt)]
    pub published: i64,
}

/// Events published per minute over the last `minutes` minutes (1 to
/// 1,440), oldest first, the current minute last, minutes without any
/// included as 0.
pub fn published_per_minute(conn: &mut PgConnection, minutes: i64) -> Result<Vec<PublishedMinute>> {
    if !(1..=1440).contains(&minutes) {
        return Err(Error::Config(format!(
            "minutes must be between 1 and 1440, not {minutes}"
        )));
    }
    Ok(diesel::sql_query(
        "WITH span AS (SELECT date_trunc('minute', now()) - make_interval(mins => ($1 - 1)::int) AS first),
         counted AS (
             SELECT date_trunc('minute', published_at) AS minute, count(*) AS published
             FROM outbox_events, span
             WHERE published_at >= span.first
             GROUP BY 1
         )
         SELECT m.minute, COALESCE(c.published, 0) AS published
         FROM span, generate_series(span.first, date_trunc('minute', now()), interval '1 minute') AS m(minute)
         LEFT JOIN counted c ON c.minute = m.minute
         ORDER BY m.minute",
    )
    .bind::<BigInt, _>(minutes)
    .load(conn)?)
}
