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

/// One line of a `--targets` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// A host name, `host:port`, or a bare IP (the seed's `update_list.csv`: the host with that
    /// address, at whatever port it was registered with).
    pub name: String,
    /// Its wave (1, 2, ...), when the file gives waves.
    pub wave: Option<u32>,
    /// Its line in the file, from 1.
    pub line: u64,
}

/// The largest wave number of a targets CSV.
const MAX_WAVE: u32 = 1_000_000;

/// A `--targets` file, with the `csv` crate: one host a line (name, `host:port` or a bare IP),
/// or CSV `host,wave` as the seed's `update_list.csv` (`IP,n`); fields may be quoted, a UTF-8
/// BOM (what Windows editors write) is ignored, a first line `host,wave` is a header, and
/// `#` starts a comment. Waves are numbered from 1 (wave 0 is the canary pm-push picks
/// itself). An empty file is an error: it cannot be the selection meant.
pub fn read_targets_file(path: &Path) -> Result<Vec<Listed>, UserError> {
    let bytes = std::fs::read(path).map_err(|err| {
        UserError::usage(format!(
            "cannot read targets file `{}`: {err}",
            path.display()
        ))
    })?;
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    if let Err(err) = std::str::from_utf8(bytes) {
        return Err(UserError::usage(format!(
            "targets file `{}` is not valid UTF-8 (at byte {})",
            path.display(),
            err.valid_up_to()
        ))
        .with_hint("save it as UTF-8 (with or without a BOM)"));
    }
    let at = |line: u64| format!("{}:{line}", path.display());
    let shape = "lines are `host` or `host,wave` (waves 1, 2, ...), e.g. `10.0.0.5,1`; quote a \
                 field that holds a comma";
    // csv reads a quote left open to the end of the file as one field (`"db-1` is `db-1`, and
    // every line after it too): a host never spans lines, so a quote must close on its line.
    if let Some(line) = unclosed_quote(bytes) {
        return Err(UserError::usage(format!(
            "{}: a quote opened on this line is not closed on it",
            at(line)
        ))
        .with_hint(format!(
            "close the quote (`\"db-1\"`) or remove it; {shape}"
        )));
    }
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(bytes);
    let mut listed: Vec<Listed> = Vec::new();
    let mut seen_data = false;
    for record in reader.records() {
        let record = record.map_err(|err| {
            UserError::usage(format!(
                "targets file `{}` is not CSV: {err}",
                path.display()
            ))
            .with_hint(shape)
        })?;
        let line = record.position().map_or(0, |at| line_of(bytes, at.byte()));
        // `#` after the data starts a comment too.
        let mut fields: Vec<&str> = Vec::new();
        for field in &record {
            match field.split_once('#') {
                Some((before, _)) => {
                    fields.push(before.trim());
                    break;
                }
                None => fields.push(field),
            }
        }
        while fields.last().is_some_and(|f| f.is_empty()) {
            fields.pop();
        }
        let Some(&host) = fields.first() else {
            continue;
        };
        // A CSV header (`host,wave`) on the first line with data.
        let first = !std::mem::replace(&mut seen_data, true);
        if first && ["host", "ip", "address"].contains(&host.to_ascii_lowercase().as_str()) {
            continue;
        }
        if host.is_empty() || fields.len() > 2 {
            return Err(UserError::usage(format!(
                "{}: `{}` is not `host` or `host,wave`",
                at(line),
                fields.join(",")
            ))
            .with_hint(shape));
        }
        let wave = match fields.get(1) {
            None => None,
            Some(&"0") => {
                return Err(UserError::usage(format!(
                    "{}: wave 0 for `{host}`: the file's waves are numbered from 1",
                    at(line)
                ))
                .with_hint(
                    "wave 0 is the canary pm-push takes itself: `--canary N` takes the first N \
                     hosts of the file's first wave",
                ));
            }
            Some(text) => Some(
                text.parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_WAVE).contains(n))
                    .ok_or_else(|| {
                        UserError::usage(format!(
                            "{}: wave `{text}` is not a whole number from 1 to {MAX_WAVE}",
                            at(line)
                        ))
                        .with_hint(shape)
                    })?,
            ),
        };
        listed.push(Listed {
            name: host.to_string(),
            wave,
            line,
        });
    }
    if listed.is_empty() {
        return Err(
            UserError::usage(format!("targets file `{}` lists no host", path.display()))
                .with_hint(shape),
        );
    }
    Ok(listed)
}

/// The line (from 1) of a quoted field that does not close on the line it opened on, read as
/// csv reads quotes: a `"` starts a quoted field at the start of a field (spaces before it
/// aside), `""` inside one is a quote, and `#` outside one starts a comment.
fn unclosed_quote(bytes: &[u8]) -> Option<u64> {
    let mut line = 1u64;
    let mut i = 0;
    let mut field_start = true;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => {
                line += 1;
                field_start = true;
            }
            b',' => field_start = true,
            b' ' | b'\t' | b'\r' => {}
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' if field_start => {
                i += 1;
                loop {
                    match bytes.get(i) {
                        Some(b'"') if bytes.get(i + 1) == Some(&b'"') => i += 2,
                        Some(b'"') => break,
                        Some(b'\n') | None => return Some(line),
                        Some(_) => i += 1,
                    }
                }
                field_start = false;
            }
            _ => field_start = false,
        }
        i += 1;
    }
    None
}

/// A wave plan gives every host a wave or none: a line without one among lines with one is
/// refused, naming both (where would it go?). Activation reads the same files and ignores
/// waves, so this is the selection's check, not the reader's.
fn check_waves(path: &Path, listed: &[Listed]) -> Result<(), UserError> {
    if let (Some(with), Some(without)) = (
        listed.iter().find(|l| l.wave.is_some()),
        listed.iter().find(|l| l.wave.is_none()),
    ) {
        let at = |line: u64| format!("{}:{line}", path.display());
        return Err(UserError::usage(format!(
            "{}: `{}` has no wave, but {} gives `{}` one",
            at(without.line),
            without.name,
            at(with.line),
            with.name
        ))
        .with_hint("give every line a wave (`host,wave`) or none"));
    }
    Ok(())
}

/// The line (from 1) of the record csv places at byte `offset`: csv's position is where the
/// previous record ended, before its line end and any blank or comment lines, which are
/// skipped here.
fn line_of(bytes: &[u8], offset: u64) -> u64 {
    let mut at = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    loop {
        match bytes.get(at) {
            Some(b'\r' | b'\n') => at += 1,
            Some(b'#') if at == 0 || bytes[at - 1] == b'\n' => {
                at += bytes[at..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .unwrap_or(bytes.len() - at);
            }
            _ => break,
        }
    }
    bytes[..at].iter().filter(|&&b| b == b'\n').count() as u64 + 1
}

/// Says that a command over the whole fleet found no active host (exit 0: an empty fleet is
/// a state, not a mistake; a narrowing selection that matches nothing is an error instead).
pub fn note_no_active_host() {
    eprintln!(
        "note: this manager has no active host: nothing to do (`pm-activate host` adds hosts)"
    );
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
    /// The narrowing flags as given, for messages: `--group web --label site=paris`.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        parts.extend(self.hosts.iter().map(|h| format!("--host {h}")));
        parts.extend(self.groups.iter().map(|g| format!("--group {g}")));
        parts.extend(self.labels.iter().map(|l| format!("--label {l}")));
        parts.extend(self.cidrs.iter().map(|c| format!("--cidr {c}")));
        parts.extend(self.where_sql.iter().map(|w| format!("--where {w:?}")));
        parts.extend(
            self.targets
                .iter()
                .map(|t| format!("--targets {}", t.display())),
        );
        parts.join(" ")
    }

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
    /// `where_hosts` is the result of `--where` (the caller runs the SQL read-only). A
    /// narrowing selection that matches no active host is an error; the whole fleet (no flag,
    /// `--all`) may be empty (see [`note_no_active_host`]).
    pub fn resolve(
        &self,
        hosts: &[HostRecord],
        where_hosts: Option<&HashSet<String>>,
    ) -> Result<Vec<Target>, UserError> {
        let active: Vec<&HostRecord> = hosts.iter().filter(|h| h.state == "active").collect();
        // A name, an address, or a bare IP: the host at that IP whatever its port.
        let find = |name: &str| -> Result<Option<&HostRecord>, UserError> {
            if let Some(host) = active
                .iter()
                .find(|h| h.host == name)
                .or_else(|| active.iter().find(|h| h.address == name))
            {
                return Ok(Some(host));
            }
            let Ok(ip) = name.parse::<std::net::IpAddr>() else {
                return Ok(None);
            };
            let at_ip: Vec<&HostRecord> = active
                .iter()
                .copied()
                .filter(|h| host_ip(&h.address) == Some(ip))
                .collect();
            match at_ip.as_slice() {
                [] => Ok(None),
                [host] => Ok(Some(host)),
                several => Err(UserError::usage(format!(
                    "`{name}` is the address of several hosts: {}",
                    several
                        .iter()
                        .map(|h| format!("{} ({})", h.host, h.address))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .with_hint("name the host, or give its address with the port")),
            }
        };
        let mut unknown = Vec::new();
        let named: Option<HashSet<&str>> = match self.hosts.is_empty() {
            true => None,
            false => {
                let mut named = HashSet::new();
                for name in &self.hosts {
                    match find(name)? {
                        Some(host) => {
                            named.insert(host.host.as_str());
                        }
                        None => unknown.push(name.clone()),
                    }
                }
                Some(named)
            }
        };
        let listed: Option<Vec<Listed>> = match &self.targets {
            Some(path) => {
                let listed = read_targets_file(path)?;
                check_waves(path, &listed)?;
                Some(listed)
            }
            None => None,
        };
        let mut waves: BTreeMap<String, (Option<u32>, &Listed)> = BTreeMap::new();
        let mut file_order: Vec<String> = Vec::new();
        if let (Some(listed), Some(path)) = (&listed, &self.targets) {
            for entry in listed {
                let Some(host) = find(&entry.name)? else {
                    unknown.push(entry.name.clone());
                    continue;
                };
                match waves.get(&host.host) {
                    Some((wave, first)) if *wave != entry.wave => {
                        let at = |line: u64| format!("{}:{line}", path.display());
                        return Err(UserError::usage(format!(
                            "{} and {} both list `{}` (as `{}` and `{}`), in waves {} and {}",
                            at(first.line),
                            at(entry.line),
                            host.host,
                            first.name,
                            entry.name,
                            wave.unwrap_or_default(),
                            entry.wave.unwrap_or_default()
                        ))
                        .with_hint("a host is in one wave: list it once"));
                    }
                    Some(_) => {}
                    None => {
                        waves.insert(host.host.clone(), (entry.wave, entry));
                        file_order.push(host.host.clone());
                    }
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
                wave: waves.get(&h.host).and_then(|(wave, _)| *wave),
            })
            .collect();
        if !file_order.is_empty() {
            // A targets file keeps its order (it may be a wave plan).
            targets.sort_by_key(|t| file_order.iter().position(|h| *h == t.host));
        }
        if targets.is_empty() && !self.is_all() {
            return Err(UserError::usage(format!(
                "no active host matches the selection ({})",
                self.describe()
            ))
            .with_hint(
                "`pm-activate list` shows the active hosts with their groups, labels and \
                 addresses; `pm-query \"SELECT * FROM fleet_status\"` what --where sees",
            ));
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

    /// Reads `text` as a targets file: `(name, wave, line)` of each host, or the error.
    fn read(text: &[u8]) -> Result<Vec<(String, Option<u32>, u64)>, String> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("update_list.csv");
        std::fs::write(&file, text).unwrap();
        read_targets_file(&file)
            .map(|listed| {
                listed
                    .into_iter()
                    .map(|l| (l.name, l.wave, l.line))
                    .collect()
            })
            .map_err(|err| format!("{} / {}", err.message, err.hint.unwrap_or_default()))
    }

    fn check(text: &[u8], expected: &[(&str, Option<u32>, u64)]) {
        let expected: Vec<(String, Option<u32>, u64)> = expected
            .iter()
            .map(|(n, w, l)| (n.to_string(), *w, *l))
            .collect();
        assert_eq!(
            read(text),
            Ok(expected),
            "{:?}",
            String::from_utf8_lossy(text)
        );
    }

    fn refused(text: &[u8], says: &[&str]) {
        let err = read(text).unwrap_err();
        for part in says {
            assert!(
                err.contains(part),
                "{:?}: `{part}` not in {err}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn a_targets_file_reads_as_the_operator_wrote_it() {
        // The seed's update_list.csv: `IP,n`.
        check(
            b"192.168.100.155,1\n192.168.100.156,1\n",
            &[
                ("192.168.100.155", Some(1), 1),
                ("192.168.100.156", Some(1), 2),
            ],
        );
        // A BOM, CRLF, quoted fields, a header after the BOM, comments, blank lines.
        check(
            b"\xef\xbb\xbfhost,wave\r\n\"web-000\",\"1\"\r\n\r\n# later\r\nweb-001 , 7 # sparse\r\n",
            &[("web-000", Some(1), 2), ("web-001", Some(7), 5)],
        );
        check(
            b"\xef\xbb\xbfweb-000\nweb-001\n",
            &[("web-000", None, 1), ("web-001", None, 2)],
        );
        check(b"\"web,odd\",2\n", &[("web,odd", Some(2), 1)]);
        refused(b"web-000,0\n", &["update_list.csv:1", "wave 0", "--canary"]);
        // Read as written; a selection refuses the mix (see below), activation ignores waves.
        check(
            b"web-000,1\nweb-001\n",
            &[("web-000", Some(1), 1), ("web-001", None, 2)],
        );
        refused(b"web-000,1,x\n", &["update_list.csv:1", "`web-000,1,x`"]);
        refused(b"web-000,-2\n", &["wave `-2`"]);
        refused(b"# none\n\n", &["lists no host"]);
        refused(b"\xff\xfeweb\n", &["not valid UTF-8"]);
        // A quote left open: csv would read `db-1` (and every line after it) as one field.
        refused(
            b"\"db-1",
            &["update_list.csv:1", "not closed", "close the quote"],
        );
        refused(
            b"web-0\n\"db-1\nweb-2\n",
            &["update_list.csv:2", "not closed"],
        );
        refused(b"web-0,\"1\n", &["update_list.csv:1", "not closed"]);
        check(
            b"\"db \"\"1\"\"\",1\n# a \"quote in a comment\nweb-2,1 # and \" here\n",
            &[("db \"1\"", Some(1), 1), ("web-2", Some(1), 3)],
        );
    }

    #[test]
    fn a_bare_ip_is_the_host_at_that_address_and_a_host_is_in_one_wave() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("update_list.csv");
        let args = TargetArgs {
            targets: Some(file.clone()),
            ..TargetArgs::default()
        };
        std::fs::write(&file, "10.0.1.2,1\n\"10.0.0.1\",2\n").unwrap();
        let targets = args.resolve(&fleet(), None).unwrap();
        assert_eq!(names(&targets), ["web-2", "web-1"]);
        // Listed twice in one wave: once; in two waves: an error naming both lines.
        std::fs::write(&file, "web-1,1\n10.0.0.1,1\n").unwrap();
        assert_eq!(names(&args.resolve(&fleet(), None).unwrap()), ["web-1"]);
        std::fs::write(&file, "web-1,1\ndb-1,2\n10.0.0.1:7505,3\n").unwrap();
        let err = args.resolve(&fleet(), None).unwrap_err();
        assert!(
            err.message.contains("update_list.csv:1 and")
                && err.message.contains("update_list.csv:3 both list `web-1`")
                && err.message.contains("waves 1 and 3"),
            "{}",
            err.message
        );
        // Some lines with a wave, some without: where would they go?
        std::fs::write(&file, "web-1,1\ndb-1\n").unwrap();
        let err = args.resolve(&fleet(), None).unwrap_err();
        assert!(
            err.message
                .contains("update_list.csv:2: `db-1` has no wave")
                && err.message.contains("update_list.csv:1"),
            "{}",
            err.message
        );
        // Two hosts behind one IP: the IP alone names neither.
        let mut hosts = fleet();
        hosts.push(host("web-1b", "10.0.0.1:7506", "web", "{}"));
        std::fs::write(&file, "10.0.0.1,1\n").unwrap();
        let err = args.resolve(&hosts, None).unwrap_err();
        assert!(err.message.contains("several hosts"), "{}", err.message);
        let by_ip = TargetArgs {
            hosts: vec!["10.0.0.3".into()],
            ..TargetArgs::default()
        };
        assert_eq!(names(&by_ip.resolve(&fleet(), None).unwrap()), ["db-1"]);
    }

    #[test]
    fn a_selection_that_matches_nothing_is_an_error_and_an_empty_fleet_is_not() {
        let args = TargetArgs {
            groups: vec!["nope".into()],
            labels: vec!["site=mars".into()],
            ..TargetArgs::default()
        };
        let err = args.resolve(&fleet(), None).unwrap_err();
        assert_eq!(
            err.message,
            "no active host matches the selection (--group nope --label site=mars)"
        );
        assert!(err.hint.is_some());
        let gone: Vec<HostRecord> = fleet()
            .into_iter()
            .filter(|h| h.state != "active")
            .collect();
        assert!(
            TargetArgs::default()
                .resolve(&gone, None)
                .unwrap()
                .is_empty()
        );
    }
}
