//! The operator roles (viewer, operator, admin) and what each may do.

/// What a logged-in operator may do; each role may do everything the ones
/// before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads every page; changes nothing.
    Viewer,
    /// Also retries and forgets failed jobs (in bulk up to
    /// [`DashboardConfig::bulk_admin_threshold`](crate::DashboardConfig::bulk_admin_threshold)), pauses and resumes
    /// relays, retries rows failed at the relay.
    Operator,
    /// Also edits and retries, and acts in bulk over the threshold.
    Admin,
}

impl Role {
    /// The role of a token the token file gives none (and of the shared
    /// token of [`TOKEN_ENV`](crate::TOKEN_ENV)): admin, every right, which is what every
    /// token had before roles existed; a lower default would silently take
    /// edit-and-retry away from running deployments. The dashboard logs a
    /// warning at start for each token without a role.
    pub const DEFAULT: Role = Role::Admin;

    /// Its name in token files, pages and the audit trail.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?}: viewer, operator or admin")),
        }
    }
}
