//! Small test assertions on the database and on time: a counted query, and
//! bounded waits for a condition (never a bare sleep).

use std::time::{Duration, Instant};

use diesel::pg::PgConnection;
use diesel::{QueryResult, QueryableByName, RunQueryDsl};

/// How often the waits look again.
const POLL: Duration = Duration::from_millis(20);

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// The BIGINT column `n` of the one row `sql` returns
/// (`SELECT count(*) AS n FROM ...`); panics naming the query if it fails.
pub fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    try_count(conn, sql).unwrap_or_else(|error| panic!("{sql}: {error}"))
}

/// [`count`] for observations during faults, when the query may fail.
pub fn try_count(conn: &mut PgConnection, sql: &str) -> QueryResult<i64> {
    diesel::sql_query(sql).get_result::<Count>(conn).map(|c| c.n)
}

/// Polls `check` until it holds; panics after `limit`, naming `what`.
pub async fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    eventually_async(what, limit, || std::future::ready(check())).await;
}

/// [`eventually`] for a check that awaits (a broker query, an HTTP call):
/// polls `check` until it holds; panics after `limit`, naming `what`.
pub async fn eventually_async<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually`] for a test without a runtime: polls `check` on this
/// thread until it holds; panics after `limit`, naming `what`.
pub fn eventually_blocking(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        std::thread::sleep(POLL);
    }
}
