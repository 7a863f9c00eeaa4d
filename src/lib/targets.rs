//! The shared target selection of the manager tools (DESIGN.md section 4): `--host`, `--group`,
//! `--label k=v`, `--cidr`, `--where SQL`, `--targets FILE`, `--all`.
//!
//! Several values of one flag widen the choice (`--group a --group b`: either group); different
//! flags narrow it (`--group web --label site=paris`: web hosts in Paris). No flag, or `--all`,
//! means every active host. Names that are not active hosts are an error, never silently skipped.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::cli::UserError;
use crate::inventory::{HostRecord, Inventory};

/// The target flags, flattened into each command.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TargetArgs {
    /// A host by name or address (repeatable)
    #[arg(long = "host", value_name = "HOST")]
    pub hosts: Vec<String>,
    /// Hosts of a group (repeatable)
    #[arg(long = "group", value_name = "GROUP")]
    pub groups: Vec<String>,
    /// Hosts with a label `key=value` (repeatable: all must match)
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Hosts whose agent address is in a network, e.g. 10.0.0.0/24 (repeatable)
    #[arg(long = "cidr", value_name = "CIDR")]
    pub cidrs: Vec<String>,
    /// Hosts for which an SQL predicate on the `fleet_status` view holds, e.g. "NOT reachable"
    #[arg(long = "where", value_name = "SQL")]
    pub where_sql: Option<String>,
    /// Hosts listed in a file: one name or address a line, or CSV `host,wave`
    #[arg(long = "targets", value_name = "FILE")]
    pub targets: Option<PathBuf>,
    /// Every active host (the default when no other target flag is given)
    #[arg(long, conflicts_with_all = ["hosts", "groups", "labels", "cidrs", "where_sql", "targets"])]
    pub all: bool,
}

/// One chosen host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Its name.
    pub host: String,
    /// `host:port` of its agent.
    pub address: String,
    /// Its group.
    pub group: String,
    /// Its wave from a targets CSV (`host,wave`).
    pub wave: Option<u32>,
}

/// A `--targets` file: names or addresses in order, with their waves.
pub fn read_targets_file(path: &Path) -> Result<Vec<(String, Option<u32>)>, UserError> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        UserError::usage(format!(
            "cannot read targets file `{}`: {err}",
            path.display()
        ))
    })?;
    let mut entries: Vec<(String, Option<u32>)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut columns = line.split(',').map(str::trim);
        let host = columns.next().unwrap_or_default();
        // A CSV header line (`host,wave`) is allowed on the first line.
        if n == 0 && host.eq_ignore_ascii_case("host") {
            continue;
        }
        let wave = match columns.next() {
            None | Some("") => None,
            Some(text) => Some(text.parse::<u32>().map_err(|_| {
                UserError::usage(format!(
                    "{}:{}: wave `{text}` is not a whole number",
                    path.display(),
                    n + 1
                ))
                .with_hint("lines are `host` or `host,wave` (wave 1, 2, ...)")
            })?),
        };
        if host.is_empty() || columns.next().is_some() {
            return Err(UserError::usage(format!(
                "{}:{}: `{line}` is not `host` or `host,wave`",
                path.display(),
                n + 1
            )));
        }
        if !entries.iter().any(|(h, _)| h == host) {
            entries.push((host.to_string(), wave));
        }
    }
    Ok(entries)
}

fn parse_labels(labels: &[String]) -> Result<Vec<(String, String)>, UserError> {
    labels
        .iter()
        .map(|label| match label.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                Ok((key.trim().to_string(), value.trim().to_string()))
            }
            _ => Err(UserError::usage(format!(
                "--label `{label}` is not of the form key=value"
            ))),
        })
        .collect()
}

fn host_ip(address: &str) -> Option<std::net::IpAddr> {
    address
        .parse::<SocketAddr>()
        .map(|a| a.ip())
        .ok()
        .or_else(|| address.parse().ok())
}

impl TargetArgs {
    /// Whether any narrowing flag was given.
    pub fn is_all(&self) -> bool {
        self.hosts.is_empty()
            && self.groups.is_empty()
            && self.labels.is_empty()
            && self.cidrs.is_empty()
            && self.where_sql.is_none()
            && self.targets.is_none()
    }

    /// The hosts `--where` selects on `fleet_status` (`None` without `--where`), run in
    /// pm-query's sandbox by `Inventory::hosts_where`; a predicate that fails, reads files or is
    /// more than one condition is bad input.
    pub fn where_hosts(&self, inventory: &Inventory) -> Result<Option<HashSet<String>>, UserError> {
        let Some(sql) = &self.where_sql else {
            return Ok(None);
        };
        inventory.hosts_where(sql).map(Some).map_err(|err| {
            UserError::usage(format!(
                "--where `{sql}` does not work on fleet_status: {err}"
            ))
            .with_hint(
                "give one condition on fleet_status's columns (`pm-query \"DESCRIBE \
                     fleet_status\"` lists them), e.g. --where \"grp = 'web' AND NOT reachable\"; \
                     it runs read-only without file access, like pm-query",
            )
        })
    }

    /// Chooses among `hosts` (every host of the inventory; only active ones are chosen).
    /// `where_hosts` is the result of `--where` (the caller runs the SQL read-only).
    pub fn resolve(
        &self,
        hosts: &[HostRecord],
        where_hosts: Option<&HashSet<String>>,
    ) -> Result<Vec<Target>, UserError> {
        let active: Vec<&HostRecord> = hosts.iter().filter(|h| h.state == "active").collect();
        let find = |name: &str| {
            active
                .iter()
                .find(|h| h.host == name)
                .or_else(|| active.iter().find(|h| h.address == name))
                .copied()
        };
        let mut unknown = Vec::new();
        let named: Option<HashSet<&str>> = (!self.hosts.is_empty()).then(|| {
            self.hosts
                .iter()
                .filter_map(|name| {
                    let found = find(name).map(|h| h.host.as_str());
                    if found.is_none() {
                        unknown.push(name.clone());
                    }
                    found
                })
                .collect()
        });
        let listed: Option<Vec<(String, Option<u32>)>> = match &self.targets {
            Some(path) => Some(read_targets_file(path)?),
            None => None,
        };
        let mut waves: BTreeMap<String, Option<u32>> = BTreeMap::new();
        let mut file_order: Vec<String> = Vec::new();
        if let Some(listed) = &listed {
            for (name, wave) in listed {
                match find(name) {
                    Some(host) => {
                        waves.insert(host.host.clone(), *wave);
                        file_order.push(host.host.clone());
                    }
                    None => unknown.push(name.clone()),
                }
            }
        }
        if !unknown.is_empty() {
            return Err(UserError::usage(format!(
                "not active hosts of this manager: {}",
                unknown.join(", ")
            ))
            .with_hint("`pm-activate list` shows the hosts; activate or fix the names first"));
        }
        let labels = parse_labels(&self.labels)?;
        let cidrs: Vec<IpNet> = self
            .cidrs
            .iter()
            .map(|text| {
                text.parse::<IpNet>().map_err(|_| {
                    UserError::usage(format!("--cidr `{text}` is not a network like 10.0.0.0/24"))
                })
            })
            .collect::<Result<_, _>>()?;
        let chosen = |host: &HostRecord| -> bool {
            if named
                .as_ref()
                .is_some_and(|n| !n.contains(host.host.as_str()))
            {
                return false;
            }
            if listed.is_some() && !waves.contains_key(&host.host) {
                return false;
            }
            if !self.groups.is_empty() && !self.groups.contains(&host.group) {
                return false;
            }
            if !labels.is_empty() {
                let have: BTreeMap<String, String> =
                    serde_json::from_str(&host.labels).unwrap_or_default();
                if !labels.iter().all(|(k, v)| have.get(k) == Some(v)) {
                    return false;
                }
            }
            if !cidrs.is_empty() {
                let Some(ip) = host_ip(&host.address) else {
                    return false;
                };
                if !cidrs.iter().any(|net| net.contains(&ip)) {
                    return false;
                }
            }
            where_hosts.is_none_or(|w| w.contains(&host.host))
        };
        let mut targets: Vec<Target> = active
            .iter()
            .filter(|h| chosen(h))
            .map(|h| Target {
                host: h.host.clone(),
                address: h.address.clone(),
                group: h.group.clone(),
                wave: waves.get(&h.host).copied().flatten(),
            })
            .collect();
        if !file_order.is_empty() {
            // A targets file keeps its order (it may be a wave plan).
            targets.sort_by_key(|t| file_order.iter().position(|h| *h == t.host));
        }
        Ok(targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, address: &str, group: &str, labels: &str) -> HostRecord {
        HostRecord {
            group: group.into(),
            labels: labels.into(),
            ..HostRecord::active(name, address)
        }
    }

    fn fleet() -> Vec<HostRecord> {
        let mut gone = host("old-1", "10.0.0.9:7505", "web", "{}");
        gone.state = "deactivated".into();
        vec![
            host("web-1", "10.0.0.1:7505", "web", r#"{"site":"paris"}"#),
            host("web-2", "10.0.1.2:7505", "web", r#"{"site":"tokyo"}"#),
            host("db-1", "10.0.0.3:7505", "db", r#"{"site":"paris"}"#),
            gone,
        ]
    }

    fn names(targets: &[Target]) -> Vec<&str> {
        targets.iter().map(|t| t.host.as_str()).collect()
    }

    #[test]
    fn no_flag_means_every_active_host() {
        let targets = TargetArgs::default().resolve(&fleet(), None).unwrap();
        assert_eq!(names(&targets), ["web-1", "web-2", "db-1"]);
    }

    #[test]
    fn values_of_one_flag_widen_and_different_flags_narrow() {
        let args = TargetArgs {
            groups: vec!["web".into(), "db".into()],
            labels: vec!["site=paris".into()],
            ..TargetArgs::default()
        };
        assert_eq!(
            names(&args.resolve(&fleet(), None).unwrap()),
            ["web-1", "db-1"]
        );
        let args = TargetArgs {
            cidrs: vec!["10.0.0.0/24".into()],
            ..TargetArgs::default()
        };
        assert_eq!(
            names(&args.resolve(&fleet(), None).unwrap()),
            ["web-1", "db-1"]
        );
        let only: HashSet<String> = ["web-2".to_string()].into();
        let args = TargetArgs {
            where_sql: Some("NOT reachable".into()),
            ..TargetArgs::default()
        };
        assert_eq!(
            names(&args.resolve(&fleet(), Some(&only)).unwrap()),
            ["web-2"]
        );
    }

    #[test]
    fn unknown_or_deactivated_names_are_an_error_not_a_silent_skip() {
        let args = TargetArgs {
            hosts: vec!["web-1".into(), "old-1".into(), "nobody".into()],
            ..TargetArgs::default()
        };
        let err = args.resolve(&fleet(), None).unwrap_err();
        assert!(err.message.contains("old-1, nobody"), "{}", err.message);
        let args = TargetArgs {
            hosts: vec!["10.0.1.2:7505".into()],
            ..TargetArgs::default()
        };
        assert_eq!(names(&args.resolve(&fleet(), None).unwrap()), ["web-2"]);
        let args = TargetArgs {
            cidrs: vec!["10.0.0.0/33".into()],
            ..TargetArgs::default()
        };
        assert!(args.resolve(&fleet(), None).is_err());
    }

    #[test]
    fn a_targets_file_keeps_its_order_and_waves() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("update_list.csv");
        std::fs::write(
            &file,
            "host,wave\ndb-1,1\n# canary first\nweb-2,2\n10.0.0.1:7505,2\n",
        )
        .unwrap();
        let args = TargetArgs {
            targets: Some(file.clone()),
            ..TargetArgs::default()
        };
        let targets = args.resolve(&fleet(), None).unwrap();
        assert_eq!(names(&targets), ["db-1", "web-2", "web-1"]);
        assert_eq!(targets[0].wave, Some(1));
        assert_eq!(targets[2].wave, Some(2));
        std::fs::write(&file, "web-1,first\n").unwrap();
        let err = args.resolve(&fleet(), None).unwrap_err();
        assert!(err.message.contains(":1: wave `first`"), "{}", err.message);
    }
}
