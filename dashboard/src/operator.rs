//! Who is looking at a page: the viewer and, when logged in, the
//! operator with their role (how they log in is `auth.rs`'s).

use crate::role::Role;

/// Who is looking: an operator when logged in, and whether mutations are
/// possible at all.
#[derive(Debug, Clone)]
pub(crate) struct Viewer {
    /// The logged-in operator.
    pub(crate) operator: Option<Operator>,
    /// Credentials are configured (else the dashboard is read-only).
    pub(crate) can_log_in: bool,
}

impl Viewer {
    /// The logged-in operator when their role is at least `role` (pages
    /// show an action's form only to those who may use it).
    pub(crate) fn may(&self, role: Role) -> Option<&Operator> {
        self.operator.as_ref().filter(|o| o.role >= role)
    }
}

/// A logged-in operator, extracted from the session cookie.
#[derive(Clone)]
pub(crate) struct Operator {
    /// Their name, logged with every action.
    pub(crate) name: String,
    /// What they may do, from their token at login.
    pub(crate) role: Role,
    /// The session's CSRF token, put in every form.
    pub(crate) csrf: String,
    /// The session's id (the cookie's value; only its hash is stored).
    pub(crate) session: String,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}
