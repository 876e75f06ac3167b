//! Shared helpers: databases, counting, waiting with deadlines.

use diesel::prelude::*;
use outbox::TestDatabase;
pub use outbox::testing::count;

/// A migrated database of the test's own.
pub fn database() -> (TestDatabase, PgConnection) {
    let db = TestDatabase::create().expect("create test database");
    let conn = db.connect().expect("connect");
    (db, conn)
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var("RUST_LOG").is_ok() {
            let _ = tracing_subscriber::fmt()
                .with_test_writer()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .try_init();
        }
    });
}
