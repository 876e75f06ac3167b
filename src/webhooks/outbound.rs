//! Where deliveries may go. By default only `https://` URLs whose host
//! resolves to public addresses: loopback, private, link-local (cloud
//! metadata, 169.254.169.254), unique-local, CGNAT, multicast and
//! unspecified addresses are refused, checked on the addresses DNS returns
//! (by the client's resolver, so a hostname pointing at 127.0.0.1 is
//! refused too) and on every connection; redirects are not followed. An
//! allow-list (hosts, addresses, CIDR blocks) opens plain `http` and
//! non-public addresses for local development and tests.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::error::{Error, Result};

/// Environment variable with the allow-list: comma-separated hosts,
/// addresses or CIDR blocks (`localhost,127.0.0.1,10.0.0.0/8`).
pub const ALLOW_ENV: &str = "OUTBOX_WEBHOOK_ALLOW";

/// The allow-list; empty by default (public HTTPS only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboundPolicy {
    hosts: Vec<String>,
    nets: Vec<IpNet>,
}

impl OutboundPolicy {
    /// Public HTTPS only.
    pub fn strict() -> Self {
        Self::default()
    }

    /// From a comma-separated list (see [`ALLOW_ENV`]).
    pub fn allowing(list: &str) -> Result<Self> {
        let mut policy = Self::default();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if let Ok(net) = entry.parse::<IpNet>() {
                policy.nets.push(net);
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                policy.nets.push(IpNet::from(ip));
            } else if entry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                policy.hosts.push(entry.to_ascii_lowercase());
            } else {
                return Err(Error::Config(format!(
                    "{ALLOW_ENV}: not a host, address or CIDR block: {entry:?}"
                )));
            }
        }
        Ok(policy)
    }

    /// From [`ALLOW_ENV`] (strict when unset).
    pub fn from_env() -> Result<Self> {
        match std::env::var(ALLOW_ENV) {
            Ok(list) => Self::allowing(&list),
            Err(_) => Ok(Self::strict()),
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    fn ip_allowed(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// Checks a URL before it is stored or sent: http(s), a host, no
    /// credentials, `https` unless the host is allow-listed, and an
    /// address literal that is public or allow-listed.
    pub fn check_url(&self, text: &str) -> Result<url::Url> {
        let refuse = |why: &str| Error::InvalidInput(format!("webhook URL refused: {why}"));
        let url = url::Url::parse(text).map_err(|e| refuse(&format!("not a URL ({e})")))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(refuse("it carries credentials; use OAuth2 settings instead"));
        }
        let host = url.host().ok_or_else(|| refuse("no host"))?;
        let (name, literal) = match host {
            url::Host::Domain(name) => (name.to_owned(), None),
            url::Host::Ipv4(ip) => (ip.to_string(), Some(IpAddr::V4(ip))),
            url::Host::Ipv6(ip) => (ip.to_string(), Some(IpAddr::V6(ip))),
        };
        let listed = self.host_allowed(&name) || literal.is_some_and(|ip| self.ip_allowed(ip));
        match url.scheme() {
            "https" => {}
            "http" if listed => {}
            "http" => {
                return Err(refuse(
                    "plain http (only https, unless the host is in OUTBOX_WEBHOOK_ALLOW)",
                ));
            }
            other => return Err(refuse(&format!("scheme {other}"))),
        }
        if let Some(ip) = literal
            && !listed
            && !is_public(ip)
        {
            return Err(refuse(&format!("{ip} is not a public address")));
        }
        Ok(url)
    }

    /// Whether a connection to `ip` for `host` may be made.
    pub(crate) fn may_connect(&self, host: &str, ip: IpAddr) -> bool {
        is_public(ip) || self.host_allowed(host) || self.ip_allowed(ip)
    }
}

/// Whether `ip` is a public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_unspecified()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && v4.octets()[2] == 0)
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

/// The client's resolver: resolves with the system's, then refuses a name
/// any of whose addresses may not be connected to (no mixing: a name
/// resolving to a public and a private address is refused whole).
#[derive(Debug, Clone)]
pub(crate) struct GuardedResolver {
    pub(crate) policy: Arc<OutboundPolicy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = Arc::clone(&self.policy);
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.is_empty() {
                return Err(format!("{host} has no address").into());
            }
            if let Some(bad) = addrs.iter().find(|a| !policy.may_connect(&host, a.ip())) {
                return Err(format!(
                    "{host} resolves to {}, which is not a public address (allow it in {ALLOW_ENV})",
                    bad.ip()
                )
                .into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        let strict = OutboundPolicy::strict();
        assert!(strict.check_url("https://hooks.example.com/x").is_ok());
        for bad in [
            "http://hooks.example.com/x",
            "https://127.0.0.1/x",
            "https://10.1.2.3/",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/",
            "https://[fd00:ec2::254]/",
            "https://user:pw@hooks.example.com/",
            "ftp://hooks.example.com/",
            "not a url",
        ] {
            assert!(strict.check_url(bad).is_err(), "{bad}");
        }
        let local = OutboundPolicy::allowing("127.0.0.1, localhost").unwrap_or_default();
        assert!(local.check_url("http://127.0.0.1:8080/hook").is_ok());
        assert!(local.check_url("http://localhost:8080/hook").is_ok());
        assert!(local.check_url("http://10.0.0.1/").is_err());
        assert!(OutboundPolicy::allowing("not/a/thing").is_err());
        assert!(is_public("8.8.8.8".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))));
        assert!(!is_public(
            "100.64.0.1".parse().unwrap_or(IpAddr::from([8, 8, 8, 8]))
        ));
    }
}
