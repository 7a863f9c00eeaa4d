//! `pm.toml`: which products are mirrored, how to reach upstream (proxy, timeouts) and how many
//! generations are kept. Errors name the file, the key and what is wrong.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

/// Default databases of a `clamav` product, as freshclam fetches them.
pub const DEFAULT_CLAMAV_DATABASES: [&str; 3] = ["main", "daily", "bytecode"];

/// A configuration problem: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing.
    #[error("no config file at `{path}`")]
    Missing { path: PathBuf },
    /// The file exists but cannot be read (or is not a regular file).
    #[error("cannot read `{path}`: {reason}")]
    Unreadable {
        path: PathBuf,
        /// Said in the message itself (not as a `source`, which would print it twice).
        reason: std::io::Error,
    },
    /// TOML syntax or a type/field error, with toml's own line and column.
    #[error("`{path}`: {message}")]
    Syntax { path: PathBuf, message: String },
    /// A value that parses but makes no sense.
    #[error("`{path}`: `{key}` {problem}")]
    Invalid {
        path: PathBuf,
        key: String,
        problem: String,
    },
}

/// The whole `pm.toml`.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Upstream feeds to mirror, in order.
    pub products: Vec<Product>,
    /// HTTP proxy for upstream requests; else `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`.
    pub proxy: Option<ProxyConfig>,
    /// How many old generations are kept.
    pub retention: Retention,
    /// Timeouts and retries of upstream requests.
    pub http: HttpConfig,
    /// How agents reach this manager's `pm-mirror serve`.
    pub serve: ServeConfig,
    /// How `pm-poll` asks agents and what the status views call stale.
    pub poll: PollConfig,
}

/// `[poll]`: how `pm-poll` works and what `fleet_status` calls inactive or stale.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollConfig {
    /// Agents asked at once.
    #[serde(default = "default_poll_concurrency")]
    pub concurrency: usize,
    /// How long one agent may take to answer.
    #[serde(default = "default_poll_timeout", with = "duration_text")]
    pub timeout: Duration,
    /// How long a whole poll may take; agents not done by then are recorded as `deadline`.
    #[serde(default = "default_poll_deadline", with = "duration_text")]
    pub deadline: Duration,
    /// No successful contact for this long: the host is `inactive`.
    #[serde(default = "default_inactive_after", with = "duration_text")]
    pub inactive_after: Duration,
    /// A last scan older than this makes the scan colour yellow.
    #[serde(default = "default_scan_max_age", with = "duration_text")]
    pub scan_max_age: Duration,
    /// `pm-poll --prune` deletes polls older than this (versions, scans and installs stay).
    #[serde(default = "default_keep_polls", with = "duration_text")]
    pub keep_polls: Duration,
    /// pm-poll prunes by itself, at most once a day, after it recorded a poll.
    #[serde(default = "default_auto_prune")]
    pub auto_prune: bool,
    /// Scans, findings, install runs and superseded versions older than this are pruned too;
    /// `None` (`"forever"`, the default): they stay.
    #[serde(default, with = "duration_or_forever")]
    pub keep_history: Option<Duration>,
}

impl Default for PollConfig {
    fn default() -> Self {
        PollConfig {
            concurrency: default_poll_concurrency(),
            timeout: default_poll_timeout(),
            deadline: default_poll_deadline(),
            inactive_after: default_inactive_after(),
            scan_max_age: default_scan_max_age(),
            keep_polls: default_keep_polls(),
            auto_prune: default_auto_prune(),
            keep_history: None,
        }
    }
}

fn default_poll_concurrency() -> usize {
    256
}
fn default_poll_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_poll_deadline() -> Duration {
    Duration::from_secs(300)
}
fn default_inactive_after() -> Duration {
    Duration::from_secs(30 * 60)
}
fn default_scan_max_age() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_keep_polls() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}
fn default_auto_prune() -> bool {
    true
}

/// `[serve]`: what agents are told about the manager's `pm-mirror serve`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Base URL of dist as agents reach it (`http://manager:8080`), sent at activation.
    #[serde(default)]
    pub url: Option<String>,
    /// How long a signed dist statement is valid: agents refuse dist once it was not re-signed
    /// (by `pm-mirror publish`, which the sync timer runs) for this long.
    #[serde(default = "default_dist_valid_for", with = "duration_text")]
    pub dist_valid_for: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            url: None,
            dist_valid_for: default_dist_valid_for(),
        }
    }
}

fn default_dist_valid_for() -> Duration {
    crate::dist_statement::DEFAULT_VALID_FOR
}

/// One mirrored upstream feed.
#[derive(Debug, Clone)]
pub struct Product {
    /// Directory name in the repository and in the served layout (`/<name>/<file>`).
    pub name: String,
    /// What kind of feed this is, with its own settings.
    pub source: ProductSource,
}

/// The feed kinds `pm-mirror sync` understands.
#[derive(Debug, Clone)]
pub enum ProductSource {
    /// ClamAV CVD databases and their cdiffs, fetched the way freshclam does.
    Clamav(ClamavSource),
    /// Any vendor feed described by a JSON index of files with sha256 and size.
    Files(FilesSource),
    /// A parent pm mirror (`pm-mirror serve`): its signed manifest and every product in it.
    Pm(PmSource),
    /// pm-agent packages from a local directory (`pm-agent-<version>-<arch>-<os>`).
    Agent(AgentSource),
}

/// Settings of a `clamav` product.
#[derive(Debug, Clone)]
pub struct ClamavSource {
    /// Base URL: files are `url/<db>.cvd` and `url/<db>-<version>.cdiff`.
    pub url: String,
    /// More base URLs tried in order when the first is unreachable or failing.
    pub fallback_urls: Vec<String>,
    /// Databases to mirror.
    pub databases: Vec<String>,
    /// How many versions of cdiffs to keep so that clients behind can update incrementally.
    pub cdiff_keep: u32,
}

/// Settings of a `files` product.
#[derive(Debug, Clone)]
pub struct FilesSource {
    /// URL of the JSON index; file paths in it are relative to this URL.
    pub index_url: String,
}

/// Settings of a `pm` product: a parent mirror whose products this mirror carries as they are.
#[derive(Debug, Clone)]
pub struct PmSource {
    /// Base URL of the parent's `pm-mirror serve`: `url/manifest.json`, `url/manifest.sig` and
    /// `url/<product>/<file>`.
    pub url: String,
    /// PEM public key the parent's manifest must be signed with (the parent's
    /// `pki/manifest-signing.pub.pem`); a relative path is relative to `pm.toml`'s directory.
    pub trusted_key: PathBuf,
}

/// Settings of an `agent` product: pm-agent executables the operator puts in a directory.
#[derive(Debug, Clone)]
pub struct AgentSource {
    /// Directory of `pm-agent-<version>-<arch>-<os>` files; a relative path is relative to
    /// `pm.toml`'s directory.
    pub dir: PathBuf,
}

/// A `[[products]]` table as written; checked into a [`Product`] by kind. (serde cannot deny
/// unknown fields through an internally tagged enum, and a typo must not pass silently.)
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProduct {
    name: String,
    kind: String,
    url: Option<String>,
    fallback_urls: Option<Vec<String>>,
    databases: Option<Vec<String>>,
    cdiff_keep: Option<u32>,
    index_url: Option<String>,
    trusted_key: Option<PathBuf>,
    dir: Option<PathBuf>,
}

impl RawProduct {
    /// Turns the table into a product; errors are `(field, problem)`. Relative paths are taken
    /// relative to `base`, the directory of `pm.toml`.
    fn into_product(self, base: &Path) -> Result<Product, (String, String)> {
        let not_for = |field: &str, present: bool| -> Result<(), (String, String)> {
            if present {
                Err((
                    field.to_string(),
                    format!("is not a setting of a `{}` product", self.kind),
                ))
            } else {
                Ok(())
            }
        };
        // A path setting that must be there and not empty, taken relative to `base`.
        let required_path =
            |field: &str, value: &Option<PathBuf>, what: &str| match value.as_deref() {
                None => Err((field.to_string(), "is missing".to_string())),
                Some(path) if path.as_os_str().is_empty() => {
                    Err((field.to_string(), format!("must name {what}")))
                }
                Some(path) => Ok(base.join(path)),
            };
        let source = match self.kind.as_str() {
            "clamav" => {
                not_for("index_url", self.index_url.is_some())?;
                not_for("trusted_key", self.trusted_key.is_some())?;
                not_for("dir", self.dir.is_some())?;
                ProductSource::Clamav(ClamavSource {
                    url: self
                        .url
                        .clone()
                        .ok_or(("url".to_string(), "is missing".to_string()))?,
                    fallback_urls: self.fallback_urls.clone().unwrap_or_default(),
                    databases: self.databases.clone().unwrap_or_else(default_databases),
                    cdiff_keep: self.cdiff_keep.unwrap_or(30),
                })
            }
            "files" => {
                not_for("url", self.url.is_some())?;
                not_for("fallback_urls", self.fallback_urls.is_some())?;
                not_for("databases", self.databases.is_some())?;
                not_for("cdiff_keep", self.cdiff_keep.is_some())?;
                not_for("trusted_key", self.trusted_key.is_some())?;
                not_for("dir", self.dir.is_some())?;
                ProductSource::Files(FilesSource {
                    index_url: self
                        .index_url
                        .clone()
                        .ok_or(("index_url".to_string(), "is missing".to_string()))?,
                })
            }
            "pm" => {
                not_for("fallback_urls", self.fallback_urls.is_some())?;
                not_for("databases", self.databases.is_some())?;
                not_for("cdiff_keep", self.cdiff_keep.is_some())?;
                not_for("index_url", self.index_url.is_some())?;
                not_for("dir", self.dir.is_some())?;
                let trusted_key = required_path(
                    "trusted_key",
                    &self.trusted_key,
                    "the parent's public key file",
                )?;
                ProductSource::Pm(PmSource {
                    url: self
                        .url
                        .clone()
                        .ok_or(("url".to_string(), "is missing".to_string()))?,
                    trusted_key,
                })
            }
            "agent" => {
                not_for("url", self.url.is_some())?;
                not_for("fallback_urls", self.fallback_urls.is_some())?;
                not_for("databases", self.databases.is_some())?;
                not_for("cdiff_keep", self.cdiff_keep.is_some())?;
                not_for("index_url", self.index_url.is_some())?;
                not_for("trusted_key", self.trusted_key.is_some())?;
                let dir = required_path("dir", &self.dir, "the directory of pm-agent packages")?;
                ProductSource::Agent(AgentSource { dir })
            }
            other => {
                return Err((
                    "kind".to_string(),
                    format!(
                        "`{other}` is not a product kind: use `clamav`, `files`, `pm` or `agent`"
                    ),
                ));
            }
        };
        Ok(Product {
            name: self.name,
            source,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    products: Vec<RawProduct>,
    #[serde(default)]
    proxy: Option<ProxyConfig>,
    #[serde(default)]
    retention: Retention,
    #[serde(default)]
    http: HttpConfig,
    #[serde(default)]
    serve: ServeConfig,
    #[serde(default)]
    poll: PollConfig,
}

/// Proxy settings; the password is read from a file so it never sits in `pm.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// `http://host:port` of the proxy.
    pub url: String,
    /// Proxy user name for basic authentication.
    #[serde(default)]
    pub username: Option<String>,
    /// File (0600) holding the proxy password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Comma-separated hosts reached directly, as in `NO_PROXY`.
    #[serde(default)]
    pub no_proxy: Option<String>,
}

/// Generation retention.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Compressed archives kept after the three backups.
    #[serde(default = "default_archives")]
    pub archives: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            archives: default_archives(),
        }
    }
}

/// Upstream request behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Whole-request timeout, e.g. "10m".
    #[serde(default = "default_timeout", with = "duration_text")]
    pub timeout: Duration,
    /// Connection timeout, e.g. "15s".
    #[serde(default = "default_connect_timeout", with = "duration_text")]
    pub connect_timeout: Duration,
    /// Retries after a 5xx, a timeout or a broken connection.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First backoff; doubled after each retry.
    #[serde(default = "default_backoff", with = "duration_text")]
    pub backoff: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            timeout: default_timeout(),
            connect_timeout: default_connect_timeout(),
            retries: default_retries(),
            backoff: default_backoff(),
        }
    }
}

fn default_databases() -> Vec<String> {
    DEFAULT_CLAMAV_DATABASES
        .iter()
        .map(|s| s.to_string())
        .collect()
}
fn default_archives() -> usize {
    5
}
fn default_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_retries() -> u32 {
    3
}
fn default_backoff() -> Duration {
    Duration::from_secs(2)
}

mod duration_text {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(de)?;
        crate::cli::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// A duration, or `"forever"` for none.
mod duration_or_forever {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(de)?;
        if text.trim() == "forever" {
            return Ok(None);
        }
        crate::cli::parse_duration(&text)
            .map(Some)
            .map_err(|err| serde::de::Error::custom(format!("{err}, or \"forever\"")))
    }
}

/// Names a product may not take because the served layout uses them.
const RESERVED_PRODUCT_NAMES: [&str; 6] = [
    "backup",
    "manifest.json",
    "manifest.sig",
    "archive",
    crate::dist_statement::STATEMENT_FILE,
    crate::dist_statement::SIGNATURE_FILE,
];

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        // Only a regular file: a FIFO here would block every tool (and the sync timer) for ever.
        let unreadable = |reason| ConfigError::Unreadable {
            path: path.to_owned(),
            reason,
        };
        let text = match crate::durable::read_regular(path) {
            Ok(bytes) => String::from_utf8(bytes).map_err(|err| {
                unreadable(std::io::Error::new(std::io::ErrorKind::InvalidData, err))
            })?,
            Err(crate::durable::OpenRegularError::Io(err))
                if err.kind() == std::io::ErrorKind::NotFound =>
            {
                return Err(ConfigError::Missing {
                    path: path.to_owned(),
                });
            }
            Err(crate::durable::OpenRegularError::Io(source)) => return Err(unreadable(source)),
            Err(not_regular) => return Err(unreadable(std::io::Error::other(not_regular))),
        };
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|err| ConfigError::Syntax {
            path: path.to_owned(),
            message: one_line(&err.to_string()),
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        let mut products = Vec::new();
        for (i, product) in raw.products.into_iter().enumerate() {
            products.push(product.into_product(base).map_err(|(field, problem)| {
                ConfigError::Invalid {
                    path: path.to_owned(),
                    key: format!("products[{i}].{field}"),
                    problem,
                }
            })?);
        }
        let config = Config {
            products,
            proxy: raw.proxy,
            retention: raw.retention,
            http: raw.http,
            serve: raw.serve,
            poll: raw.poll,
        };
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, problem: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            problem,
        };
        if !(1..=10_000).contains(&self.poll.concurrency) {
            return Err(invalid(
                "poll.concurrency".into(),
                format!("{} is out of range 1..=10000", self.poll.concurrency),
            ));
        }
        for (key, value) in [
            ("poll.timeout", self.poll.timeout),
            ("poll.deadline", self.poll.deadline),
            ("poll.inactive_after", self.poll.inactive_after),
            ("poll.scan_max_age", self.poll.scan_max_age),
            ("poll.keep_polls", self.poll.keep_polls),
            (
                "poll.keep_history",
                self.poll.keep_history.unwrap_or(Duration::MAX),
            ),
            ("serve.dist_valid_for", self.serve.dist_valid_for),
            ("http.timeout", self.http.timeout),
            ("http.connect_timeout", self.http.connect_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(key.into(), "must be longer than 0s".into()));
            }
        }
        if let Some(url) = &self.serve.url {
            check_url(url).map_err(|p| invalid("serve.url".into(), p))?;
        }
        let mut seen = std::collections::HashSet::new();
        for (i, product) in self.products.iter().enumerate() {
            let key = |field: &str| format!("products[{i}].{field}");
            let name = &product.name;
            check_product_name(name).map_err(|p| invalid(key("name"), p))?;
            if !seen.insert(name.clone()) {
                return Err(invalid(
                    key("name"),
                    format!("`{name}` is used by two products"),
                ));
            }
            match &product.source {
                ProductSource::Clamav(clamav) => {
                    check_url(&clamav.url).map_err(|p| invalid(key("url"), p))?;
                    for (j, url) in clamav.fallback_urls.iter().enumerate() {
                        check_url(url)
                            .map_err(|p| invalid(key(&format!("fallback_urls[{j}]")), p))?;
                    }
                    if clamav.databases.is_empty() {
                        return Err(invalid(key("databases"), "must list at least one".into()));
                    }
                    let mut seen_databases = std::collections::HashSet::new();
                    for db in &clamav.databases {
                        if !seen_databases.insert(db) {
                            return Err(invalid(key("databases"), format!("lists `{db}` twice")));
                        }
                        if db.is_empty()
                            || !db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        {
                            return Err(invalid(
                                key("databases"),
                                format!("`{db}` is not a ClamAV database name (e.g. daily)"),
                            ));
                        }
                    }
                    if clamav.cdiff_keep == 0 {
                        return Err(invalid(key("cdiff_keep"), "must be at least 1".into()));
                    }
                }
                ProductSource::Files(files) => {
                    check_url(&files.index_url).map_err(|p| invalid(key("index_url"), p))?;
                }
                ProductSource::Pm(pm) => {
                    check_url(&pm.url).map_err(|p| invalid(key("url"), p))?;
                }
                ProductSource::Agent(_) => {}
            }
        }
        if let Some(proxy) = &self.proxy {
            check_url(&proxy.url).map_err(|p| invalid("proxy.url".into(), p))?;
            if proxy.password_file.is_some() && proxy.username.is_none() {
                return Err(invalid(
                    "proxy.username".into(),
                    "is needed with password_file".into(),
                ));
            }
        }
        if self.http.retries > 20 {
            return Err(invalid("http.retries".into(), "must be at most 20".into()));
        }
        Ok(())
    }
}

/// Whether `name` can be a product: a directory of the repository and of the served layout.
/// Also applied to the products a parent mirror brings.
pub(crate) fn check_product_name(name: &str) -> Result<(), String> {
    let name_ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.');
    if !name_ok {
        return Err(format!(
            "`{name}` must be non-empty and use only a-z, 0-9, `-`, `_`, `.`"
        ));
    }
    if RESERVED_PRODUCT_NAMES.contains(&name) {
        return Err(format!("`{name}` is reserved by the layout"));
    }
    Ok(())
}

/// toml's messages draw the offending line over several lines; keep the gist on one.
fn one_line(message: &str) -> String {
    let mut lines = message.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default().to_string();
    match lines.next_back() {
        Some(last) if last != first => format!("{first}: {}", last.trim_start_matches(['^', ' '])),
        _ => first,
    }
}

fn check_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|err| format!("`{text}` is not a URL ({err})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("`{text}` must be an http:// or https:// URL"));
    }
    Ok(url)
}

/// An example `pm.toml`, shown in hints and written by the demo.
pub const EXAMPLE: &str = r#"[[products]]
name = "clamav"
kind = "clamav"
url = "https://database.clamav.net"
databases = ["main", "daily", "bytecode"]
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected_error: Option<&str>) {
        let result = Config::parse(text, Path::new("/h/pm.toml"));
        match (result, expected_error) {
            (Ok(_), None) => {}
            (Err(err), Some(expected)) => {
                let message = err.to_string();
                assert!(message.contains(expected), "`{message}` lacks `{expected}`");
                assert!(message.contains("/h/pm.toml"), "`{message}` names no file");
            }
            (Ok(_), Some(expected)) => panic!("accepted, expected error `{expected}`"),
            (Err(err), None) => panic!("rejected: {err}"),
        }
    }

    #[test]
    fn retention_keys_take_a_duration_and_keep_history_forever() {
        check(
            "[poll]\nkeep_history = \"forever\"\nauto_prune = false",
            None,
        );
        check("[poll]\nkeep_history = \"400d\"", None);
        check("[poll]\nkeep_history = \"0s\"", Some("poll.keep_history"));
        check("[poll]\nkeep_history = \"soon\"", Some("or \"forever\""));
        check("[poll]\nauto_prune = \"daily\"", Some("expected a boolean"));
        let config = Config::parse("[poll]\nkeep_history = \"400d\"", Path::new("pm.toml"));
        let poll = config.unwrap().poll;
        assert!(poll.auto_prune);
        assert_eq!(poll.keep_history, Some(Duration::from_secs(400 * 86400)));
    }

    #[test]
    fn issue_example_config_parses_with_defaults() {
        let text = r#"
            [[products]]
            name = "clamav"
            kind = "clamav"
            url = "http://127.0.0.1:8000"
            databases = ["test"]

            [[products]]
            name = "vendor"
            kind = "files"
            index_url = "http://127.0.0.1:8000/vendor/index.json"

            [[products]]
            name = "site"
            kind = "pm"
            url = "http://parent.internal:8080"
            trusted_key = "parent.pub.pem"
        "#;
        let config = Config::parse(text, Path::new("/h/pm.toml")).unwrap();
        assert_eq!(config.products.len(), 3);
        let ProductSource::Pm(pm) = &config.products[2].source else {
            panic!()
        };
        assert_eq!(pm.url, "http://parent.internal:8080");
        // A relative key path is relative to pm.toml's directory, not to the working directory.
        assert_eq!(pm.trusted_key, Path::new("/h/parent.pub.pem"));
        assert_eq!(config.retention.archives, 5);
        let ProductSource::Clamav(clamav) = &config.products[0].source else {
            panic!()
        };
        assert_eq!(clamav.cdiff_keep, 30);
        check(EXAMPLE, None);
    }

    #[test]
    fn the_serve_url_is_optional_checked_and_closed() {
        let config = Config::parse(
            "[serve]\nurl = \"http://manager:8080\"\n",
            Path::new("/h/pm.toml"),
        )
        .unwrap();
        assert_eq!(config.serve.url.as_deref(), Some("http://manager:8080"));
        assert!(
            Config::parse("", Path::new("/h/pm.toml"))
                .unwrap()
                .serve
                .url
                .is_none()
        );
        check("[serve]\nurl = \"ftp://x\"\n", Some("serve.url"));
        check("[serve]\nport = 1\n", Some("port"));
    }

    #[test]
    fn bad_configs_name_the_key_and_the_problem() {
        check(
            "[[products]]\nname = \"x\"\nkind = \"clamav\"\nurl = \"nope\"",
            Some("products[0].url"),
        );
        check(
            "[[products]]\nname = \"x\"\nkind = \"ftp\"\nurl = \"http://a\"",
            Some("not a product kind"),
        );
        check(
            "[[products]]\nname = \"x\"\nkind = \"clamav\"",
            Some("products[0].url` is missing"),
        );
        check(
            "[[products]]\nname = \"x\"\nkind = \"files\"\nindex_url = \"http://a/i\"\ndatabases = []",
            Some("products[0].databases` is not a setting of a `files` product"),
        );
        check(
            "[[products]]\nname = \"backup\"\nkind = \"files\"\nindex_url = \"http://a/i.json\"",
            Some("reserved"),
        );
        check(
            "[[products]]\nname = \"a\"\nkind = \"files\"\nindex_url = \"http://a/i\"\n\
             [[products]]\nname = \"a\"\nkind = \"files\"\nindex_url = \"http://a/i\"",
            Some("used by two products"),
        );
        check("[http]\ntimeout = \"soon\"", Some("not a duration"));
        check("[retention]\narchive = 3", Some("unknown field"));
        check(
            "[[products]]\nname = \"x\"\nkind = \"clamav\"\nurl = \"http://a\"\ndatabases = [\"../x\"]",
            Some("not a ClamAV database name"),
        );
        check(
            "[[products]]\nname = \"x\"\nkind = \"clamav\"\nurl = \"http://a\"\ndatabases = [\"test\", \"test\"]",
            Some("lists `test` twice"),
        );
    }

    #[test]
    fn a_pm_product_needs_a_url_and_a_trusted_key_and_nothing_else() {
        let pm = "[[products]]\nname = \"up\"\nkind = \"pm\"\n";
        check(
            &format!("{pm}url = \"http://p:8080\"\ntrusted_key = \"/etc/pm/parent.pem\""),
            None,
        );
        check(
            &format!("{pm}url = \"http://p:8080\""),
            Some("products[0].trusted_key` is missing"),
        );
        check(
            &format!("{pm}trusted_key = \"k.pem\""),
            Some("products[0].url` is missing"),
        );
        check(
            &format!("{pm}url = \"http://p:8080\"\ntrusted_key = \"\""),
            Some("products[0].trusted_key` must name the parent's public key file"),
        );
        check(
            &format!("{pm}url = \"file:///srv\"\ntrusted_key = \"k.pem\""),
            Some("products[0].url` `file:///srv` must be an http:// or https:// URL"),
        );
        check(
            &format!("{pm}url = \"http://p\"\ntrusted_key = \"k.pem\"\ndatabases = [\"daily\"]"),
            Some("products[0].databases` is not a setting of a `pm` product"),
        );
        check(
            &format!("{pm}url = \"http://p\"\ntrusted_key = \"k.pem\"\nindex_url = \"http://p/i\""),
            Some("products[0].index_url` is not a setting of a `pm` product"),
        );
        check(
            &format!("{pm}url = \"http://p\"\ntrusted_key = \"k.pem\"\ntrusted_keys = \"k\""),
            Some("unknown field `trusted_keys`"),
        );
        check(
            "[[products]]\nname = \"x\"\nkind = \"clamav\"\nurl = \"http://a\"\ntrusted_key = \"k.pem\"",
            Some("products[0].trusted_key` is not a setting of a `clamav` product"),
        );
        check(
            "[[products]]\nname = \"x\"\nkind = \"files\"\nindex_url = \"http://a/i\"\ntrusted_key = \"k.pem\"",
            Some("products[0].trusted_key` is not a setting of a `files` product"),
        );
    }

    #[test]
    fn an_agent_product_needs_a_dir_taken_relative_to_pm_toml() {
        let agent = "[[products]]\nname = \"agent\"\nkind = \"agent\"\n";
        check(
            &format!("{agent}dir = \"/var/lib/pm/agent-packages\""),
            None,
        );
        check(agent, Some("products[0].dir` is missing"));
        check(
            &format!("{agent}dir = \"\""),
            Some("products[0].dir` must name the directory of pm-agent packages"),
        );
        check(
            &format!("{agent}dir = \"p\"\nurl = \"http://a\""),
            Some("products[0].url` is not a setting of a `agent` product"),
        );
        check(
            "[[products]]\nname = \"x\"\nkind = \"files\"\nindex_url = \"http://a/i\"\ndir = \"p\"",
            Some("products[0].dir` is not a setting of a `files` product"),
        );
        let config = Config::parse(
            &format!("{agent}dir = \"packages\""),
            Path::new("/h/pm.toml"),
        )
        .unwrap();
        let ProductSource::Agent(source) = &config.products[0].source else {
            panic!("not an agent product");
        };
        assert_eq!(source.dir, Path::new("/h/packages"));
    }
}
