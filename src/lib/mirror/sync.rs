//! `pm-mirror sync`: fetch every product's new components, verify them, and stage a new revision
//! of latest only when every product verified. Unchanged upstreams cost a conditional request.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use reqwest::Url;
use serde::{Deserialize, Serialize};

use crate::clamav;
use crate::config::{
    AgentSource, ClamavSource, Config, FilesSource, PmSource, Product, ProductSource,
};
use crate::inventory::{ProductState, UpstreamComponent};
use crate::manifest::{
    AGENT_KIND, ComponentEntry, FileEntry, MANIFEST_FILE, Manifest, ProductEntry, SIGNATURE_FILE,
    agent_component,
};
use crate::mirror::parent_key::{self, ParentKey};
use crate::mirror::upstream::{FetchError, Fetched, Upstream, Validators};
use crate::pki::rotation::{self, KeyChain};
use crate::repo::{Repo, StagedRevision};

/// Longest cool-down accepted from a Retry-After header.
const MAX_COOLDOWN: std::time::Duration = std::time::Duration::from_secs(7 * 86400);

/// Largest `files` index accepted.
const INDEX_SIZE_LIMIT: u64 = 64 << 20;
/// Largest parent manifest accepted.
const MANIFEST_SIZE_LIMIT: u64 = 64 << 20;
/// Largest parent manifest signature accepted (an Ed25519 signature is 64 bytes).
const SIGNATURE_SIZE_LIMIT: u64 = 4096;
/// Largest CVD accepted (ClamAV's main.cvd is about 170 MB).
const CVD_SIZE_LIMIT: u64 = 1 << 30;
/// Largest cdiff accepted (they are a few KB).
const CDIFF_SIZE_LIMIT: u64 = 64 << 20;
/// Largest detached `.sign` file accepted (a PKCS#7 signature of a few KB).
const SIGN_FILE_SIZE_LIMIT: u64 = 1 << 20;

/// How one product's sync ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProductResult {
    /// New components were downloaded and verified.
    Updated,
    /// Upstream has nothing new.
    Unchanged,
    /// Something failed; the product keeps its previous content.
    Failed,
    /// Upstream asked us to back off; not contacted, previous content kept.
    Cooldown,
    /// `--dry-run`: upstream has something new that a sync would fetch.
    WouldUpdate,
    /// A `pm` product followed its parent's rollback: the parent's dist went back to an older
    /// revision (its manifest serial went down), and so did latest.
    RolledBackByParent,
}

/// One component's versions as a sync saw them.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentReport {
    /// Component name (`daily`, a file path; `<product>/<component>` for a `pm` product).
    pub name: String,
    /// Version upstream offers, when it answered.
    pub upstream_version: Option<String>,
    /// Version in latest before the sync.
    pub previous_version: Option<String>,
    /// Version in latest after the sync.
    pub version: Option<String>,
    /// Why this component failed (a database missing upstream, ...), when it is the one that did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One product's part of the sync report.
#[derive(Debug, Clone, Serialize)]
pub struct ProductReport {
    /// Product name.
    pub name: String,
    /// `clamav`, `files` or `pm`.
    pub kind: String,
    /// How it ended.
    pub result: ProductResult,
    /// Body bytes downloaded for it.
    pub bytes_downloaded: u64,
    /// Files downloaded (not carried over).
    pub files_downloaded: usize,
    /// Its components.
    pub components: Vec<ComponentReport>,
    /// What went wrong, for `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// End of the cool-down, for `cooldown`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cooldown_until: Option<DateTime<Utc>>,
    /// Notes worth a look that are not failures (upstream older than latest, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(skip)]
    pub(crate) started_at: DateTime<Utc>,
    #[serde(skip)]
    pub(crate) finished_at: DateTime<Utc>,
    /// The manifest entries it contributes to latest: one for a `clamav` or `files` product,
    /// the parent's products for a `pm` product; empty while it has no verified content.
    #[serde(skip)]
    pub(crate) entries: Vec<ProductEntry>,
    #[serde(skip)]
    pub(crate) state: ProductState,
}

impl ProductReport {
    /// Whether it has verified content for latest (now or from an earlier sync).
    pub(crate) fn has_content(&self) -> bool {
        !self.entries.is_empty()
    }

    /// Fails it after its own sync ended well, for what only all products together show.
    fn fail(&mut self, error: String) {
        tracing::error!(product = %self.name, error = %error, "product sync failed");
        self.result = ProductResult::Failed;
        self.state.last_failure_at = Some(self.finished_at);
        self.state.last_error = Some(error.clone());
        self.error = Some(error);
    }

    /// `component=version` list for the inventory.
    pub fn versions(&self) -> String {
        self.components
            .iter()
            .filter_map(|c| Some(format!("{}={}", c.name, c.version.as_ref()?)))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Everything a product sync needs from the rest of the run.
struct ProductContext<'a> {
    home: &'a Path,
    config: &'a Config,
    upstream: &'a Upstream,
    previous: Option<&'a Manifest>,
    previous_dir: Option<std::path::PathBuf>,
    validators: BTreeMap<String, Validators>,
    dry_run: bool,
}

/// What a product sync produced besides files in the staging directory.
struct ProductOutcome {
    result: ProductResult,
    components: Vec<ComponentReport>,
    entries: Vec<ProductEntry>,
    validators: BTreeMap<String, Validators>,
    files_downloaded: usize,
    warnings: Vec<String>,
}

impl ProductOutcome {
    /// Nothing new yet; the validators as stored.
    fn unchanged(context: &ProductContext<'_>) -> ProductOutcome {
        ProductOutcome {
            result: ProductResult::Unchanged,
            components: Vec::new(),
            entries: Vec::new(),
            validators: context.validators.clone(),
            files_downloaded: 0,
            warnings: Vec::new(),
        }
    }
}

/// Why a product failed.
#[derive(Debug, thiserror::Error)]
enum ProductError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("`{url}`: {source}")]
    Clamav {
        url: String,
        source: clamav::ClamavError,
    },
    #[error("`{url}` is not found upstream (HTTP 404)")]
    NotFound { url: String },
    /// Databases missing upstream, each also the error of its own component.
    #[error("{}", .0.join("; "))]
    MissingDatabases(Vec<String>),
    #[error("`{url}`: {problem}")]
    Verify { url: String, problem: String },
    #[error("`{url}` is not a valid files index: {problem}")]
    BadIndex { url: String, problem: String },
    #[error("`{url}` is not a valid pm manifest: {problem}")]
    BadManifest { url: String, problem: String },
    #[error("cannot use the trusted key `{}` for `{url}`: {problem}", path.display())]
    TrustedKey {
        path: PathBuf,
        url: String,
        problem: String,
    },
    #[error("`{url}` is not signed by the trusted key `{}`: {problem}", key.display())]
    Untrusted {
        url: String,
        key: PathBuf,
        problem: String,
    },
    #[error(
        "the parent `{url}` has a product `{name}` and so does {other}: a mirror holds one product of each name, rename the local one"
    )]
    Conflict {
        url: String,
        name: String,
        other: String,
    },
    #[error(transparent)]
    Repo(#[from] crate::repo::RepoError),
    #[error("`{}`: {problem}", path.display())]
    Package { path: PathBuf, problem: String },
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A file of the parent's manifest could not be had as it says (404, larger, another size
    /// or sha256): maybe the parent switched dist meanwhile. Only [`sync_pm_following_a_switch`]
    /// sees it.
    /// The parent's dist statement names another manifest than the one fetched; only
    /// [`sync_pm`] sees it, and turns it into [`ProductError::ParentFile`].
    #[error("{0}")]
    Switched(String),
    #[error("{source}")]
    ParentFile {
        manifest_sha256: String,
        source: Box<ProductError>,
    },
    #[error(
        "the parent `{url}` published or rolled back while this sync ran, twice ({problem}); run sync again"
    )]
    ParentSwitched { url: String, problem: String },
}

impl ProductError {
    fn transient(&self) -> bool {
        matches!(
            self,
            ProductError::Fetch(FetchError::Network { .. } | FetchError::Status { .. })
        )
    }
}

/// What a sync run works from.
pub(crate) struct SyncInputs<'a> {
    /// The parsed `pm.toml`.
    pub config: &'a Config,
    /// Only these products (empty: all).
    pub only: &'a [String],
    /// The HTTP client.
    pub upstream: &'a Upstream,
    /// Manifest of latest before the sync.
    pub previous: Option<&'a Manifest>,
    /// The repository.
    pub repo: &'a Repo,
    /// Stored per-product upstream state.
    pub states: &'a [ProductState],
    /// Probe only; download and change nothing.
    pub dry_run: bool,
}

/// Syncs every configured product into `staged`, returning a report per product. Products in
/// cool-down or filtered out keep their previous files.
pub(crate) async fn sync_products(
    inputs: &SyncInputs<'_>,
    staged: Option<&mut StagedRevision>,
) -> Vec<ProductReport> {
    let SyncInputs {
        config,
        only,
        upstream,
        previous,
        repo,
        states,
        dry_run,
    } = *inputs;
    let mut staged = staged;
    let mut reports = Vec::new();
    let now = Utc::now();
    for product in &config.products {
        let started_at = Utc::now();
        let kind = kind_name(&product.source).to_string();
        let mut state = states
            .iter()
            .find(|s| s.product == product.name)
            .cloned()
            .unwrap_or_else(|| ProductState {
                product: product.name.clone(),
                ..Default::default()
            });
        let previous_entries: Vec<ProductEntry> = previous
            .map(|m| m.products_of(&product.name).cloned().collect())
            .unwrap_or_default();
        let previous_dir = previous.map(|m| repo.revision_dir(&m.revision));
        let carry_over_previous = |staged: &mut Option<&mut StagedRevision>| {
            if let (Some(staged), Some(manifest), Some(dir)) =
                (staged.as_deref_mut(), previous, &previous_dir)
            {
                for file in manifest.files_of_config_product(&product.name) {
                    // Never link over a file another product staged (a name clash, failed below).
                    if staged.files().iter().any(|f| f.path == file.path) {
                        return Err(format!(
                            "`{}` is also brought by another product in pm.toml",
                            file.path
                        ));
                    }
                    staged
                        .carry_over(dir, file.clone())
                        .map_err(|err| format!("{err:#}"))?;
                }
            }
            Ok::<(), String>(())
        };
        let unchanged_components = |entries: &[ProductEntry]| {
            entries
                .iter()
                .flat_map(|e| e.components.iter().map(move |c| (e, c)))
                .map(|(e, c)| ComponentReport {
                    name: e.component_label(c),
                    upstream_version: None,
                    previous_version: Some(c.version.clone()),
                    version: Some(c.version.clone()),
                    error: None,
                })
                .collect::<Vec<_>>()
        };
        let mut report = ProductReport {
            name: product.name.clone(),
            kind,
            result: ProductResult::Unchanged,
            bytes_downloaded: 0,
            files_downloaded: 0,
            components: Vec::new(),
            error: None,
            cooldown_until: None,
            warnings: Vec::new(),
            started_at,
            finished_at: started_at,
            entries: previous_entries.clone(),
            state: state.clone(),
        };

        let skipped = !only.is_empty() && !only.contains(&product.name);
        let cooling = state.cooldown_until.filter(|until| *until > now);
        if skipped || cooling.is_some() {
            if let Err(err) = carry_over_previous(&mut staged) {
                report.result = ProductResult::Failed;
                report.error = Some(err);
            } else if let Some(until) = cooling {
                report.result = ProductResult::Cooldown;
                report.cooldown_until = Some(until);
                let reason = state.cooldown_reason.clone().unwrap_or_default();
                report.warnings.push(format!(
                    "in cool-down until {until} ({reason}); not contacted"
                ));
                tracing::warn!(product = %product.name, until = %until, "product in cool-down, upstream not contacted");
            }
            report.components = unchanged_components(&previous_entries);
            report.finished_at = Utc::now();
            reports.push(report);
            continue;
        }

        let validators: BTreeMap<String, Validators> = state
            .validators
            .as_deref()
            .and_then(|json| serde_json::from_str(json).ok())
            .unwrap_or_default();
        let context = ProductContext {
            home: repo.root().parent().unwrap_or(repo.root()),
            config,
            upstream,
            previous,
            previous_dir: previous_dir.clone(),
            validators,
            dry_run,
        };
        let bytes_before = upstream.bytes_received();
        // The databases of a `clamav` product as its last try reached them.
        let mut seen: Vec<ComponentReport> = Vec::new();
        let outcome = match &product.source {
            ProductSource::Clamav(source) => {
                let mut last = None;
                let mut outcome = None;
                for base in std::iter::once(&source.url).chain(source.fallback_urls.iter()) {
                    if let Some(staged) = staged.as_deref_mut() {
                        staged.remove_product(&product.name);
                    }
                    seen.clear();
                    let synced = sync_clamav(
                        product,
                        source,
                        base,
                        &context,
                        staged.as_deref_mut(),
                        &mut seen,
                    )
                    .await;
                    match synced {
                        Err(err) if err.transient() => {
                            tracing::warn!(product = %product.name, url = %base, error = %err, "upstream failed, trying the next one");
                            last = Some(err);
                        }
                        other => {
                            outcome = Some(other);
                            break;
                        }
                    }
                }
                outcome.unwrap_or_else(|| Err(last.expect("at least one url was tried")))
            }
            ProductSource::Files(source) => {
                sync_files(product, source, &context, staged.as_deref_mut()).await
            }
            ProductSource::Pm(source) => {
                sync_pm_following_a_switch(product, source, &context, staged.as_deref_mut()).await
            }
            ProductSource::Agent(source) => {
                sync_agent(product, source, &context, staged.as_deref_mut()).await
            }
        };
        report.bytes_downloaded = upstream.bytes_received() - bytes_before;
        let finished_at = Utc::now();
        match outcome {
            Ok(outcome) => {
                report.result = outcome.result;
                report.components = outcome.components;
                report.files_downloaded = outcome.files_downloaded;
                report.warnings = outcome.warnings;
                report.entries = outcome.entries;
                state.validators = serde_json::to_string(&outcome.validators).ok();
                state.upstream_versions = Some(
                    report
                        .components
                        .iter()
                        .filter_map(|c| {
                            Some(format!("{}={}", c.name, c.upstream_version.as_ref()?))
                        })
                        .collect::<Vec<_>>()
                        .join(","),
                );
                state.upstream_checked_at = Some(finished_at);
                state.last_success_at = Some(finished_at);
                state.cooldown_until = None;
                state.cooldown_reason = None;
            }
            Err(ProductError::Fetch(FetchError::Cooldown {
                url,
                status,
                retry_after,
            })) => {
                use chrono::SubsecRound;
                // An absurd Retry-After is capped rather than trusted (or overflowing).
                let wait = chrono::Duration::from_std(retry_after.min(MAX_COOLDOWN))
                    .unwrap_or(chrono::Duration::hours(4));
                let until = finished_at
                    .checked_add_signed(wait)
                    .unwrap_or(finished_at)
                    .trunc_subsecs(0);
                tracing::warn!(product = %product.name, status, until = %until, "upstream asks to back off");
                report.result = ProductResult::Cooldown;
                report.cooldown_until = Some(until);
                // A failure like any other for `status` (its time and error), and not an
                // answer: what upstream offers is unknown until it lets us in again.
                let error = format!(
                    "upstream asked to wait: HTTP {status}, retry after {} (`{url}`)",
                    until.format("%Y-%m-%d %H:%M:%SZ")
                );
                report.error = Some(error.clone());
                state.cooldown_until = Some(until);
                state.cooldown_reason = Some(format!("HTTP {status} from {url}"));
                state.last_failure_at = Some(finished_at);
                state.last_error = Some(error.clone());
                if let Some(staged) = staged.as_deref_mut() {
                    staged.remove_product(&product.name);
                }
                if let Err(err) = carry_over_previous(&mut staged) {
                    report.result = ProductResult::Failed;
                    report.error = Some(err);
                }
                report.components =
                    components_tried(&seen, unchanged_components(&previous_entries), &error);
            }
            Err(err) => {
                tracing::error!(product = %product.name, error = %err, "product sync failed");
                report.result = ProductResult::Failed;
                report.error = Some(err.to_string());
                report.components = components_tried(
                    &seen,
                    unchanged_components(&previous_entries),
                    &err.to_string(),
                );
                state.last_failure_at = Some(finished_at);
                state.last_error = Some(err.to_string());
            }
        }
        // What this try learnt of each component upstream, for `status`.
        state.set_upstream_components(report.components.iter().map(|c| {
            (
                c.name.clone(),
                UpstreamComponent {
                    version: c.upstream_version.clone(),
                    error: c.error.clone(),
                },
            )
        }));
        report.finished_at = finished_at;
        report.state = state;
        reports.push(report);
    }
    fail_name_clashes(&mut reports);
    // What latest would hold: the staged files, or in a dry run the files the entries name.
    let files: Vec<(String, String)> = match staged.as_deref() {
        Some(staged) => staged
            .files()
            .iter()
            .map(|f| (f.product.clone(), f.path.clone()))
            .collect(),
        None => reports
            .iter()
            .flat_map(|r| r.entries.iter())
            .flat_map(|e| {
                e.components.iter().map(|c| match e.kind.as_str() {
                    "clamav" => (e.name.clone(), format!("{}/{}.cvd", e.name, c.name)),
                    _ => (e.name.clone(), format!("{}/{}", e.name, c.name)),
                })
            })
            .collect(),
    };
    fail_engine_name_clashes(&mut reports, &files);
    reports
}

/// The components of a product whose try failed: the databases it reached (`seen`, the one it
/// failed on carrying `error` unless one carries its own), then the others as latest has them,
/// not checked upstream. A product that reports no databases keeps latest's components.
fn components_tried(
    seen: &[ComponentReport],
    unchanged: Vec<ComponentReport>,
    error: &str,
) -> Vec<ComponentReport> {
    if seen.is_empty() {
        return unchanged;
    }
    let mut components = seen.to_vec();
    if components.iter().all(|c| c.error.is_none())
        && let Some(last) = components.last_mut()
    {
        last.error = Some(error.to_string());
    }
    components.extend(
        unchanged
            .into_iter()
            .filter(|c| !seen.iter().any(|s| s.name == c.name)),
    );
    components
}

/// Agents put every database file into the engine's directory by its name, and refuse a dist
/// in which two would share one (the whole fleet would be stuck). Such a revision is never
/// staged: the product that brings the second of the two files fails. `files` are (product,
/// path) of what latest would hold.
fn fail_engine_name_clashes(reports: &mut [ProductReport], files: &[(String, String)]) {
    let kind_of = |product: &str| {
        reports
            .iter()
            .flat_map(|r| r.entries.iter())
            .find(|e| e.name == product)
            .map(|e| e.kind.clone())
    };
    let mut ordered: Vec<(usize, String, String)> = files
        .iter()
        .filter_map(|(product, path)| {
            let index = reports
                .iter()
                .position(|r| r.entries.iter().any(|e| e.name == *product))?;
            Some((index, kind_of(product)?, path.clone()))
        })
        .collect();
    ordered.sort();
    let Some(clash) = crate::manifest::engine_name_clash(
        ordered
            .iter()
            .map(|(_, kind, path)| (kind.as_str(), path.as_str())),
    ) else {
        return;
    };
    let Some(&(failing, _, _)) = ordered.iter().find(|(_, _, path)| *path == clash.second) else {
        return;
    };
    reports[failing].fail(format!(
        "{clash}: rename one of them in its feed, or drop one of the products from pm.toml"
    ));
}

/// A product name may appear once in latest. `sync_pm` refuses a parent product named like a
/// local product up front; this catches what it cannot see (a dry run, content carried over
/// from an earlier sync). The `pm` product of a clashing pair fails.
fn fail_name_clashes(reports: &mut [ProductReport]) {
    let mut owner: BTreeMap<String, usize> = BTreeMap::new();
    let mut clashes = Vec::new();
    for (i, report) in reports.iter().enumerate() {
        for entry in &report.entries {
            match owner.get(&entry.name) {
                Some(&first) if first != i => clashes.push((first, i, entry.name.clone())),
                Some(_) => {}
                None => {
                    owner.insert(entry.name.clone(), i);
                }
            }
        }
    }
    for (first, second, name) in clashes {
        let (failing, other) = if reports[second].kind == "pm" {
            (second, first)
        } else {
            (first, second)
        };
        let error = format!(
            "product `{name}` is brought by both `{}` and `{}`: a mirror holds one product of each name, rename the local one",
            reports[failing].name, reports[other].name
        );
        reports[failing].fail(error);
    }
}

fn kind_name(source: &ProductSource) -> &'static str {
    match source {
        ProductSource::Clamav(_) => "clamav",
        ProductSource::Files(_) => "files",
        ProductSource::Pm(_) => "pm",
        ProductSource::Agent(_) => AGENT_KIND,
    }
}

/// `base/file`, the file's path percent-encoded ([`crate::manifest::url_path`]).
fn join(base: &str, file: &str) -> Result<Url, ProductError> {
    let text = format!(
        "{}/{}",
        base.trim_end_matches('/'),
        crate::manifest::url_path(file)
    );
    Url::parse(&text).map_err(|err| ProductError::Verify {
        url: String::new(),
        problem: format!("`{text}` is not a URL: {err}"),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, ProductError> {
    std::fs::read(path).map_err(|source| ProductError::Read {
        path: path.to_owned(),
        source,
    })
}

fn stime(header: &clamav::CvdHeader) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(header.build_time_unix, 0)
}

/// One ClamAV product: for every database, read the CVD header (conditional), and when upstream
/// is newer download the CVD and the cdiffs of the last `cdiff_keep` versions. `seen` gets each
/// database as it is reached, with the version upstream offers once its header is read, so that
/// a failure still says what upstream offered (`status`). A database missing upstream fails the
/// product with its own error; the databases after it are still probed, not downloaded.
async fn sync_clamav(
    product: &Product,
    source: &ClamavSource,
    base: &str,
    context: &ProductContext<'_>,
    mut staged: Option<&mut StagedRevision>,
    seen: &mut Vec<ComponentReport>,
) -> Result<ProductOutcome, ProductError> {
    let mut missing = Vec::new();
    let mut entry = ProductEntry {
        name: product.name.clone(),
        kind: "clamav".into(),
        via: None,
        version: None,
        components: Vec::new(),
    };
    let mut outcome = ProductOutcome::unchanged(context);
    for db in &source.databases {
        let cvd_name = format!("{db}.cvd");
        let cvd_path = format!("{}/{cvd_name}", product.name);
        let cvd_url = join(base, &cvd_name)?;
        let previous_db_files: Vec<FileEntry> = context
            .previous
            .map(|m| {
                m.files_of_config_product(&product.name)
                    .filter(|f| f.component == *db)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let previous_cvd = previous_db_files.iter().find(|f| f.path == cvd_path);
        let previous_version: Option<u32> =
            previous_cvd.and_then(|f| f.version.as_deref()?.parse().ok());
        seen.push(ComponentReport {
            name: db.clone(),
            upstream_version: None,
            previous_version: previous_version.map(|v| v.to_string()),
            version: previous_version.map(|v| v.to_string()),
            error: None,
        });
        // Only a file we still have makes a conditional request meaningful.
        let validators = previous_cvd.and_then(|_| context.validators.get(cvd_url.as_str()));
        let probe = context
            .upstream
            .fetch_head(&cvd_url, clamav::CVD_HEADER_LEN as u64, validators)
            .await?;
        let upstream_header = match probe {
            Fetched::NotModified => None,
            Fetched::NotFound => {
                let error = ProductError::NotFound {
                    url: cvd_url.to_string(),
                }
                .to_string();
                if let Some(component) = seen.last_mut() {
                    component.error = Some(error.clone());
                }
                missing.push(error);
                continue;
            }
            Fetched::Body { body, validators } => {
                let header =
                    clamav::parse_cvd_header(&body).map_err(|source| ProductError::Clamav {
                        url: cvd_url.to_string(),
                        source,
                    })?;
                outcome.validators.insert(cvd_url.to_string(), validators);
                Some(header)
            }
        };
        let upstream_version = upstream_header
            .as_ref()
            .map(|h| h.version)
            .or(previous_version);
        if let Some(component) = seen.last_mut() {
            component.upstream_version = upstream_version.map(|v| v.to_string());
        }
        if !missing.is_empty() {
            // The product fails for the database missing upstream: nothing is worth downloading.
            continue;
        }
        let newer = match (upstream_header.as_ref(), previous_version) {
            (None, Some(_)) => false,
            (Some(header), Some(previous)) if header.version < previous => {
                outcome.warnings.push(format!(
                    "`{cvd_url}` offers {db} version {} but latest already has {previous}; keeping {previous}",
                    header.version
                ));
                false
            }
            (Some(header), Some(previous)) => header.version > previous,
            (_, None) => true,
        };
        let mut component = ComponentReport {
            name: db.clone(),
            upstream_version: upstream_version.map(|v| v.to_string()),
            previous_version: previous_version.map(|v| v.to_string()),
            version: previous_version.map(|v| v.to_string()),
            error: None,
        };
        if !newer {
            if let (Some(staged), Some(dir)) = (staged.as_deref_mut(), &context.previous_dir) {
                for file in &previous_db_files {
                    staged.carry_over(dir, file.clone())?;
                }
            }
            if let Some(previous) = previous_cvd {
                entry.components.push(ComponentEntry {
                    name: db.clone(),
                    version: previous.version.clone().unwrap_or_default(),
                    build_time: previous.build_time,
                });
            }
            outcome.components.push(component);
            continue;
        }
        if context.dry_run {
            outcome.result = ProductResult::WouldUpdate;
            component.version = component.upstream_version.clone();
            outcome.components.push(component);
            continue;
        }
        let Some(staged) = staged.as_deref_mut() else {
            continue;
        };
        outcome.result = ProductResult::Updated;

        let target = staged.path_for(&cvd_path)?;
        let downloaded = download_required(context, &cvd_url, &target, CVD_SIZE_LIMIT).await?;
        let bytes = read(&target)?;
        // Inflating and hashing main.cvd takes seconds: keep it off the async workers.
        let header = tokio::task::spawn_blocking(move || clamav::verify_cvd(&bytes))
            .await
            .expect("cvd verification does not panic")
            .map_err(|source| ProductError::Clamav {
                url: cvd_url.to_string(),
                source,
            })?;
        let version = header.version;
        // The header probe and the download can reach CDN edges in different states: never let
        // the download move latest backwards or sideways.
        if let Some(previous) = previous_version
            && version <= previous
        {
            return Err(ProductError::Verify {
                url: cvd_url.to_string(),
                problem: format!(
                    "upstream announced version {} but served {version}, not newer than latest's \
                     {previous} (a mirror edge is behind); latest is kept, try again later",
                    upstream_version.unwrap_or(version)
                ),
            });
        }
        let build_time = stime(&header);
        outcome.files_downloaded += 1;
        staged.add(FileEntry {
            path: cvd_path.clone(),
            size: downloaded.size,
            sha256: downloaded.sha256,
            product: product.name.clone(),
            component: db.clone(),
            version: Some(version.to_string()),
            build_time,
        });
        // ClamAV (1.5+) names a CVD's detached signature after the version it signs.
        let sign_name = format!("{db}-{version}.cvd.sign");
        let sign = sign_entry(product, db, &sign_name, version);
        outcome.files_downloaded +=
            fetch_sign_file(context, staged, join(base, &sign_name)?, sign, &target).await?;
        entry.components.push(ComponentEntry {
            name: db.clone(),
            version: version.to_string(),
            build_time,
        });
        component.version = Some(version.to_string());
        component.upstream_version = Some(version.to_string());
        outcome.components.push(component);

        // The cdiffs of the newest versions, newest first, until upstream no longer has one.
        let oldest = version.saturating_sub(source.cdiff_keep - 1).max(1);
        for cdiff_version in (oldest..=version).rev() {
            let name = clamav::cdiff_file_name(db, cdiff_version);
            let path = format!("{}/{name}", product.name);
            if let (Some(previous), Some(dir)) = (
                previous_db_files.iter().find(|f| f.path == path),
                &context.previous_dir,
            ) {
                staged.carry_over(dir, previous.clone())?;
                let sign = format!("{path}.sign");
                if let Some(sign) = previous_db_files.iter().find(|f| f.path == sign) {
                    staged.carry_over(dir, sign.clone())?;
                }
                continue;
            }
            let url = join(base, &name)?;
            let target = staged.path_for(&path)?;
            let downloaded = match context
                .upstream
                .download(&url, &target, CDIFF_SIZE_LIMIT)
                .await?
            {
                Fetched::Body { body, .. } => body,
                _ => {
                    let _ = std::fs::remove_file(&target);
                    break;
                }
            };
            let sign_name = format!("{name}.sign");
            let sign = sign_entry(product, db, &sign_name, cdiff_version);
            let checked = match clamav::verify_cdiff(&read(&target)?) {
                Ok(_) => {
                    fetch_sign_file(context, staged, join(base, &sign_name)?, sign, &target).await
                }
                Err(source) => Err(ProductError::Clamav {
                    url: url.to_string(),
                    source,
                }),
            };
            match checked {
                Ok(signs) => outcome.files_downloaded += 1 + signs,
                // freshclam meets a cdiff that does not verify by downloading the whole CVD,
                // which latest holds (verified above). Left out, the cdiff costs clients at the
                // version before it the whole CVD (as it does freshclam); the older cdiffs lead
                // only to it, so they go too. Said in the report, `mirror_syncs` and status.
                Err(ProductError::Clamav {
                    url: failed,
                    source,
                }) => {
                    let _ = std::fs::remove_file(&target);
                    let _ = std::fs::remove_file(staged.path_for(&format!("{path}.sign"))?);
                    // The cdiff itself, or its detached signature.
                    let why = if failed == url.as_str() {
                        source.to_string()
                    } else {
                        format!("`{failed}`: {source}")
                    };
                    let warning = format!(
                        "`{url}` is damaged upstream ({why}): left out with the older cdiffs; \
                         clients at {db} {} or older download the whole `{cvd_name}` (version \
                         {version}, verified) instead, as freshclam does",
                        cdiff_version - 1
                    );
                    tracing::warn!(product = %product.name, %url, error = %source, "a damaged cdiff upstream is left out; clients fall back to the whole CVD");
                    outcome.warnings.push(warning);
                    break;
                }
                Err(other) => return Err(other),
            }
            staged.add(FileEntry {
                path,
                size: downloaded.size,
                sha256: downloaded.sha256,
                product: product.name.clone(),
                component: db.clone(),
                version: Some(cdiff_version.to_string()),
                build_time: None,
            });
        }
    }
    if !missing.is_empty() {
        return Err(ProductError::MissingDatabases(missing));
    }
    outcome.entries = vec![entry];
    Ok(outcome)
}

/// Downloads a file upstream must have: a 404 is an error.
async fn download_required(
    context: &ProductContext<'_>,
    url: &Url,
    target: &Path,
    limit: u64,
) -> Result<crate::mirror::upstream::Downloaded, ProductError> {
    match context.upstream.download(url, target, limit).await? {
        Fetched::Body { body, .. } => Ok(body),
        _ => Err(ProductError::NotFound {
            url: url.to_string(),
        }),
    }
}

/// Downloads the detached `.sign` file of `signed` when upstream offers one (older upstreams do
/// not: 404 is fine) and checks that its PKCS#7 signature covers the file. The signer chain is not
/// validated: ClamAV's root certificate is not configured here; the RSA signatures in the CVD
/// and cdiff themselves are the trust anchor. `entry` names the file; size and hash are filled in.
async fn fetch_sign_file(
    context: &ProductContext<'_>,
    staged: &mut StagedRevision,
    url: Url,
    mut entry: FileEntry,
    signed: &Path,
) -> Result<usize, ProductError> {
    let target = staged.path_for(&entry.path)?;
    let body = match context
        .upstream
        .download(&url, &target, SIGN_FILE_SIZE_LIMIT)
        .await?
    {
        Fetched::Body { body, .. } => body,
        _ => {
            let _ = std::fs::remove_file(&target);
            return Ok(0);
        }
    };
    clamav::verify_sign_file(&read(&target)?, &read(signed)?, None).map_err(|source| {
        ProductError::Clamav {
            url: url.to_string(),
            source,
        }
    })?;
    entry.size = body.size;
    entry.sha256 = body.sha256;
    staged.add(entry);
    Ok(1)
}

/// The manifest entry of a `.sign` file before it is downloaded.
fn sign_entry(product: &Product, component: &str, name: &str, version: u32) -> FileEntry {
    FileEntry {
        path: format!("{}/{name}", product.name),
        size: 0,
        sha256: String::new(),
        product: product.name.clone(),
        component: component.to_string(),
        version: Some(version.to_string()),
        build_time: None,
    }
}

/// A vendor's JSON index of files.
#[derive(Debug, Deserialize)]
struct FilesIndex {
    version: String,
    files: Vec<IndexedFile>,
}

#[derive(Debug, Deserialize)]
struct IndexedFile {
    path: String,
    size: u64,
    sha256: String,
    #[serde(default)]
    version: Option<String>,
}

/// One `files` product: conditional fetch of the index, then every file whose sha256 differs
/// from latest, each verified for size and sha256.
async fn sync_files(
    product: &Product,
    source: &FilesSource,
    context: &ProductContext<'_>,
    mut staged: Option<&mut StagedRevision>,
) -> Result<ProductOutcome, ProductError> {
    let index_url = Url::parse(&source.index_url).map_err(|err| ProductError::Verify {
        url: String::new(),
        problem: err.to_string(),
    })?;
    let previous_files: Vec<FileEntry> = context
        .previous
        .map(|m| m.files_of_config_product(&product.name).cloned().collect())
        .unwrap_or_default();
    let previous_entry = context
        .previous
        .and_then(|m| m.products_of(&product.name).next())
        .cloned();
    let validators = (!previous_files.is_empty())
        .then(|| context.validators.get(index_url.as_str()))
        .flatten();
    let mut product_entry = ProductEntry {
        name: product.name.clone(),
        kind: "files".into(),
        via: None,
        version: None,
        components: Vec::new(),
    };
    let mut outcome = ProductOutcome::unchanged(context);
    let (body, new_validators) = match context
        .upstream
        .fetch_small(&index_url, validators, INDEX_SIZE_LIMIT)
        .await?
    {
        Fetched::NotModified => {
            if let (Some(staged), Some(dir)) = (staged.as_deref_mut(), &context.previous_dir) {
                for file in &previous_files {
                    staged.carry_over(dir, file.clone())?;
                }
            }
            let entry = previous_entry.unwrap_or(product_entry);
            outcome.components = entry
                .components
                .iter()
                .map(|c| ComponentReport {
                    name: c.name.clone(),
                    upstream_version: Some(c.version.clone()),
                    previous_version: Some(c.version.clone()),
                    version: Some(c.version.clone()),
                    error: None,
                })
                .collect();
            outcome.entries = vec![entry];
            return Ok(outcome);
        }
        Fetched::NotFound => {
            return Err(ProductError::NotFound {
                url: index_url.to_string(),
            });
        }
        Fetched::Body { body, validators } => (body, validators),
    };
    let bad_index = |problem: String| ProductError::BadIndex {
        url: index_url.to_string(),
        problem,
    };
    let index: FilesIndex =
        serde_json::from_slice(&body).map_err(|err| bad_index(err.to_string()))?;
    let mut seen = std::collections::HashSet::new();
    for file in &index.files {
        if !crate::manifest::safe_relative_path(&file.path) {
            return Err(bad_index(format!("unsafe path `{}`", file.path)));
        }
        if !seen.insert(file.path.as_str()) {
            return Err(bad_index(format!("`{}` is listed twice", file.path)));
        }
        if file.sha256.len() != 64 || !file.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad_index(format!("`{}` has no valid sha256", file.path)));
        }
    }
    outcome
        .validators
        .insert(index_url.to_string(), new_validators);
    for file in &index.files {
        let name = file.path.rsplit('/').next().unwrap_or(&file.path);
        if crate::manifest::engine_loads("files", name)
            && !crate::manifest::engine_file_name_ok(name)
        {
            outcome.warnings.push(format!(
                "`{}/{}` is served, but agents do not install it into the engine's database \
                 directory, whose names are letters, digits, `-`, `_` and `.`: ask the feed to \
                 rename it",
                product.name, file.path
            ));
        }
    }
    product_entry.version = Some(index.version.clone());
    for file in &index.files {
        let path = format!("{}/{}", product.name, file.path);
        let sha256 = file.sha256.to_ascii_lowercase();
        let version = file
            .version
            .clone()
            .unwrap_or_else(|| index.version.clone());
        let previous = previous_files.iter().find(|f| f.path == path);
        let unchanged = previous.is_some_and(|p| p.sha256 == sha256 && p.size == file.size);
        outcome.components.push(ComponentReport {
            name: file.path.clone(),
            upstream_version: Some(version.clone()),
            previous_version: previous.and_then(|p| p.version.clone()),
            version: Some(version.clone()),
            error: None,
        });
        product_entry.components.push(ComponentEntry {
            name: file.path.clone(),
            version: version.clone(),
            build_time: None,
        });
        let entry = FileEntry {
            path: path.clone(),
            size: file.size,
            sha256: sha256.clone(),
            product: product.name.clone(),
            component: file.path.clone(),
            version: Some(version),
            build_time: None,
        };
        if unchanged {
            if let (Some(staged), Some(dir)) = (staged.as_deref_mut(), &context.previous_dir) {
                staged.carry_over(dir, entry)?;
            }
            continue;
        }
        if context.dry_run {
            outcome.result = ProductResult::WouldUpdate;
            continue;
        }
        let Some(staged) = staged.as_deref_mut() else {
            continue;
        };
        outcome.result = ProductResult::Updated;
        let url = index_url
            .join(&crate::manifest::url_path(&file.path))
            .map_err(|err| bad_index(err.to_string()))?;
        let index_dir = index_url
            .join(".")
            .map_err(|err| bad_index(err.to_string()))?;
        if url.origin() != index_url.origin() || !url.path().starts_with(index_dir.path()) {
            return Err(bad_index(format!(
                "`{}` leaves the index's location",
                file.path
            )));
        }
        let target = staged.path_for(&path)?;
        // The index says the size: anything longer is refused as it arrives.
        let downloaded = download_required(context, &url, &target, file.size).await?;
        if downloaded.size != file.size {
            return Err(ProductError::Verify {
                url: url.to_string(),
                problem: format!(
                    "size is {} bytes, the index says {}",
                    downloaded.size, file.size
                ),
            });
        }
        if downloaded.sha256 != sha256 {
            return Err(ProductError::Verify {
                url: url.to_string(),
                problem: format!("sha256 is {}, the index says {sha256}", downloaded.sha256),
            });
        }
        outcome.files_downloaded += 1;
        staged.add(entry);
    }
    if outcome.result == ProductResult::Unchanged
        && previous_entry.as_ref().and_then(|e| e.version.as_ref()) != Some(&index.version)
        && !previous_files.is_empty()
    {
        // Same files, new index version: the revision changes only in its metadata.
        outcome.result = ProductResult::Updated;
    }
    outcome.entries = vec![product_entry];
    Ok(outcome)
}

/// A `pm` product's sync, run once more when a file of the parent's manifest could not be had
/// as the manifest says (404, larger, another size or sha256) because the parent switched dist
/// while it ran (a publish or a rollback between its manifest and its files): the manifest is
/// fetched again and, when it is no longer the one the sync worked from, the sync starts over
/// from the new one, as the manifest fetch does for a signature that does not match. One retry:
/// a parent that switches again fails the product, saying so.
async fn sync_pm_following_a_switch(
    product: &Product,
    source: &PmSource,
    context: &ProductContext<'_>,
    mut staged: Option<&mut StagedRevision>,
) -> Result<ProductOutcome, ProductError> {
    let mut switched = false;
    loop {
        let error = match sync_pm(product, source, context, staged.as_deref_mut()).await {
            Ok(mut outcome) => {
                if switched {
                    outcome.warnings.push(
                        "the parent published or rolled back while this sync ran; this sync \
                         followed its new dist"
                            .into(),
                    );
                }
                return Ok(outcome);
            }
            Err(ProductError::ParentFile {
                manifest_sha256,
                source: error,
            }) if parent_switched(context, source, &manifest_sha256).await => error,
            Err(ProductError::ParentFile { source: error, .. }) => return Err(*error),
            Err(error) => return Err(error),
        };
        if switched {
            return Err(ProductError::ParentSwitched {
                url: source.url.clone(),
                problem: error.to_string(),
            });
        }
        tracing::warn!(product = %product.name, error = %error, "the parent switched dist while this sync ran; starting over from its new manifest");
        switched = true;
    }
}

/// Whether the parent's `manifest.json` is now another than the one whose sha256 is given
/// (fetched unconditionally; only to decide a retry, which verifies everything again).
async fn parent_switched(
    context: &ProductContext<'_>,
    source: &PmSource,
    manifest_sha256: &str,
) -> bool {
    let Ok(url) = join(&source.url, MANIFEST_FILE) else {
        return false;
    };
    match context
        .upstream
        .fetch_small(&url, None, MANIFEST_SIZE_LIMIT)
        .await
    {
        Ok(Fetched::Body { body, .. }) => {
            crate::manifest::hex(&openssl::sha::sha256(&body)) != manifest_sha256
        }
        _ => false,
    }
}

/// One `pm` product: a parent pm mirror. A conditional GET of its `manifest.json`, the Ed25519
/// signature `manifest.sig` checked with the trusted key, then every file of the manifest at the
/// same path (carried over from latest when its sha256 and size are unchanged), each checked
/// for size and sha256 against the signed manifest, and the files of ClamAV products verified
/// like a `clamav` product verifies them. The parent's products are contributed as they are.
async fn sync_pm(
    product: &Product,
    source: &PmSource,
    context: &ProductContext<'_>,
    mut staged: Option<&mut StagedRevision>,
) -> Result<ProductOutcome, ProductError> {
    let key_path = &source.trusted_key;
    let key_error = |problem: String| ProductError::TrustedKey {
        path: key_path.clone(),
        url: source.url.clone(),
        problem,
    };
    // The operator's key, or the one the parent's rotations followed before lead to.
    let mut trusted = ParentKey::load(context.home, &product.name, key_path).map_err(key_error)?;
    let mut chain_fetched = false;
    let mut followed_now: Option<Vec<u64>> = None;
    let manifest_url = join(&source.url, MANIFEST_FILE)?;
    let signature_url = join(&source.url, SIGNATURE_FILE)?;
    let previous_files: Vec<FileEntry> = context
        .previous
        .map(|m| m.files_of_config_product(&product.name).cloned().collect())
        .unwrap_or_default();
    let previous_entries: Vec<ProductEntry> = context
        .previous
        .map(|m| m.products_of(&product.name).cloned().collect())
        .unwrap_or_default();
    let mut outcome = ProductOutcome::unchanged(context);
    let mut validators = (!previous_files.is_empty())
        .then(|| context.validators.get(manifest_url.as_str()))
        .flatten();
    // The parent may publish between the two requests: a signature that does not match gets one
    // more try with both fetched again.
    let mut attempt = 0;
    let (manifest_bytes, new_validators) = loop {
        attempt += 1;
        let (body, new_validators) = match context
            .upstream
            .fetch_small(&manifest_url, validators, MANIFEST_SIZE_LIMIT)
            .await?
        {
            Fetched::NotModified => {
                check_parent_names(
                    product,
                    source,
                    context,
                    staged.as_deref(),
                    previous_entries.iter().map(|e| e.name.as_str()),
                )?;
                if let (Some(staged), Some(dir)) = (staged.as_deref_mut(), &context.previous_dir) {
                    for file in &previous_files {
                        staged.carry_over(dir, file.clone())?;
                    }
                }
                outcome.components = parent_components(&previous_entries, &previous_entries);
                outcome.entries = previous_entries;
                return Ok(outcome);
            }
            Fetched::NotFound => {
                return Err(ProductError::NotFound {
                    url: manifest_url.to_string(),
                });
            }
            Fetched::Body { body, validators } => (body, validators),
        };
        let untrusted = |problem: String| ProductError::Untrusted {
            url: manifest_url.to_string(),
            key: key_path.clone(),
            problem,
        };
        match context
            .upstream
            .fetch_small(&signature_url, None, SIGNATURE_SIZE_LIMIT)
            .await?
        {
            Fetched::Body {
                body: signature, ..
            } => {
                if !chain_fetched && !trusted.key.verify(&body, &signature) {
                    // The parent may have rotated its key: its chain says whether the key this
                    // mirror trusts moved on, and to which key.
                    chain_fetched = true;
                    if let Some(next) =
                        follow_parent_chain(context, source, &trusted, &manifest_url).await?
                    {
                        followed_now = Some(next.rotations().split_off(trusted.followed.len()));
                        trusted = next;
                    }
                }
                if trusted.key.verify(&body, &signature) {
                    break (body, new_validators);
                }
                if attempt < 2 {
                    tracing::warn!(product = %product.name, url = %signature_url, "the parent's manifest signature does not match; fetching both again");
                    validators = None;
                } else {
                    return Err(untrusted(format!(
                        "the signature `{signature_url}` does not match, and {} ({}) to the key \
                         that made it: the parent's key was replaced without a rotation \
                         statement (`pm-mirror key rotate --old-key-lost`), or this is not the \
                         parent's key",
                        parent_key::NOT_FOLLOWED,
                        trusted.fingerprint
                    )));
                }
            }
            _ => {
                return Err(untrusted(format!(
                    "its signature `{signature_url}` is not found (HTTP 404)"
                )));
            }
        }
    };
    if let Some(rotations) = followed_now {
        let rotations = rotations
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let verb = if context.dry_run {
            "would follow"
        } else {
            let record = trusted
                .record(context.home, &product.name)
                .map_err(|err| key_error(format!("cannot record the parent's new key: {err}")))?;
            tracing::info!(product = %product.name, key = %trusted.fingerprint, record = %record.display(), "followed the parent's key rotation");
            "followed"
        };
        outcome.warnings.push(format!(
            "{verb} the parent's key rotation {rotations} to {}",
            trusted.fingerprint
        ));
    }
    let parent = check_parent_manifest(&manifest_url, &manifest_bytes)?;
    check_parent_names(
        product,
        source,
        context,
        staged.as_deref(),
        parent.products.iter().map(|e| e.name.as_str()),
    )?;
    let followed = context
        .validators
        .get(manifest_url.as_str())
        .filter(|_| !previous_entries.is_empty());
    let dist_serial = check_parent_statement(
        context,
        source,
        &trusted,
        &parent,
        followed.and_then(|v| v.dist_serial),
    )
    .await
    .map_err(|err| match err {
        // A statement naming another manifest: the parent may have switched dist in between,
        // which the caller tells apart and follows once.
        ProductError::Switched(problem) => ProductError::ParentFile {
            manifest_sha256: crate::manifest::hex(&openssl::sha::sha256(&manifest_bytes)),
            source: Box::new(ProductError::Verify {
                url: join(&source.url, crate::dist_statement::STATEMENT_FILE)
                    .map(|u| u.to_string())
                    .unwrap_or_default(),
                problem,
            }),
        },
        err => err,
    })?;
    // The serial latest followed: a parent's dist whose serial is lower was rolled back there.
    let followed_serial = followed.and_then(|v| v.manifest_serial);
    let rolled_back = followed_serial.is_some_and(|followed| parent.serial < followed);
    outcome.validators.insert(
        manifest_url.to_string(),
        Validators {
            manifest_serial: Some(parent.serial),
            dist_serial,
            ..new_validators
        },
    );
    outcome.entries = parent
        .products
        .iter()
        .cloned()
        .map(|mut entry| {
            entry.via = Some(product.name.clone());
            entry
        })
        .collect();
    outcome.components = parent_components(&outcome.entries, &previous_entries);
    if rolled_back {
        let changes: Vec<String> = outcome
            .components
            .iter()
            .filter_map(|c| {
                let (new, old) = (c.version.as_ref()?, c.previous_version.as_ref()?);
                (new != old).then(|| format!("{} {old} -> {new}", c.name))
            })
            .collect();
        outcome.warnings.push(format!(
            "rolled back by the parent: its dist went back to {} (manifest serial {} -> {}){}",
            parent.revision,
            followed_serial.unwrap_or_default(),
            parent.serial,
            if changes.is_empty() {
                String::new()
            } else {
                format!(": {}", changes.join(", "))
            }
        ));
    }
    for component in outcome.components.iter().filter(|_| !rolled_back) {
        let (Some(new), Some(old)) = (&component.version, &component.previous_version) else {
            continue;
        };
        if let (Ok(new), Ok(old)) = (new.parse::<u64>(), old.parse::<u64>())
            && new < old
        {
            outcome.warnings.push(format!(
                "the parent has {} version {new}, older than {old} in latest; following the parent",
                component.name
            ));
        }
    }
    let mut sorted_previous = previous_files.clone();
    sorted_previous.sort();
    let mut sorted_parent = parent.files.clone();
    sorted_parent.sort();
    let unchanged = sorted_previous == sorted_parent && outcome.entries == previous_entries;
    if context.dry_run {
        if !unchanged {
            outcome.result = ProductResult::WouldUpdate;
        }
        return Ok(outcome);
    }
    let Some(staged) = staged else {
        return Ok(outcome);
    };
    if !unchanged {
        outcome.result = if rolled_back {
            ProductResult::RolledBackByParent
        } else {
            ProductResult::Updated
        };
    }
    match fetch_parent_files(context, &source.url, &parent, staged).await {
        Ok(downloaded) => outcome.files_downloaded = downloaded,
        Err(err) => {
            // Leave nothing half-staged behind for a cool-down's carry-over.
            for entry in &parent.products {
                staged.remove_product(&entry.name);
            }
            return Err(match err {
                ProductError::NotFound { .. }
                | ProductError::Verify { .. }
                | ProductError::Fetch(FetchError::TooLarge { .. }) => ProductError::ParentFile {
                    manifest_sha256: crate::manifest::hex(&openssl::sha::sha256(&manifest_bytes)),
                    source: Box::new(err),
                },
                err => err,
            });
        }
    }
    Ok(outcome)
}

/// The parent's `keys.json` followed from `trusted`: the key it leads to, or `None` when the
/// parent serves no chain (a pm from before rotations) or its chain does not move `trusted` on.
/// A statement that starts from `trusted` but that key did not sign refuses the sync.
/// The parent's signed dist statement (`dist.json`, SECURITY.md's rollback and freeze attacks),
/// as agents check it: signed by the parent's key, naming the manifest fetched, not older than
/// one this mirror followed before (an old dist replayed: a parent's own rollback signs a newer
/// statement), not expired (a frozen copy). A parent that serves none is followed as before,
/// until one was seen. Returns its `dist_serial` to record.
async fn check_parent_statement(
    context: &ProductContext<'_>,
    source: &PmSource,
    trusted: &ParentKey,
    parent: &Manifest,
    followed: Option<u64>,
) -> Result<Option<u64>, ProductError> {
    use crate::dist_statement::{DistStatement, MAX_STATEMENT_BYTES, STATEMENT_FILE};
    let url = join(&source.url, STATEMENT_FILE)?;
    let refused = |problem: String| ProductError::Verify {
        url: url.to_string(),
        problem,
    };
    let body = match context
        .upstream
        .fetch_small(&url, None, MAX_STATEMENT_BYTES)
        .await?
    {
        Fetched::Body { body, .. } => body,
        _ => {
            return match followed {
                Some(serial) => Err(refused(format!(
                    "the parent serves no signed dist statement, but this mirror followed one                      (dist serial {serial}) before: something strips it, or the parent's                      repository was replaced by an older one"
                ))),
                None => Ok(None),
            };
        }
    };
    let signature_url = join(&source.url, crate::dist_statement::SIGNATURE_FILE)?;
    let signature = match context
        .upstream
        .fetch_small(&signature_url, None, SIGNATURE_SIZE_LIMIT)
        .await?
    {
        Fetched::Body { body, .. } => body,
        _ => {
            return Err(refused(format!(
                "its signature `{signature_url}` is not found"
            )));
        }
    };
    if !trusted.key.verify(&body, &signature) {
        return Err(refused(format!(
            "it is not signed by the parent's key {}",
            trusted.fingerprint
        )));
    }
    let statement: DistStatement = serde_json::from_slice(&body)
        .map_err(|err| refused(format!("it is not a dist statement this pm reads ({err})")))?;
    if !statement.names(parent) {
        return Err(ProductError::Switched(format!(
            "it names {} (serial {}) but the manifest served is {} (serial {}): the parent \
             published or rolled back while this sync ran, or a cache mixes two dists; run sync \
             again",
            statement.revision, statement.manifest_serial, parent.revision, parent.serial
        )));
    }
    if let Some(serial) = followed.filter(|serial| statement.dist_serial < *serial) {
        return Err(refused(format!(
            "its dist serial {} ({}, signed {}) is older than the {serial} this mirror followed: \
             an old dist of the parent is being replayed; check what serves the parent's URL",
            statement.dist_serial,
            statement.revision,
            statement.signed_at.format("%Y-%m-%d %H:%M:%SZ"),
        )));
    }
    if statement.is_expired(Utc::now()) {
        return Err(refused(format!(
            "it expired at {}: the parent's dist has not been re-signed for longer than it \
             allows (its publish timer stopped, or this is a frozen copy)",
            statement.expires_at.format("%Y-%m-%d %H:%M:%SZ")
        )));
    }
    Ok(Some(statement.dist_serial))
}

async fn follow_parent_chain(
    context: &ProductContext<'_>,
    source: &PmSource,
    trusted: &ParentKey,
    manifest_url: &Url,
) -> Result<Option<ParentKey>, ProductError> {
    let chain_url = join(&source.url, rotation::SERVED_FILE)?;
    let body = match context
        .upstream
        .fetch_small(&chain_url, None, rotation::MAX_CHAIN_BYTES)
        .await?
    {
        Fetched::Body { body, .. } => body,
        _ => return Ok(None),
    };
    KeyChain::parse(&body)
        .and_then(|chain| trusted.follow(&chain))
        .map_err(|err| ProductError::Untrusted {
            url: manifest_url.to_string(),
            key: source.trusted_key.clone(),
            problem: format!("the parent's key chain `{chain_url}` is refused: {err}"),
        })
}

/// Parses a parent's (verified) manifest and checks that it can be carried as it is: product
/// names that make plain directories, every file under its product's directory, safe paths, no
/// duplicates, valid sha256.
fn check_parent_manifest(url: &Url, bytes: &[u8]) -> Result<Manifest, ProductError> {
    let bad = |problem: String| ProductError::BadManifest {
        url: url.to_string(),
        problem,
    };
    let mut parent: Manifest = serde_json::from_slice(bytes).map_err(|err| bad(err.to_string()))?;
    if parent.products.is_empty() {
        return Err(bad("it lists no products".into()));
    }
    let mut names = HashSet::new();
    for entry in &parent.products {
        crate::config::check_product_name(&entry.name)
            .map_err(|problem| bad(format!("product name {problem}")))?;
        if !names.insert(entry.name.as_str()) {
            return Err(bad(format!("product `{}` is listed twice", entry.name)));
        }
    }
    let mut paths = HashSet::new();
    for file in &parent.files {
        if !crate::manifest::safe_relative_path(&file.path) {
            return Err(bad(format!("unsafe path `{}`", file.path)));
        }
        if !names.contains(file.product.as_str()) {
            return Err(bad(format!(
                "`{}` belongs to `{}`, which is not one of its products",
                file.path, file.product
            )));
        }
        if !file.path.starts_with(&format!("{}/", file.product)) {
            return Err(bad(format!(
                "`{}` is not inside the directory of its product `{}`",
                file.path, file.product
            )));
        }
        if !paths.insert(file.path.as_str()) {
            return Err(bad(format!("`{}` is listed twice", file.path)));
        }
        if file.sha256.len() != 64 || !file.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad(format!("`{}` has no valid sha256", file.path)));
        }
    }
    for file in &mut parent.files {
        file.sha256.make_ascii_lowercase();
    }
    Ok(parent)
}

/// Refuses parent products named like another product of `pm.toml` or like one another
/// product already staged: one directory, one product.
fn check_parent_names<'a>(
    product: &Product,
    source: &PmSource,
    context: &ProductContext<'_>,
    staged: Option<&StagedRevision>,
    names: impl Iterator<Item = &'a str>,
) -> Result<(), ProductError> {
    for name in names {
        let local = context
            .config
            .products
            .iter()
            .find(|p| p.name == name && p.name != product.name);
        let conflict = |other: String| ProductError::Conflict {
            url: source.url.clone(),
            name: name.to_string(),
            other,
        };
        if let Some(local) = local {
            return Err(conflict(format!("the product `{}` in pm.toml", local.name)));
        }
        if staged.is_some_and(|s| s.files().iter().any(|f| f.product == name)) {
            return Err(conflict("another product in pm.toml".into()));
        }
    }
    Ok(())
}

/// The report's components of the parent's products, `<product>/<component>`, with the
/// versions latest had.
fn parent_components(entries: &[ProductEntry], previous: &[ProductEntry]) -> Vec<ComponentReport> {
    let previous_version = |label: &str| {
        previous
            .iter()
            .flat_map(|e| e.components.iter().map(move |c| (e.component_label(c), c)))
            .find(|(l, _)| l == label)
            .map(|(_, c)| c.version.clone())
    };
    entries
        .iter()
        .flat_map(|e| e.components.iter().map(move |c| (e, c)))
        .map(|(entry, component)| {
            let name = entry.component_label(component);
            ComponentReport {
                previous_version: previous_version(&name),
                upstream_version: Some(component.version.clone()),
                version: Some(component.version.clone()),
                name,
                error: None,
            }
        })
        .collect()
}

/// Stages every file of a parent's manifest: carried over from latest when its path, size and
/// sha256 are unchanged, else downloaded from `base/<path>` and checked against the manifest.
/// Then the files of ClamAV products are verified the way a `clamav` product verifies them.
/// Returns how many files were downloaded.
async fn fetch_parent_files(
    context: &ProductContext<'_>,
    base: &str,
    parent: &Manifest,
    staged: &mut StagedRevision,
) -> Result<usize, ProductError> {
    let mut downloaded: HashSet<&str> = HashSet::new();
    for file in &parent.files {
        let unchanged = context
            .previous
            .and_then(|m| m.file(&file.path))
            .is_some_and(|p| p.sha256 == file.sha256 && p.size == file.size);
        if let (true, Some(dir)) = (unchanged, &context.previous_dir) {
            staged.carry_over(dir, file.clone())?;
            continue;
        }
        let url = join(base, &file.path)?;
        let target = staged.path_for(&file.path)?;
        let body = download_required(context, &url, &target, file.size).await?;
        if body.size != file.size {
            return Err(ProductError::Verify {
                url: url.to_string(),
                problem: format!(
                    "size is {} bytes, the parent's manifest says {}",
                    body.size, file.size
                ),
            });
        }
        if body.sha256 != file.sha256 {
            return Err(ProductError::Verify {
                url: url.to_string(),
                problem: format!(
                    "sha256 is {}, the parent's manifest says {}",
                    body.sha256, file.sha256
                ),
            });
        }
        staged.add(file.clone());
        downloaded.insert(&file.path);
    }
    // ClamAV's own checks once every file is in place: a `.sign` may sort before what it signs.
    let clamav_products: HashSet<&str> = parent
        .products
        .iter()
        .filter(|p| p.kind == "clamav")
        .map(|p| p.name.as_str())
        .collect();
    for file in &parent.files {
        if !clamav_products.contains(file.product.as_str()) {
            continue;
        }
        let path = file.path.as_str();
        let url = join(base, path)?.to_string();
        let clamav_error = |source| ProductError::Clamav {
            url: url.clone(),
            source,
        };
        if path.ends_with(".sign") {
            let signed = signed_file(path).ok_or_else(|| ProductError::Verify {
                url: url.clone(),
                problem: "is a signature of no file name ClamAV publishes".into(),
            })?;
            if !downloaded.contains(path) && !downloaded.contains(signed.as_str()) {
                continue;
            }
            if parent.file(&signed).is_none() {
                return Err(ProductError::Verify {
                    url: url.clone(),
                    problem: format!("signs `{signed}`, which the parent's manifest does not list"),
                });
            }
            let sign = read(&staged.path_for(path)?)?;
            let signed_bytes = read(&staged.path_for(&signed)?)?;
            clamav::verify_sign_file(&sign, &signed_bytes, None).map_err(clamav_error)?;
        } else if !downloaded.contains(path) {
            continue;
        } else if path.ends_with(".cvd") {
            let bytes = read(&staged.path_for(path)?)?;
            let header = tokio::task::spawn_blocking(move || clamav::verify_cvd(&bytes))
                .await
                .expect("cvd verification does not panic")
                .map_err(clamav_error)?;
            if let Some(version) = &file.version
                && *version != header.version.to_string()
            {
                return Err(ProductError::Verify {
                    url: url.clone(),
                    problem: format!(
                        "is version {}, the parent's manifest says {version}",
                        header.version
                    ),
                });
            }
        } else if path.ends_with(".cdiff") {
            clamav::verify_cdiff(&read(&staged.path_for(path)?)?).map_err(clamav_error)?;
        }
    }
    Ok(downloaded.len())
}

/// One pm-agent package found in an `agent` product's directory.
#[derive(Debug)]
struct AgentPackage {
    path: PathBuf,
    file_name: String,
    version: String,
    /// Its component, `pm-agent-<arch>-<os>`.
    component: String,
    size: u64,
    sha256: String,
}

/// What a package file must be named like, for error messages.
const AGENT_PACKAGE_PATTERN: &str =
    "`pm-agent-<version>-<arch>-<os>`, e.g. `pm-agent-0.1.0-x86_64-linux`";

/// Splits `pm-agent-<version>-<arch>-<os>` into version, arch and os. The version may hold `-`
/// (a pre-release); arch (`x86_64`) and os never do, so they are the last two parts.
fn parse_agent_package_name(name: &str) -> Option<(&str, &str, &str)> {
    let rest = name.strip_prefix("pm-agent-")?;
    let (rest, os) = rest.rsplit_once('-')?;
    let (version, arch) = rest.rsplit_once('-')?;
    let word = |part: &str| {
        !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let version_ok = version_core(version).is_some()
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-'));
    (version_ok && word(arch) && word(os)).then_some((version, arch, os))
}

/// The numeric core of a semver-ish version (`1.2.3` of `1.2.3-rc.1+build`): one or more
/// dot-separated numbers.
fn version_core(version: &str) -> Option<Vec<u64>> {
    let without_build = version.split('+').next()?;
    let core = without_build.split('-').next()?;
    core.split('.')
        .map(|n| {
            (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .then(|| n.parse().ok())
                .flatten()
        })
        .collect()
}

/// Semver precedence of two versions [`parse_agent_package_name`] accepted: the numeric core,
/// then a release above its pre-releases, pre-release identifiers numerically or by text; build
/// metadata is ignored except as a last tie-break (so the order is total).
fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let pre = |v: &'_ str| -> Option<String> {
        let without_build = v.split('+').next().unwrap_or_default();
        without_build.split_once('-').map(|(_, p)| p.to_string())
    };
    let core_order = version_core(a).cmp(&version_core(b));
    let pre_order = match (pre(a), pre(b)) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(x), Some(y)) => {
            let mut left = x.split('.');
            let mut right = y.split('.');
            loop {
                match (left.next(), right.next()) {
                    (None, None) => break Ordering::Equal,
                    (None, Some(_)) => break Ordering::Less,
                    (Some(_), None) => break Ordering::Greater,
                    (Some(l), Some(r)) => {
                        let order = match (l.parse::<u64>(), r.parse::<u64>()) {
                            (Ok(l), Ok(r)) => l.cmp(&r),
                            (Ok(_), Err(_)) => Ordering::Less,
                            (Err(_), Ok(_)) => Ordering::Greater,
                            (Err(_), Err(_)) => l.cmp(r),
                        };
                        if order != Ordering::Equal {
                            break order;
                        }
                    }
                }
            }
        }
    };
    core_order.then(pre_order).then_with(|| a.cmp(b))
}

/// Reads an `agent` product's directory: every file must be a pm-agent package (name and ELF
/// magic checked); per platform the highest version wins. Hidden files are ignored (editors and
/// copy tools leave them). Blocking: it hashes every package.
fn read_agent_packages(dir: &Path) -> Result<Vec<AgentPackage>, ProductError> {
    let read_error = |source| ProductError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut best: BTreeMap<String, AgentPackage> = BTreeMap::new();
    for dir_entry in std::fs::read_dir(dir).map_err(read_error)? {
        let dir_entry = dir_entry.map_err(read_error)?;
        let path = dir_entry.path();
        let file_name = dir_entry.file_name().to_string_lossy().into_owned();
        if file_name.starts_with('.') {
            continue;
        }
        let problem = |problem: String| ProductError::Package {
            path: path.clone(),
            problem,
        };
        let Some((version, arch, os)) = parse_agent_package_name(&file_name) else {
            return Err(problem(format!(
                "is not named like a pm-agent package: expected {AGENT_PACKAGE_PATTERN}"
            )));
        };
        if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            return Err(problem("is not a plain file".into()));
        }
        let (size, sha256, magic) = hash_file(&path).map_err(|source| ProductError::Read {
            path: path.clone(),
            source,
        })?;
        if magic != *b"\x7fELF" {
            return Err(problem(
                "is not an ELF executable: a pm-agent package is the pm-agent binary itself".into(),
            ));
        }
        let package = AgentPackage {
            path: path.clone(),
            file_name: file_name.clone(),
            version: version.to_string(),
            component: agent_component(arch, os),
            size,
            sha256,
        };
        match best.get(&package.component) {
            Some(other)
                if compare_versions(&other.version, &package.version)
                    != std::cmp::Ordering::Less => {}
            _ => {
                best.insert(package.component.clone(), package);
            }
        }
    }
    Ok(best.into_values().collect())
}

/// Size, sha256 and the first four bytes of a file.
fn hash_file(path: &Path) -> std::io::Result<(u64, String, [u8; 4])> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = openssl::sha::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut magic = [0u8; 4];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        let start = size.min(4) as usize;
        let take = (4 - start).min(n);
        magic[start..start + take].copy_from_slice(&buffer[..take]);
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    Ok((size, crate::manifest::hex(&hasher.finish()), magic))
}

/// One `agent` product: the pm-agent packages in a local directory, the highest version per
/// platform, one component `pm-agent-<arch>-<os>` each at `<product>/<file name>`. A package
/// whose size and sha256 latest already has is carried over; others are copied in and checked
/// again after the copy (a file changing under the sync fails it rather than shipping a mix).
async fn sync_agent(
    product: &Product,
    source: &AgentSource,
    context: &ProductContext<'_>,
    staged: Option<&mut StagedRevision>,
) -> Result<ProductOutcome, ProductError> {
    let dir = source.dir.clone();
    let packages = tokio::task::spawn_blocking(move || read_agent_packages(&dir))
        .await
        .expect("reading packages does not panic")?;
    let previous_files: Vec<FileEntry> = context
        .previous
        .map(|m| m.files_of_config_product(&product.name).cloned().collect())
        .unwrap_or_default();
    let mut outcome = ProductOutcome::unchanged(context);
    if packages.is_empty() {
        outcome.warnings.push(format!(
            "`{}` holds no pm-agent package ({AGENT_PACKAGE_PATTERN})",
            source.dir.display()
        ));
    }
    let mut product_entry = ProductEntry {
        name: product.name.clone(),
        kind: AGENT_KIND.into(),
        via: None,
        version: None,
        components: Vec::new(),
    };
    let mut files = Vec::new();
    for package in &packages {
        let component = package.component.clone();
        let entry = FileEntry {
            path: format!("{}/{}", product.name, package.file_name),
            size: package.size,
            sha256: package.sha256.clone(),
            product: product.name.clone(),
            component: component.clone(),
            version: Some(package.version.clone()),
            build_time: None,
        };
        let previous = previous_files.iter().find(|f| f.component == component);
        outcome.components.push(ComponentReport {
            name: component.clone(),
            upstream_version: Some(package.version.clone()),
            previous_version: previous.and_then(|p| p.version.clone()),
            version: Some(package.version.clone()),
            error: None,
        });
        product_entry.components.push(ComponentEntry {
            name: component,
            version: package.version.clone(),
            build_time: None,
        });
        files.push((package, entry));
    }
    let unchanged = |entry: &FileEntry| {
        previous_files
            .iter()
            .any(|p| p.path == entry.path && p.sha256 == entry.sha256 && p.size == entry.size)
    };
    let same_set = files.len() == previous_files.len() && files.iter().all(|(_, e)| unchanged(e));
    if !same_set {
        outcome.result = if context.dry_run {
            ProductResult::WouldUpdate
        } else {
            ProductResult::Updated
        };
    }
    if let Some(staged) = staged {
        for (package, entry) in files {
            if let (true, Some(dir)) = (unchanged(&entry), &context.previous_dir) {
                staged.carry_over(dir, entry)?;
                continue;
            }
            staged.copy_in(&package.path, entry.clone())?;
            let copy = staged.path_for(&entry.path)?;
            let (size, sha256, _) = hash_file(&copy).map_err(|source| ProductError::Read {
                path: copy.clone(),
                source,
            })?;
            if size != entry.size || sha256 != entry.sha256 {
                return Err(ProductError::Package {
                    path: package.path.clone(),
                    problem: "changed while it was copied; run the sync again".into(),
                });
            }
            outcome.files_downloaded += 1;
        }
    }
    outcome.entries = vec![product_entry];
    Ok(outcome)
}

/// Where a file of a revision can be fetched again, for `pm-mirror repair`.
#[derive(Debug, Clone)]
pub(crate) enum Origin {
    /// Upstream or the parent mirror serves it at this URL (ClamAV: each configured URL).
    Url(Url),
    /// An `agent` product's package directory holds it.
    File(PathBuf),
}

/// Where `pm.toml`'s product `config_product` offers the file `path` of a revision (as sync
/// would fetch it): for a `clamav` product `url/<name>` and each fallback, for `files` the
/// index's location, for `pm` the parent's `url/<path>`, for `agent` the package directory.
/// Empty when the product is no longer in pm.toml.
pub(crate) fn origins(config: &Config, config_product: &str, path: &str) -> Vec<Origin> {
    let Some(product) = config.products.iter().find(|p| p.name == config_product) else {
        return Vec::new();
    };
    let relative = path
        .strip_prefix(&format!("{}/", product.name))
        .unwrap_or(path);
    match &product.source {
        ProductSource::Clamav(source) => std::iter::once(&source.url)
            .chain(source.fallback_urls.iter())
            .filter_map(|base| join(base, relative).ok())
            .map(Origin::Url)
            .collect(),
        ProductSource::Files(source) => Url::parse(&source.index_url)
            .ok()
            .and_then(|index| {
                let url = index.join(&crate::manifest::url_path(relative)).ok()?;
                let dir = index.join(".").ok()?;
                (url.origin() == index.origin() && url.path().starts_with(dir.path()))
                    .then_some(url)
            })
            .map(Origin::Url)
            .into_iter()
            .collect(),
        ProductSource::Pm(source) => join(&source.url, path)
            .ok()
            .map(Origin::Url)
            .into_iter()
            .collect(),
        ProductSource::Agent(source) => vec![Origin::File(source.dir.join(relative))],
    }
}

/// ClamAV's own checks of a file of a `clamav` product fetched again, as sync checks them: a
/// CVD's RSA signature and MD5, a cdiff's signature, a detached `.sign` against the file it
/// signs (`signed`, read from the revision). Other files pass.
pub(crate) fn verify_clamav_file(
    path: &str,
    file: &Path,
    signed: Option<&Path>,
) -> Result<(), String> {
    let read = |path: &Path| read(path).map_err(|err| err.to_string());
    let checked = if path.ends_with(".cvd") {
        clamav::verify_cvd_file(file).map(drop)
    } else if path.ends_with(".cdiff") {
        clamav::verify_cdiff(&read(file)?).map(drop)
    } else if let (true, Some(signed)) = (path.ends_with(".sign"), signed) {
        clamav::verify_sign_file(&read(file)?, &read(signed)?, None).map(drop)
    } else {
        Ok(())
    };
    checked.map_err(|err| err.to_string())
}

/// The file a ClamAV detached signature signs: `X.cdiff.sign` signs `X.cdiff`,
/// `<db>-<N>.cvd.sign` signs `<db>.cvd`.
pub(crate) fn signed_file(path: &str) -> Option<String> {
    let unsigned = path.strip_suffix(".sign")?;
    if unsigned.ends_with(".cdiff") {
        return Some(unsigned.to_string());
    }
    let (db, version) = unsigned.strip_suffix(".cvd")?.rsplit_once('-')?;
    let numbered = !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit());
    (numbered && !db.is_empty() && !db.ends_with('/')).then(|| format!("{db}.cvd"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The URLs (or file) `origins` gives for `path` of pm.toml product `product`.
    fn check_origins(products: &str, product: &str, path: &str, expected: &[&str]) {
        let config = Config::parse(products, Path::new("pm.toml")).unwrap();
        let found: Vec<String> = origins(&config, product, path)
            .into_iter()
            .map(|origin| match origin {
                Origin::Url(url) => url.to_string(),
                Origin::File(path) => path.display().to_string(),
            })
            .collect();
        assert_eq!(found, expected, "{product} {path}");
    }

    #[test]
    fn a_file_is_fetched_again_where_its_product_offers_it() {
        let products = r#"
[[products]]
name = "clamav"
kind = "clamav"
url = "http://a.example/clamav/"
fallback_urls = ["http://b.example/db"]
databases = ["daily"]
[[products]]
name = "vendor"
kind = "files"
index_url = "http://c.example/feed/index.json"
[[products]]
name = "parent"
kind = "pm"
url = "http://d.example:8080"
trusted_key = "/etc/pm/parent.pem"
[[products]]
name = "agent"
kind = "agent"
dir = "/srv/agents"
"#;
        check_origins(
            products,
            "clamav",
            "clamav/daily-2.cdiff",
            &[
                "http://a.example/clamav/daily-2.cdiff",
                "http://b.example/db/daily-2.cdiff",
            ],
        );
        check_origins(
            products,
            "vendor",
            "vendor/sub/my site.hdb",
            &["http://c.example/feed/sub/my%20site.hdb"],
        );
        check_origins(
            products,
            "parent",
            "clamav/daily.cvd",
            &["http://d.example:8080/clamav/daily.cvd"],
        );
        check_origins(
            products,
            "agent",
            "agent/pm-agent-1.0.0-x86_64-linux",
            &["/srv/agents/pm-agent-1.0.0-x86_64-linux"],
        );
        check_origins(products, "gone", "gone/x.cvd", &[]);
    }

    #[test]
    fn index_paths_must_stay_inside_the_product() {
        for (path, ok) in [
            ("a.dat", true),
            ("sub/dir/b.dat", true),
            ("../etc/passwd", false),
            ("/etc/passwd", false),
            ("a/../../b", false),
            ("a//b", false),
            ("./a", false),
            ("", false),
            ("a\\b", false),
            ("http:evil.example/x", false),
            ("x:y", false),
            ("a?b", false),
            ("a#b", false),
            ("a%2e", false),
        ] {
            assert_eq!(crate::manifest::safe_relative_path(path), ok, "{path}");
        }
    }

    #[test]
    fn a_sign_file_names_the_file_it_signs() {
        for (path, signed) in [
            (
                "clamav/daily-27430.cdiff.sign",
                Some("clamav/daily-27430.cdiff"),
            ),
            ("clamav/daily-27430.cvd.sign", Some("clamav/daily.cvd")),
            ("clamav/test-6.cvd.sign", Some("clamav/test.cvd")),
            ("clamav/daily.cvd.sign", None),
            ("clamav/daily-x.cvd.sign", None),
            ("clamav/-6.cvd.sign", None),
            ("clamav/daily.cvd", None),
            ("clamav/notes.sign", None),
        ] {
            assert_eq!(signed_file(path).as_deref(), signed, "{path}");
        }
    }

    #[test]
    fn agent_package_names_split_into_version_arch_and_os() {
        let check = |name: &str, expected: Option<(&str, &str, &str)>| {
            assert_eq!(parse_agent_package_name(name), expected, "{name}");
        };
        check(
            "pm-agent-0.1.0-x86_64-linux",
            Some(("0.1.0", "x86_64", "linux")),
        );
        check(
            "pm-agent-1.2.3-rc.1+b7-aarch64-linux",
            Some(("1.2.3-rc.1+b7", "aarch64", "linux")),
        );
        check("pm-agent-0.1.0-linux", None);
        check("pm-agent-latest-x86_64-linux", None);
        check("pm-agent-0.1.0-x86_64-", None);
        check("pm-agent-0..1-x86_64-linux", None);
        check("pm-agent-0.1.0 -x86_64-linux", None);
        check("clamav-0.1.0-x86_64-linux", None);
        check("pm-agent-x86_64-linux", None);
    }

    #[test]
    fn agent_versions_order_like_semver() {
        use std::cmp::Ordering::{Greater, Less};
        let check = |a: &str, b: &str, expected: std::cmp::Ordering| {
            assert_eq!(compare_versions(a, b), expected, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), expected.reverse(), "{b} vs {a}");
        };
        check("0.10.0", "0.9.0", Greater);
        check("1.0.0", "1.0.0-rc.1", Greater);
        check("1.0.0-rc.2", "1.0.0-rc.10", Less);
        check("1.0.0-alpha", "1.0.0-1", Greater);
        check("1.0.0-alpha", "1.0.0-alpha.1", Less);
        check("2", "1.9.9", Greater);
    }

    #[test]
    fn a_failed_try_files_its_error_under_the_database_it_failed_on() {
        let component = |name: &str, upstream: Option<&str>, error: Option<&str>| ComponentReport {
            name: name.into(),
            upstream_version: upstream.map(String::from),
            previous_version: Some("3".into()),
            version: Some("3".into()),
            error: error.map(String::from),
        };
        let check = |seen: &[ComponentReport], expected: &[(&str, Option<&str>, Option<&str>)]| {
            let unchanged = vec![
                component("main", None, None),
                component("daily", None, None),
            ];
            let got: Vec<(String, Option<String>, Option<String>)> =
                components_tried(seen, unchanged, "boom")
                    .into_iter()
                    .map(|c| (c.name, c.upstream_version, c.error))
                    .collect();
            let expected: Vec<(String, Option<String>, Option<String>)> = expected
                .iter()
                .map(|(n, u, e)| (n.to_string(), u.map(String::from), e.map(String::from)))
                .collect();
            assert_eq!(got, expected);
        };
        // Nothing reached (a files product, or a failure before the first database).
        check(&[], &[("main", None, None), ("daily", None, None)]);
        // Failed on `daily` after reading `main`: the error is daily's.
        check(
            &[
                component("main", Some("62"), None),
                component("daily", None, None),
            ],
            &[("main", Some("62"), None), ("daily", None, Some("boom"))],
        );
        // Stopped on `main`: `daily` was not reached.
        check(
            &[component("main", None, None)],
            &[("main", None, Some("boom")), ("daily", None, None)],
        );
        // A database with its own error (missing upstream) keeps it; the others keep none.
        check(
            &[
                component("main", None, Some("404")),
                component("daily", Some("5"), None),
            ],
            &[("main", None, Some("404")), ("daily", Some("5"), None)],
        );
    }
}
