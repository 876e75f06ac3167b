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

/// Checks that `url` is a postgres:// URL that parses, with one host or
/// libpq's list of several (`postgres://u@h1:5432,h2:5432/db`, each host
/// checked); the error shows it with its password redacted.
pub(crate) fn validate_database_url(url: &str) -> Result<()> {
    if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
        return Err(Error::Config(format!(
            "database URL {} must start with postgres:// or postgresql://",
            redact_url(url)
        )));
    }
    let single = |candidate: &str| {
        url::Url::parse(candidate)
            .map(|_| ())
            .map_err(|e| Error::Config(format!("database URL {} does not parse: {e}", redact_url(url))))
    };
    match split_hosts(url) {
        Some(parts) if parts.hosts.contains(',') => {
            for host in parts.hosts.split(',') {
                if host.trim().is_empty() {
                    return Err(Error::Config(format!(
                        "database URL {} has an empty host in its host list",
                        redact_url(url)
                    )));
                }
                single(&parts.with_hosts(host))?;
            }
            Ok(())
        }
        _ => single(url),
    }
}

/// A URL split around its authority's host list: libpq's multi-host
/// `postgres://user:pw@h1:5432,h2:5433/db?target_session_attrs=read-write`
/// is `postgres://user:pw@` + `h1:5432,h2:5433` + `/db?...`. The `url`
/// crate parses one host only, so multi-host URLs are parsed with a
/// placeholder host in their place.
struct HostParts<'a> {
    /// Scheme and user info, up to and with the `@`.
    head: &'a str,
    /// The host list (`h1:5432,h2:5433`), possibly a single host.
    hosts: &'a str,
    /// Path, query and fragment.
    tail: &'a str,
}

impl HostParts<'_> {
    fn with_hosts(&self, hosts: &str) -> String {
        format!("{}{hosts}{}", self.head, self.tail)
    }
}

/// Stands in for a host list while the `url` crate parses the rest.
const HOSTS_PLACEHOLDER: &str = "outbox-host-list.invalid";

fn split_hosts(url: &str) -> Option<HostParts<'_>> {
    let after_scheme = url.find("://")? + 3;
    let end = url[after_scheme..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| after_scheme + i);
    let authority = &url[after_scheme..end];
    let hosts_start = authority.rfind('@').map_or(0, |i| i + 1);
    Some(HostParts {
        head: &url[..after_scheme + hosts_start],
        hosts: &authority[hosts_start..],
        tail: &url[end..],
    })
}

/// `f` applied to `url` as the `url` crate parses it, the host list of a
/// multi-host URL kept as it was.
fn map_parsed(url: &str, f: impl FnOnce(&mut url::Url)) -> std::result::Result<String, url::ParseError> {
    match split_hosts(url) {
        Some(parts) if parts.hosts.contains(',') => {
            let mut parsed = url::Url::parse(&parts.with_hosts(HOSTS_PLACEHOLDER))?;
            f(&mut parsed);
            Ok(parsed.to_string().replacen(HOSTS_PLACEHOLDER, parts.hosts, 1))
        }
        _ => {
            let mut parsed = url::Url::parse(url)?;
            f(&mut parsed);
            Ok(parsed.to_string())
        }
    }
}

/// The database a postgres:// URL names (its path, percent-decoded), for
/// URLs with one host or several; `None` when it names none or does not
/// parse.
pub(crate) fn database_name(url: &str) -> Option<String> {
    database_path(url).map(|path| percent_decode(&path))
}

/// The database part of a postgres:// URL's path as written (still
/// percent-encoded); `None` when it names none or does not parse.
pub(crate) fn database_path(url: &str) -> Option<String> {
    let mut path = None;
    map_parsed(url, |parsed| {
        path = Some(parsed.path().trim_start_matches('/').to_owned());
    })
    .ok()?;
    path.filter(|p| !p.is_empty())
}

/// `url` naming database `database` instead of its own (one host or
/// several).
pub(crate) fn with_database(url: &str, database: &str) -> Result<String> {
    map_parsed(url, |parsed| parsed.set_path(&format!("/{database}")))
        .map_err(|e| Error::Config(format!("database URL {}: {e}", redact_url(url))))
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
    let Some(name) = database_name(url) else {
        return Err(Error::Config(format!(
            "database URL {} names no database (or does not parse)",
            redact_url(url)
        )));
    };
    let mut admin = connect(&with_database(url, "postgres")?)?;
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
    // libpq's multi-host form: the host list back in place of the
    // placeholder it was parsed with (hosts hold no secret).
    if let Some(parts) = split_hosts(url)
        && parts.hosts.contains(',')
    {
        let redacted = redact_one_url(&parts.with_hosts(HOSTS_PLACEHOLDER));
        return if redacted.contains(HOSTS_PLACEHOLDER) {
            redacted.replacen(HOSTS_PLACEHOLDER, parts.hosts, 1)
        } else {
            redacted
        };
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
    fn multi_host_database_urls() {
        use super::{database_name, validate_database_url, with_database};
        let url = "postgres://app:pw@db1:5433,db2:5434/shop%20db?target_session_attrs=read-write";
        assert!(validate_database_url(url).is_ok());
        assert_eq!(database_name(url).as_deref(), Some("shop db"));
        assert_eq!(
            with_database(url, "postgres").ok().as_deref(),
            Some("postgres://app:pw@db1:5433,db2:5434/postgres?target_session_attrs=read-write")
        );
        assert_eq!(database_name("postgres://h/outbox").as_deref(), Some("outbox"));
        assert_eq!(database_name("postgres://h1,h2"), None);
        for bad in [
            "postgres://u:s3cret@db1:5433,db2:99999/x",
            "postgres://u:s3cret@db1,,db2/x",
        ] {
            let message = validate_database_url(bad)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                !message.is_empty() && !message.contains("s3cret"),
                "{bad}: {message}"
            );
        }
    }

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
        // libpq's several hosts.
        assert_eq!(
            redact_url(
                "postgres://app:s3cret@db1:5433,db2:5434/outbox?target_session_attrs=read-write&password=s3cret"
            ),
            "postgres://app:***@db1:5433,db2:5434/outbox?target_session_attrs=read-write&password=***"
        );
        assert_eq!(
            redact_url("amqp://a:s1@h1:5681/%2f, amqp://b:s2@h2:5682/%2f"),
            "amqp://a:***@h1:5681/%2f,amqp://b:***@h2:5682/%2f"
        );
        // A comma in a password does not split the URL (and is hidden).
        assert_eq!(redact_url("amqp://a:pa,ss@h1/%2f"), "amqp://a:***@h1/%2f");
        assert!(!redact_url("postgres://app:p%40ss@db/x").contains("p%40ss"));
    }
}
