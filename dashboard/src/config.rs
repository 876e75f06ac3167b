//! What `outbox dashboard` serves, where, and who may change things.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use subtle::ConstantTimeEq;

use crate::error::DashboardError;
pub use crate::role::Role;

/// Environment variable holding the operators' shared token.
pub const TOKEN_ENV: &str = "OUTBOX_DASHBOARD_TOKEN";
/// Environment variable naming a file of tokens (see [`Credentials::from_file`]).
pub const TOKEN_FILE_ENV: &str = "OUTBOX_DASHBOARD_TOKEN_FILE";
/// Shortest token accepted, in bytes.
pub const MIN_TOKEN_BYTES: usize = 16;
/// Default address: loopback only.
pub const DEFAULT_BIND: &str = "127.0.0.1:8090";

/// The dashboard's settings.
#[derive(Debug, Clone)]
pub struct DashboardConfig {
    /// The outbox's database.
    pub database_url: String,
    /// RabbitMQ, for queue depths and retries.
    pub amqp_url: String,
    /// Where to listen. Default [`DEFAULT_BIND`]; an address other than
    /// loopback is refused without [`credentials`](Self::credentials).
    pub bind: SocketAddr,
    /// Who may change things; `None` makes the dashboard read-only.
    pub credentials: Option<Credentials>,
    /// How often pages whose figures move reload themselves once a viewer
    /// asks (`?refresh=on`, linked from the page). Default 5 s.
    pub refresh: Duration,
    /// Longest wait for the broker's confirm of a retry. Default 10 s.
    pub confirm_timeout: Duration,
    /// Mark the session cookie `Secure` (serve behind TLS). Default off.
    pub cookie_secure: bool,
    /// How long a login lasts. Default 12 h.
    pub session_ttl: Duration,
    /// Bulk actions over more failed jobs than this need the admin role.
    /// Default [`DEFAULT_BULK_ADMIN_THRESHOLD`].
    pub bulk_admin_threshold: u64,
    /// How long audit rows are kept; older ones are deleted whenever a row
    /// is written. Default 90 days.
    pub audit_retention: Duration,
}

/// Default [`DashboardConfig::bulk_admin_threshold`].
pub const DEFAULT_BULK_ADMIN_THRESHOLD: u64 = 100;

impl DashboardConfig {
    /// Settings for `database_url` and `amqp_url` with every default.
    pub fn new(database_url: impl Into<String>, amqp_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            amqp_url: amqp_url.into(),
            bind: SocketAddr::from(([127, 0, 0, 1], 8090)),
            credentials: None,
            refresh: Duration::from_secs(5),
            confirm_timeout: Duration::from_secs(10),
            cookie_secure: false,
            session_ttl: Duration::from_secs(12 * 3600),
            bulk_admin_threshold: DEFAULT_BULK_ADMIN_THRESHOLD,
            audit_retention: Duration::from_secs(90 * 24 * 3600),
        }
    }

    /// The least role a bulk action over `count` failed jobs needs.
    pub fn role_for_bulk(&self, count: u64) -> Role {
        if count > self.bulk_admin_threshold {
            Role::Admin
        } else {
            Role::Operator
        }
    }

    /// Refuses what must not run: a non-loopback address without
    /// credentials, a zero refresh.
    pub fn validate(&self) -> Result<(), DashboardError> {
        if !self.bind.ip().is_loopback() && self.credentials.is_none() {
            return Err(DashboardError::Start(format!(
                "refusing to listen on {} without authentication: set {TOKEN_ENV} or {TOKEN_FILE_ENV}, or bind to a loopback address",
                self.bind
            )));
        }
        if self.refresh.is_zero()
            || self.confirm_timeout.is_zero()
            || self.session_ttl.is_zero()
            || self.audit_retention.is_zero()
        {
            return Err(DashboardError::Start(
                "refresh, confirm timeout, session lifetime and audit retention must be above zero".into(),
            ));
        }
        outbox::amqp::validate_amqp_url(&self.amqp_url)?;
        Ok(())
    }
}

/// The operators' tokens. Never printed: `Debug` shows only how many.
#[derive(Clone)]
pub struct Credentials {
    tokens: Vec<OperatorToken>,
}

#[derive(Clone)]
struct OperatorToken {
    /// The operator a personal token belongs to; `None` for a shared one
    /// (the operator then names themselves at login).
    operator: Option<String>,
    /// `None` when the token file gives no role ([`Role::DEFAULT`] then).
    role: Option<Role>,
    token: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// One token shared by every operator.
    pub fn shared(token: &str) -> Result<Self, DashboardError> {
        Ok(Self {
            tokens: vec![OperatorToken {
                operator: None,
                role: None,
                token: checked_token(token.trim(), "the token")?,
            }],
        })
    }

    /// Tokens from a file: one a line, either `token` (shared) or
    /// `operator:token` (personal: the operator is named by the token),
    /// either led by `role=<viewer|operator|admin>` and a space
    /// (`role=viewer alice:<token>`); a token without a role is
    /// [`Role::DEFAULT`]. Blank lines and lines starting with `#` are
    /// skipped.
    pub fn from_file(path: &Path) -> Result<Self, DashboardError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            DashboardError::Start(format!("cannot read the token file {}: {e}", path.display()))
        })?;
        let mut tokens = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let where_ = format!("line {} of {}", number + 1, path.display());
            let (role, line) = match line.strip_prefix("role=") {
                Some(rest) => {
                    let (name, rest) = rest.split_once(char::is_whitespace).ok_or_else(|| {
                        DashboardError::Start(format!(
                            "{where_}: `role=<role>` is followed by a space and the token"
                        ))
                    })?;
                    let role = name
                        .parse::<Role>()
                        .map_err(|e| DashboardError::Start(format!("{where_}: {e}")))?;
                    (Some(role), rest.trim())
                }
                None => (None, line),
            };
            let (operator, token) = match line.split_once(':') {
                Some((name, token)) => (
                    Some(
                        checked_operator(name.trim())
                            .map_err(|e| DashboardError::Start(format!("{where_}: {e}")))?,
                    ),
                    token.trim(),
                ),
                None => (None, line),
            };
            tokens.push(OperatorToken {
                operator,
                role,
                token: checked_token(token, &where_)?,
            });
        }
        if tokens.is_empty() {
            return Err(DashboardError::Start(format!(
                "the token file {} holds no token",
                path.display()
            )));
        }
        Ok(Self { tokens })
    }

    /// From [`TOKEN_FILE_ENV`] (a file) or else [`TOKEN_ENV`] (one shared
    /// token); `None` when neither is set.
    pub fn from_env() -> Result<Option<Self>, DashboardError> {
        if let Some(path) = std::env::var_os(TOKEN_FILE_ENV).filter(|p| !p.is_empty()) {
            return Self::from_file(Path::new(&path)).map(Some);
        }
        match std::env::var(TOKEN_ENV) {
            Ok(token) if !token.is_empty() => Self::shared(&token).map(Some),
            _ => Ok(None),
        }
    }

    /// Whether some token is shared (its operators name themselves).
    pub(crate) fn has_shared(&self) -> bool {
        self.tokens.iter().any(|t| t.operator.is_none())
    }

    /// How many tokens have no role (they get [`Role::DEFAULT`]).
    pub(crate) fn without_role(&self) -> usize {
        self.tokens.iter().filter(|t| t.role.is_none()).count()
    }

    /// The token's owner and role when `token` is one of ours: the name is
    /// `Some` for a personal token, `None` for a shared one. Every stored
    /// token is compared, in constant time, whichever matches.
    pub(crate) fn verify(&self, token: &str) -> Option<(Option<String>, Role)> {
        let mut found = None;
        for stored in &self.tokens {
            let equal: bool = stored.token.as_slice().ct_eq(token.as_bytes()).into();
            if equal && found.is_none() {
                found = Some((stored.operator.clone(), stored.role.unwrap_or(Role::DEFAULT)));
            }
        }
        found
    }
}

fn checked_token(token: &str, what: &str) -> Result<Vec<u8>, DashboardError> {
    if token.len() < MIN_TOKEN_BYTES {
        return Err(DashboardError::Start(format!(
            "{what}: a dashboard token must be at least {MIN_TOKEN_BYTES} bytes (try `openssl rand -hex 24`)"
        )));
    }
    Ok(token.as_bytes().to_vec())
}

/// An operator name as logged with their actions: 1 to 64 printable
/// characters.
pub(crate) fn checked_operator(name: &str) -> Result<String, String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        return Err("an operator name is 1 to 64 printable characters".into());
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_and_never_print() -> Result<(), DashboardError> {
        let shared = Credentials::shared("0123456789abcdef-shared")?;
        assert_eq!(
            shared.verify("0123456789abcdef-shared"),
            Some((None, Role::Admin))
        );
        assert_eq!(shared.verify("0123456789abcdef-shareD"), None);
        assert_eq!(shared.verify(""), None);
        assert!(!format!("{shared:?}").contains("shared"));
        assert!(Credentials::shared("short").is_err());
        Ok(())
    }

    #[test]
    fn token_files_give_roles_and_keep_the_old_lines() -> Result<(), DashboardError> {
        let dir = std::env::temp_dir().join(format!("outbox-dashboard-roles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| DashboardError::Start(e.to_string()))?;
        let path = dir.join("tokens");
        let write =
            |text: &str| std::fs::write(&path, text).map_err(|e| DashboardError::Start(e.to_string()));
        write(
            "# old lines\n0123456789abcdef-shared\nbob:0123456789abcdef-bob\n\
             role=viewer vera:0123456789abcdef-vera\nrole=operator 0123456789abcdef-ops\n\
             role=admin ada:0123456789abcdef:ada\n",
        )?;
        let credentials = Credentials::from_file(&path)?;
        assert_eq!(
            credentials.verify("0123456789abcdef-shared"),
            Some((None, Role::Admin))
        );
        assert_eq!(
            credentials.verify("0123456789abcdef-bob"),
            Some((Some("bob".into()), Role::Admin))
        );
        assert_eq!(
            credentials.verify("0123456789abcdef-vera"),
            Some((Some("vera".into()), Role::Viewer))
        );
        assert_eq!(
            credentials.verify("0123456789abcdef-ops"),
            Some((None, Role::Operator))
        );
        assert_eq!(
            credentials.verify("0123456789abcdef:ada"),
            Some((Some("ada".into()), Role::Admin))
        );
        assert_eq!(credentials.without_role(), 2);
        for bad in ["role=root 0123456789abcdef-x\n", "role=admin\n"] {
            write(bad)?;
            assert!(Credentials::from_file(&path).is_err(), "{bad:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
