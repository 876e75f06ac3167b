//! Connecting to Postgres: single connections, r2d2 pools, and URLs made
//! safe to print.

use std::time::Duration;

use diesel::pg::PgConnection;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::{Connection, RunQueryDsl};

use crate::error::{Error, Result};

/// Where the outbox looks for Postgres when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/outbox";

/// An r2d2 pool of diesel Postgres connections.
pub type PgPool = Pool<ConnectionManager<PgConnection>>;

/// Checks that `url` is a postgres:// URL that parses; the error shows it
/// with its password redacted.
pub(crate) fn validate_database_url(url: &str) -> Result<()> {
    if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
        return Err(Error::Config(format!(
            "database URL {} must start with postgres:// or postgresql://",
            redact_url(url)
        )));
    }
    if let Err(e) = url::Url::parse(url) {
        return Err(Error::Config(format!(
            "database URL {} does not parse: {e}",
            redact_url(url)
        )));
    }
    Ok(())
}

/// Opens one connection. The error names the URL with its password
/// redacted.
pub fn connect(url: &str) -> Result<PgConnection> {
    PgConnection::establish(url).map_err(|source| Error::Connect {
        url: redact_url(url),
        source,
    })
}

/// Builds a pool of at most `max_size` connections and checks that one can
/// be opened within `connect_timeout`.
pub fn pool(url: &str, max_size: u32, connect_timeout: Duration) -> Result<PgPool> {
    if max_size == 0 {
        return Err(Error::Config("pool size must be at least 1".into()));
    }
    // Fail fast with libpq's own reason rather than r2d2's generic timeout.
    drop(connect(url)?);
    Pool::builder()
        .max_size(max_size)
        .connection_timeout(connect_timeout)
        .build(ConnectionManager::<PgConnection>::new(url))
        .map_err(Error::Pool)
}

/// Runs blocking diesel `work` with a pooled connection on tokio's blocking
/// pool, so async tasks never wait on Postgres on a worker thread.
pub async fn run_blocking<T: Send + 'static>(
    pool: &PgPool,
    work: impl FnOnce(&mut PgConnection) -> Result<T> + Send + 'static,
) -> Result<T> {
    let pool = pool.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = pool.get()?;
        work(&mut conn)
    })
    .await
    .unwrap_or_else(|e| Err(Error::BlockingTask(e)))
}

/// Creates the database `url` names if it does not exist yet, connecting
/// to the server's `postgres` database to do so. Returns whether it created
/// it. The name is quoted, so any name Postgres accepts works.
pub fn create_database_if_missing(url: &str) -> Result<bool> {
    // A user allowed into their own database but not into `postgres` needs
    // nothing created.
    if connect(url).is_ok() {
        return Ok(false);
    }
    let parsed =
        url::Url::parse(url).map_err(|e| Error::Config(format!("database URL {}: {e}", redact_url(url))))?;
    let name = parsed.path().trim_start_matches('/');
    let name = percent_decode(name);
    if name.is_empty() {
        return Err(Error::Config(format!(
            "database URL {} names no database",
            redact_url(url)
        )));
    }
    let mut admin_url = parsed.clone();
    admin_url.set_path("/postgres");
    let mut admin = connect(admin_url.as_str())?;
    #[derive(diesel::QueryableByName)]
    struct Exists {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        exists: bool,
    }
    let exists = diesel::sql_query("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS exists")
        .bind::<diesel::sql_types::Text, _>(&name)
        .get_result::<Exists>(&mut admin)?
        .exists;
    if exists {
        return Ok(false);
    }
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    match diesel::sql_query(format!("CREATE DATABASE {quoted}")).execute(&mut admin) {
        Ok(_) => Ok(true),
        // Another process created it between our check and our CREATE.
        Err(diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)) => {
            Ok(false)
        }
        Err(e) if e.to_string().contains("already exists") => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn percent_decode(value: &str) -> String {
    percent_encoding::percent_decode_str(value)
        .decode_utf8_lossy()
        .into_owned()
}

/// `url` with any password replaced by `***`, for logs and errors. Works
/// for URLs of any scheme (`postgres://`, `amqp://`) and for key=value
/// connection strings (`password=...`), and for comma-separated lists of
/// URLs (several brokers in `AMQP_URL`), each redacted. Unparsable input is
/// replaced whole rather than risk printing a secret.
pub fn redact_url(url: &str) -> String {
    // A comma-separated list of URLs (several brokers in `AMQP_URL`): each
    // redacted on its own, or the URL parser would take the later ones
    // (passwords and all) for the first one's path.
    let pieces = split_url_list(url);
    if pieces.len() > 1 {
        return pieces
            .into_iter()
            .map(redact_one_url)
            .collect::<Vec<_>>()
            .join(",");
    }
    redact_one_url(url)
}

/// Splits a comma-separated list of URLs. A comma splits only where what
/// follows it starts with a scheme (`amqp://`), another comma or nothing,
/// so a comma inside a password or a query stays in its URL; entries are
/// trimmed and may be empty (callers that parse the list refuse those).
pub(crate) fn split_url_list(list: &str) -> Vec<&str> {
    fn starts_with_scheme(text: &str) -> bool {
        match text.find("://") {
            Some(end) if end > 0 => text[..end]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')),
            _ => false,
        }
    }
    let mut pieces = Vec::new();
    let mut start = 0;
    for (at, _) in list.match_indices(',') {
        if at < start {
            continue;
        }
        let rest = list[at + 1..].trim_start();
        if rest.is_empty() || rest.starts_with(',') || starts_with_scheme(rest) {
            pieces.push(list[start..at].trim());
            start = at + 1;
        }
    }
    pieces.push(list[start..].trim());
    pieces
}

fn redact_one_url(url: &str) -> String {
    if !url.contains("://") {
        return redact_key_value(url);
    }
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() && parsed.set_password(Some("***")).is_err() {
                return "<unprintable url>".to_owned();
            }
            let query: Vec<(String, String)> = parsed
                .query_pairs()
                .map(|(k, v)| {
                    let secret = k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("sslpassword");
                    (
                        k.into_owned(),
                        if secret { "***".to_owned() } else { v.into_owned() },
                    )
                })
                .collect();
            if !query.is_empty() {
                parsed.query_pairs_mut().clear().extend_pairs(query);
            }
            parsed.to_string()
        }
        Err(_) => "<unparsable url>".to_owned(),
    }
}

fn redact_key_value(conninfo: &str) -> String {
    conninfo
        .split_whitespace()
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::{redact_url, split_url_list};

    #[test]
    fn splits_url_lists_only_before_a_scheme() {
        assert_eq!(split_url_list("amqp://h1"), vec!["amqp://h1"]);
        assert_eq!(
            split_url_list("amqp://h1, amqps://h2 ,amqp://u:p,w@h3"),
            vec!["amqp://h1", "amqps://h2", "amqp://u:p,w@h3"]
        );
        assert_eq!(
            split_url_list("amqp://h1,,amqp://h2,"),
            vec!["amqp://h1", "", "amqp://h2", ""]
        );
        assert_eq!(split_url_list(""), vec![""]);
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/outbox"),
            "postgres://app:***@db:5432/outbox"
        );
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://db/outbox?user=app&password=s3cret"),
            "postgres://db/outbox?user=app&password=***"
        );
        assert_eq!(
            redact_url("host=db password=s3cret user=app"),
            "host=db password=*** user=app"
        );
        assert_eq!(redact_url("postgres://[bad"), "<unparsable url>");
        assert_eq!(
            redact_url("amqp://a:s1@h1:5681/%2f, amqp://b:s2@h2:5682/%2f"),
            "amqp://a:***@h1:5681/%2f,amqp://b:***@h2:5682/%2f"
        );
        // A comma in a password does not split the URL (and is hidden).
        assert_eq!(redact_url("amqp://a:pa,ss@h1/%2f"), "amqp://a:***@h1/%2f");
        assert!(!redact_url("postgres://app:p%40ss@db/x").contains("p%40ss"));
    }
}
