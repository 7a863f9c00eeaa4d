//! The host registry: the rules every manager tool applies to the hosts of the inventory, so
//! that `pm-activate`, `pm-poll` and `pm-push` never carry their own.
//!
//! - **Names** ([`check_name`]): 1 to 64 of `[A-Za-z0-9._-]` (SECURITY.md), and usable in a
//!   certificate (no empty label, no label starting or ending with `-`), because the name is the
//!   common name and a subjectAltName of the host's certificate. A name belongs to one host:
//!   [`check_name_free`] refuses taking an active host's name, and a rename onto any name the
//!   inventory already holds (its history stays with it).
//! - **Addresses** ([`reach_names`], [`check_address_free`]): what a certificate must name for
//!   `https://ADDRESS` to verify, the check `pm-poll` makes; one active host per address.
//! - **Who answers** ([`Registry`], [`WrongHost`]): the certificate an agent presents must be
//!   the host's own (its recorded serial or fingerprint, or one the CA issued to its name), not
//!   another host's that answers at its address; every mutual-TLS client of the manager tools
//!   checks it before a request is sent, and `pm-poll` for the host it polls.
//! - **Certificates** ([`HostCertificate`], [`renewal_due`]): each host's serial, fingerprint and
//!   expiry; renewal once less than [`RENEW_WHEN_LEFT`] of the lifetime is left, over the
//!   mutual-TLS identity the host already has ([`renew`]).
//! - **Clocks** ([`clock_offset`], [`describe_problem`]): when a certificate is outside its
//!   validity, the message names both clocks.
//!
//! The inventory side (renames that move a host's history in one transaction, certificate
//! records) is `inventory/hosts.rs`.

use std::collections::HashMap;
use std::net::SocketAddr;

use chrono::{DateTime, Utc};
use openssl::x509::X509Ref;

use crate::cli::UserError;
use crate::inventory::HostRecord;
use crate::pki::ca::{self, IssueProblem};

pub mod renew;

/// Longest host name (X.509 `ub-common-name`).
pub const MAX_NAME: usize = 64;

/// A certificate is renewed once less than this share of its lifetime is left: 122 of 365 days
/// (cert-manager's default too). A fleet enrolled in one week renews over one week eight months
/// later, and a poll timer that stops, a manager switched off or an air-gapped site waiting for
/// a visit has four months before anything expires.
pub const RENEW_WHEN_LEFT: f64 = 1.0 / 3.0;

/// Less than this left means automatic renewal has not happened for about a month after it was
/// due: `pm-doctor` warns and the alert `PmHostCertificateExpiring` fires.
pub const OVERDUE_DAYS: i64 = 90;

/// Clocks further apart than this are refused at activation: certificates are valid from an
/// hour before they are issued, so up to an hour apart mutual TLS still works.
pub const MAX_CLOCK_SKEW: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// The name shown in messages: control characters and quotes escaped, so a name with a newline
/// cannot forge a second line of output.
fn shown(name: &str) -> String {
    name.escape_debug().to_string()
}

/// Checks a host name against the rule of SECURITY.md; `flag` is how the operator gave it
/// (`--name`), for the message. A usage error (exit 2) that says what a name may hold.
pub fn check_name(flag: &str, name: &str) -> Result<(), UserError> {
    let reason = if name.is_empty() {
        Some("it is empty".to_string())
    } else if name.len() > MAX_NAME {
        Some(format!("it is longer than {MAX_NAME} characters"))
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Some("it may hold only letters, digits, `-`, `_` and `.`".to_string())
    } else {
        ca::check_host_name(name).err().map(|err| match err {
            ca::CaError::BadHostName { reason, .. } => reason.to_string(),
            other => other.to_string(),
        })
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(UserError::usage(format!(
            "{flag} `{}` is not a host name: {reason}",
            shown(name)
        ))
        .with_hint(
            "a host name is 1 to 64 letters, digits, `-`, `_` and `.`, in dot-separated parts \
             that neither are empty nor start or end with `-` (e.g. `scan-07.paris`)",
        )),
    }
}

/// What a name is about to be used for.
#[derive(Debug, Clone, Copy)]
pub enum NameUse<'a> {
    /// A new activation of the agent at this address. Taking the name of a host activated at
    /// the same address is its re-activation (after a wipe or a reset) and allowed.
    Activate {
        /// The agent's address as the inventory records it.
        address: &'a str,
    },
    /// Renaming the host now called `from`.
    Rename {
        /// Its current name.
        from: &'a str,
    },
}

/// Refuses `name` when another host holds it (usage error, exit 2): an active host's name is
/// never taken over, and a rename never lands on a name the inventory already holds, since the
/// histories of two hosts would then read as one.
pub fn check_name_free(hosts: &[HostRecord], name: &str, to: NameUse<'_>) -> Result<(), UserError> {
    let holder = hosts
        .iter()
        .filter(|h| h.host == name)
        .max_by_key(|h| h.state == "active");
    let Some(holder) = holder else {
        return Ok(());
    };
    match to {
        NameUse::Rename { from } if from == name => Ok(()),
        NameUse::Activate { address } if holder.address == address => Ok(()),
        NameUse::Activate { .. } | NameUse::Rename { .. } if holder.state == "active" => {
            Err(UserError::usage(format!(
                "host `{name}` is active at `{}`: another host cannot take its name",
                holder.address
            ))
            .with_hint(format!(
                "pick a name no host has (`pm-activate list`), or `pm-activate deactivate \
                 {name}` first if that host is gone for good"
            )))
        }
        NameUse::Activate { .. } => Ok(()),
        NameUse::Rename { .. } => Err(UserError::usage(format!(
            "the name `{name}` belongs to a deactivated host (last at `{}`) whose history the \
             inventory keeps under it",
            holder.address
        ))
        .with_hint("pick a name no host has had (`pm-activate list` shows them all)")),
    }
}

/// Refuses to put host `name` (its name in the inventory now, or the one it is activated under)
/// at `address` when another active host is recorded there (usage error, exit 2): two hosts at
/// one address would both be answered by the one agent there, a down host would look healthy
/// and what is meant for one would reach the other.
pub fn check_address_free(
    hosts: &[HostRecord],
    address: &str,
    name: &str,
) -> Result<(), UserError> {
    let Some(holder) = hosts
        .iter()
        .find(|h| h.state == "active" && h.address == address && h.host != name)
    else {
        return Ok(());
    };
    let holder = &holder.host;
    Err(UserError::usage(format!(
        "`{address}` is the address of active host `{holder}`: host `{name}` cannot be there too"
    ))
    .with_hint(format!(
        "one active host per address: if `{holder}` is gone for good, `pm-activate deactivate \
         {holder}` first; if it moved, run `pm-activate host` at its new address first"
    )))
}

/// Addresses more than one active host is recorded at (an inventory from before the rule of
/// [`check_address_free`]), with those hosts' names, in address order.
pub fn shared_addresses(hosts: &[HostRecord]) -> Vec<(String, Vec<String>)> {
    let mut at: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for h in hosts.iter().filter(|h| h.state == "active") {
        at.entry(h.address.as_str())
            .or_default()
            .push(h.host.clone());
    }
    at.into_iter()
        .filter(|(_, names)| names.len() > 1)
        .map(|(address, names)| (address.to_string(), names))
        .collect()
}

/// An agent presents another host's certificate (or one no active host has) at an address
/// where a host is recorded: it is not that host's agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "agent `{address}` presents the certificate of {presented} (serial {serial}), not of \
     {expected}: another host's agent answers at this address (moved by hand?), so it was asked \
     nothing; put the agents back where they are recorded, or `pm-activate deactivate` a host \
     that is gone for good and run `pm-activate host {address}` for the agent that moved"
)]
pub struct WrongHost {
    /// The address connected to.
    pub address: String,
    /// The host(s) recorded at that address, as shown: `` `web-2` ``.
    pub expected: String,
    /// Whose certificate it is, as shown: `` host `web-1` `` or `no active host`.
    pub presented: String,
    /// The presented certificate's serial.
    pub serial: String,
}

/// The hosts of the inventory as the manager's mutual-TLS clients check who answers (read once
/// per command, before any agent is asked), indexed so that each check costs the same at
/// 10,000 hosts as at 10.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    hosts: Vec<HostRecord>,
    /// Active hosts by certificate serial, fingerprint and name; any host by serial.
    active_serial: HashMap<String, usize>,
    active_fingerprint: HashMap<String, usize>,
    active_name: HashMap<String, usize>,
    any_serial: HashMap<String, usize>,
    /// Active hosts by the address they are recorded at (those recorded by IP).
    at: HashMap<SocketAddr, Vec<usize>>,
}

impl Registry {
    /// The registry of these hosts (active and deactivated).
    pub fn new(hosts: Vec<HostRecord>) -> Registry {
        let mut registry = Registry::default();
        for (i, h) in hosts.iter().enumerate() {
            let active = h.state == "active";
            if let Some(serial) = &h.certificate_serial {
                registry.any_serial.entry(serial.clone()).or_insert(i);
                if active {
                    registry.active_serial.entry(serial.clone()).or_insert(i);
                }
            }
            if !active {
                continue;
            }
            if let Some(fingerprint) = &h.certificate_fingerprint {
                registry
                    .active_fingerprint
                    .entry(fingerprint.clone())
                    .or_insert(i);
            }
            registry.active_name.entry(h.host.clone()).or_insert(i);
            if let Ok(address) = h.address.parse::<SocketAddr>() {
                registry.at.entry(address).or_default().push(i);
            }
        }
        registry.hosts = hosts;
        registry
    }

    /// The host `cert` belongs to ([`find_by_certificate`]'s rule).
    pub fn owner(&self, cert: &X509Ref) -> Option<&HostRecord> {
        owner_of(cert, |key| {
            let map = match key {
                Key::ActiveSerial(_) => &self.active_serial,
                Key::ActiveFingerprint(_) => &self.active_fingerprint,
                Key::ActiveName(_) => &self.active_name,
                Key::AnySerial(_) => &self.any_serial,
            };
            map.get(key.text()).map(|&i| &self.hosts[i])
        })
    }

    /// Checks that `cert`, presented at `address`, is host `host`'s own.
    pub fn check_host(&self, host: &str, address: &str, cert: &X509Ref) -> Result<(), WrongHost> {
        self.check(address, &[host], cert)
    }

    /// Checks a new connection to `remote`: when active hosts are recorded at that address, the
    /// certificate presented must be one of theirs. Addresses recorded by name (not an IP) are
    /// not matched here; `pm-poll` checks those per host ([`Registry::check_host`]).
    pub fn check_connection(&self, remote: SocketAddr, cert: &X509Ref) -> Result<(), WrongHost> {
        let Some(here) = self.at.get(&remote) else {
            return Ok(());
        };
        let here: Vec<&str> = here.iter().map(|&i| self.hosts[i].host.as_str()).collect();
        self.check(&remote.to_string(), &here, cert)
    }

    fn check(&self, address: &str, expected: &[&str], cert: &X509Ref) -> Result<(), WrongHost> {
        let owner = self.owner(cert).filter(|h| h.state == "active");
        if owner.is_some_and(|h| expected.contains(&h.host.as_str())) {
            return Ok(());
        }
        let names = |names: &[&str]| {
            names
                .iter()
                .map(|n| format!("`{}`", shown(n)))
                .collect::<Vec<_>>()
                .join(" or ")
        };
        Err(WrongHost {
            address: address.to_string(),
            expected: names(expected),
            presented: owner.map_or_else(
                || "no active host".to_string(),
                |h| format!("host `{}`", shown(&h.host)),
            ),
            serial: ca::serial_hex(cert).unwrap_or_default(),
        })
    }
}

/// What a certificate is looked up by, in [`owner_of`]'s order.
#[derive(Clone, Copy)]
enum Key<'a> {
    ActiveSerial(&'a str),
    ActiveFingerprint(&'a str),
    ActiveName(&'a str),
    AnySerial(&'a str),
}

impl<'a> Key<'a> {
    fn text(self) -> &'a str {
        let (Key::ActiveSerial(t)
        | Key::ActiveFingerprint(t)
        | Key::ActiveName(t)
        | Key::AnySerial(t)) = self;
        t
    }
}

/// The rule of [`find_by_certificate`], over a lookup of hosts by key.
fn owner_of<'a>(
    cert: &X509Ref,
    find: impl Fn(Key<'_>) -> Option<&'a HostRecord>,
) -> Option<&'a HostRecord> {
    let serial = ca::serial_hex(cert).ok();
    let fingerprint = crate::tls::fingerprint(cert);
    let name = ca::common_name(cert);
    serial
        .as_deref()
        .and_then(|s| find(Key::ActiveSerial(s)))
        .or_else(|| find(Key::ActiveFingerprint(&fingerprint)))
        .or_else(|| name.as_deref().and_then(|n| find(Key::ActiveName(n))))
        .or_else(|| serial.as_deref().and_then(|s| find(Key::AnySerial(s))))
}

/// The host a certificate belongs to: the active host with its serial, else with its
/// fingerprint, else the active host it names (a renewal the inventory has not recorded yet:
/// the CA only ever issues a name to that host), else the (deactivated) host with its serial.
pub fn find_by_certificate<'a>(hosts: &'a [HostRecord], cert: &X509Ref) -> Option<&'a HostRecord> {
    owner_of(cert, |key| {
        let active = |h: &&HostRecord| h.state == "active";
        match key {
            Key::ActiveSerial(s) => hosts
                .iter()
                .filter(active)
                .find(|h| h.certificate_serial.as_deref() == Some(s)),
            Key::ActiveFingerprint(f) => hosts
                .iter()
                .filter(active)
                .find(|h| h.certificate_fingerprint.as_deref() == Some(f)),
            Key::ActiveName(n) => hosts.iter().filter(active).find(|h| h.host == n),
            Key::AnySerial(s) => hosts
                .iter()
                .find(|h| h.certificate_serial.as_deref() == Some(s)),
        }
    })
}

/// The host part of `host:port` (`[v6]:port` without brackets), as a URL names it.
pub fn address_host(address: &str) -> &str {
    let host = match address.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => address,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// What a certificate must name, besides the host name, for `https://ADDRESS` to verify: the
/// address's IP, or its DNS name (then also `resolved`, the IP it resolved to).
pub fn reach_names(
    address: &str,
    resolved: Option<std::net::IpAddr>,
) -> (Vec<std::net::IpAddr>, Vec<String>) {
    let host = address_host(address);
    let mut ips = Vec::new();
    let mut dns = Vec::new();
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ips.push(ip),
        Err(_) => dns.push(host.to_string()),
    }
    if let Some(ip) = resolved
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    (ips, dns)
}

/// One host's certificate as the inventory keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostCertificate {
    /// Serial, lowercase hex.
    pub serial: String,
    /// `sha256:<hex>` of its DER.
    pub fingerprint: String,
    /// Start of its validity.
    pub not_before: DateTime<Utc>,
    /// End of its validity.
    pub expires_at: DateTime<Utc>,
}

impl HostCertificate {
    /// Reads what the inventory keeps from a certificate.
    pub fn of(cert: &X509Ref) -> HostCertificate {
        let (not_before, expires_at) = ca::validity(cert);
        HostCertificate {
            serial: ca::serial_hex(cert).unwrap_or_default(),
            fingerprint: crate::tls::fingerprint(cert),
            not_before,
            expires_at,
        }
    }
}

/// What a poll saw of a host's certificate, for the inventory: the one it presents now, and the
/// serial it replaced when the poll renewed it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertificateSeen {
    /// The certificate the host presents (after a renewal: the new one).
    pub current: HostCertificate,
    /// The serial this poll retired by renewing it.
    pub renewed_from: Option<String>,
}

/// Whether a certificate valid from `not_before` to `not_after` should be renewed at `now`:
/// less than [`RENEW_WHEN_LEFT`] of its lifetime left (or already out of it).
pub fn renewal_due(
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
    now: DateTime<Utc>,
) -> bool {
    let lifetime = (not_after - not_before).num_seconds().max(1) as f64;
    let left = (not_after - now).num_seconds() as f64;
    left < lifetime * RENEW_WHEN_LEFT
}

/// How `other` stands against `ours`: `2 days behind`, `3 hours ahead of`, `in step with`
/// (rounded to the largest whole unit), to be followed by "this manager's clock" or the like.
pub fn clock_offset(other: DateTime<Utc>, ours: DateTime<Utc>) -> String {
    let seconds = (other - ours).num_seconds();
    match span(seconds.unsigned_abs()) {
        None => "in step with".to_string(),
        Some(span) if seconds < 0 => format!("{span} behind"),
        Some(span) => format!("{span} ahead of"),
    }
}

/// A length of time in its largest whole unit (`2 days`, `1 hour`); `None` under 2 seconds.
fn span(seconds: u64) -> Option<String> {
    let (n, unit) = if seconds >= 86_400 {
        ((seconds + 43_200) / 86_400, "day")
    } else if seconds >= 3_600 {
        ((seconds + 1_800) / 3_600, "hour")
    } else if seconds >= 60 {
        ((seconds + 30) / 60, "minute")
    } else if seconds > 1 {
        (seconds, "second")
    } else {
        return None;
    };
    Some(format!("{n} {unit}{}", if n == 1 { "" } else { "s" }))
}

/// RFC 3339 to the second, as messages show times.
pub fn at(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// What is wrong with a certificate `whose` (e.g. "agent `10.0.0.5:7505`'s certificate serial
/// ab12") by `clock` ("this manager's clock"): its validity and the time it was checked at.
pub fn describe_problem(whose: &str, clock: &str, problem: &IssueProblem) -> String {
    match problem {
        IssueProblem::NotIssued => format!("{whose} is not issued by this manager's CA"),
        IssueProblem::Expired { not_after, now } => format!(
            "{whose} expired at {}, {} ago by {clock}, which reads {}",
            at(*not_after),
            span((*now - *not_after).num_seconds().unsigned_abs())
                .unwrap_or_else(|| "a moment".into()),
            at(*now)
        ),
        IssueProblem::NotYetValid { not_before, now } => format!(
            "{whose} is valid only from {}, but {clock} reads {}: that clock is {} the clock \
             that issued it",
            at(*not_before),
            at(*now),
            clock_offset(*now, *not_before)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, ok: bool) {
        assert_eq!(check_name("--name", name).is_ok(), ok, "{name:?}");
    }

    #[test]
    fn host_names_follow_the_rule_and_fit_in_a_certificate() {
        for name in [
            "a21",
            "scan-07.paris",
            "web_1",
            "127.0.0.1",
            "A.b-c_d",
            &"a".repeat(64),
        ] {
            check(name, true);
        }
        for name in [
            "",
            "a b",
            "x' OR '1'='1",
            "../../etc",
            &"a".repeat(65),
            "new\nline",
            "quo\"te",
            "..",
            ".hidden",
            "-x",
            "x-",
            "a..b",
            "a:1",
            "é",
        ] {
            check(name, false);
        }
        let error = check_name("--name", "new\nline").unwrap_err();
        assert!(error.message.contains("`new\\nline`"), "{}", error.message);
        assert!(error.hint.is_some());
    }

    fn host(name: &str, address: &str, state: &str) -> HostRecord {
        HostRecord {
            state: state.into(),
            ..HostRecord::active(name, address)
        }
    }

    #[test]
    fn a_name_held_by_another_host_is_refused_with_what_to_do() {
        let hosts = [
            host("a21", "127.0.0.21:7505", "active"),
            host("a22", "127.0.0.22:7505", "active"),
            host("old", "127.0.0.30:7505", "deactivated"),
        ];
        let rename = |from| NameUse::Rename { from };
        let error = check_name_free(&hosts, "a21", rename("a22")).unwrap_err();
        assert!(error.message.contains("active at `127.0.0.21:7505`"));
        assert!(error.hint.unwrap().contains("pm-activate deactivate a21"));
        assert!(check_name_free(&hosts, "old", rename("a22")).is_err());
        assert!(check_name_free(&hosts, "a22", rename("a22")).is_ok());
        assert!(check_name_free(&hosts, "new", rename("a22")).is_ok());
        let activate = |address| NameUse::Activate { address };
        assert!(check_name_free(&hosts, "a21", activate("127.0.0.9:7505")).is_err());
        // The same host back after a wipe, or a deactivated name activated again.
        assert!(check_name_free(&hosts, "a21", activate("127.0.0.21:7505")).is_ok());
        assert!(check_name_free(&hosts, "old", activate("127.0.0.9:7505")).is_ok());
    }

    #[test]
    fn one_active_host_per_address() {
        let hosts = [
            host("a21", "127.0.0.21:7505", "active"),
            host("old", "127.0.0.30:7505", "deactivated"),
        ];
        let error = check_address_free(&hosts, "127.0.0.21:7505", "a22").unwrap_err();
        assert!(
            error.message.contains("active host `a21`"),
            "{}",
            error.message
        );
        assert!(error.hint.unwrap().contains("pm-activate deactivate a21"));
        // The host itself, another port, a deactivated host's address.
        assert!(check_address_free(&hosts, "127.0.0.21:7505", "a21").is_ok());
        assert!(check_address_free(&hosts, "127.0.0.21:7506", "a22").is_ok());
        assert!(check_address_free(&hosts, "127.0.0.30:7505", "a22").is_ok());
        assert!(shared_addresses(&hosts).is_empty());
        let shared = [
            host("b2", "127.0.0.21:7505", "active"),
            host("b3", "127.0.0.30:7505", "active"),
        ];
        let all: Vec<HostRecord> = hosts.iter().chain(&shared).cloned().collect();
        assert_eq!(
            shared_addresses(&all),
            [(
                "127.0.0.21:7505".to_string(),
                vec!["a21".to_string(), "b2".to_string()]
            )]
        );
    }

    #[test]
    fn certificates_are_renewed_with_a_third_of_their_life_left() {
        let start = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let end = start + chrono::TimeDelta::days(365);
        let day = |n| start + chrono::TimeDelta::days(n);
        assert!(!renewal_due(start, end, day(0)));
        assert!(!renewal_due(start, end, day(243)));
        assert!(renewal_due(start, end, day(244)));
        assert!(renewal_due(start, end, day(400)));
    }

    #[test]
    fn clock_offsets_read_as_words() {
        let now = Utc::now();
        let check = |delta: chrono::TimeDelta, expected: &str| {
            assert_eq!(clock_offset(now + delta, now), expected, "{delta}");
        };
        check(chrono::TimeDelta::days(-2), "2 days behind");
        check(
            chrono::TimeDelta::days(-2) + chrono::TimeDelta::seconds(3),
            "2 days behind",
        );
        check(chrono::TimeDelta::hours(3), "3 hours ahead of");
        check(chrono::TimeDelta::minutes(1), "1 minute ahead of");
        check(chrono::TimeDelta::seconds(1), "in step with");
        check(chrono::TimeDelta::days(366), "366 days ahead of");
    }

    #[test]
    fn addresses_give_the_names_a_certificate_needs() {
        let ip = |t: &str| t.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(
            reach_names("127.0.0.21:7505", None),
            (vec![ip("127.0.0.21")], vec![])
        );
        assert_eq!(reach_names("[::1]:7505", None), (vec![ip("::1")], vec![]));
        assert_eq!(
            reach_names("scan-7.lan:7505", Some(ip("10.0.0.7"))),
            (vec![ip("10.0.0.7")], vec!["scan-7.lan".to_string()])
        );
        assert_eq!(address_host("scan-7.lan"), "scan-7.lan");
    }
}
