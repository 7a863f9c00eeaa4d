//! `pm-mirror sync`: fetch every product's new components, verify them, and stage a new revision
//! of latest only when every product verified. Unchanged upstreams cost a conditional request.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use reqwest::Url;
use serde::{Deserialize, Serialize};

use crate::clamav;
use crate::config::{ClamavSource, Config, FilesSource, Product, ProductSource};
use crate::inventory::ProductState;
use crate::manifest::{ComponentEntry, FileEntry, Manifest, ProductEntry};
use crate::mirror::upstream::{FetchError, Fetched, Upstream, Validators};
use crate::repo::{Repo, StagedRevision};

/// Largest `files` index accepted.
const INDEX_SIZE_LIMIT: u64 = 64 << 20;

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
}

/// One component's versions as a sync saw them.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentReport {
    /// Component name (`daily`, a file path).
    pub name: String,
    /// Version upstream offers, when it answered.
    pub upstream_version: Option<String>,
    /// Version in latest before the sync.
    pub previous_version: Option<String>,
    /// Version in latest after the sync.
    pub version: Option<String>,
}

/// One product's part of the sync report.
#[derive(Debug, Clone, Serialize)]
pub struct ProductReport {
    /// Product name.
    pub name: String,
    /// `clamav` or `files`.
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
    #[serde(skip)]
    pub(crate) entry: Option<ProductEntry>,
    #[serde(skip)]
    pub(crate) state: ProductState,
}

impl ProductReport {
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
    entry: ProductEntry,
    validators: BTreeMap<String, Validators>,
    files_downloaded: usize,
    warnings: Vec<String>,
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
    #[error("`{url}`: {problem}")]
    Verify { url: String, problem: String },
    #[error("`{url}` is not a valid files index: {problem}")]
    BadIndex { url: String, problem: String },
    #[error(transparent)]
    Repo(#[from] crate::repo::RepoError),
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
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
        let previous_entry = previous.and_then(|m| m.product(&product.name)).cloned();
        let previous_dir = previous.map(|m| repo.revision_dir(&m.revision));
        let carry_over_previous = |staged: &mut Option<&mut StagedRevision>| {
            if let (Some(staged), Some(manifest), Some(dir)) =
                (staged.as_deref_mut(), previous, &previous_dir)
            {
                for file in manifest.product_files(&product.name) {
                    staged.carry_over(dir, file.clone())?;
                }
            }
            Ok::<(), crate::repo::RepoError>(())
        };
        let unchanged_components = |entry: &Option<ProductEntry>| {
            entry
                .iter()
                .flat_map(|e| e.components.iter())
                .map(|c| ComponentReport {
                    name: c.name.clone(),
                    upstream_version: None,
                    previous_version: Some(c.version.clone()),
                    version: Some(c.version.clone()),
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
            entry: previous_entry.clone(),
            state: state.clone(),
        };

        let skipped = !only.is_empty() && !only.contains(&product.name);
        let cooling = state.cooldown_until.filter(|until| *until > now);
        if skipped || cooling.is_some() {
            if let Err(err) = carry_over_previous(&mut staged) {
                report.result = ProductResult::Failed;
                report.error = Some(format!("{err:#}"));
            } else if let Some(until) = cooling {
                report.result = ProductResult::Cooldown;
                report.cooldown_until = Some(until);
                let reason = state.cooldown_reason.clone().unwrap_or_default();
                report.warnings.push(format!(
                    "in cool-down until {until} ({reason}); not contacted"
                ));
                tracing::warn!(product = %product.name, until = %until, "product in cool-down, upstream not contacted");
            }
            report.components = unchanged_components(&previous_entry);
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
            upstream,
            previous,
            previous_dir: previous_dir.clone(),
            validators,
            dry_run,
        };
        let bytes_before = upstream.bytes_received();
        let outcome = match &product.source {
            ProductSource::Clamav(source) => {
                let mut last = None;
                let mut outcome = None;
                for base in std::iter::once(&source.url).chain(source.fallback_urls.iter()) {
                    if let Some(staged) = staged.as_deref_mut() {
                        staged.remove_product(&product.name);
                    }
                    match sync_clamav(product, source, base, &context, staged.as_deref_mut()).await
                    {
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
        };
        report.bytes_downloaded = upstream.bytes_received() - bytes_before;
        let finished_at = Utc::now();
        match outcome {
            Ok(outcome) => {
                report.result = outcome.result;
                report.components = outcome.components;
                report.files_downloaded = outcome.files_downloaded;
                report.warnings = outcome.warnings;
                report.entry = Some(outcome.entry);
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
                let until = (finished_at
                    + chrono::Duration::from_std(retry_after)
                        .unwrap_or(chrono::Duration::hours(4)))
                .trunc_subsecs(0);
                tracing::warn!(product = %product.name, status, until = %until, "upstream asks to back off");
                report.result = ProductResult::Cooldown;
                report.cooldown_until = Some(until);
                report.error = Some(format!(
                    "`{url}` answered HTTP {status}; cool-down until {until}"
                ));
                state.cooldown_until = Some(until);
                state.cooldown_reason = Some(format!("HTTP {status} from {url}"));
                state.upstream_checked_at = Some(finished_at);
                if let Some(staged) = staged.as_deref_mut() {
                    staged.remove_product(&product.name);
                }
                if let Err(err) = carry_over_previous(&mut staged) {
                    report.result = ProductResult::Failed;
                    report.error = Some(format!("{err:#}"));
                }
                report.components = unchanged_components(&previous_entry);
            }
            Err(err) => {
                tracing::error!(product = %product.name, error = %err, "product sync failed");
                report.result = ProductResult::Failed;
                report.error = Some(err.to_string());
                report.components = unchanged_components(&previous_entry);
                state.last_failure_at = Some(finished_at);
                state.last_error = Some(err.to_string());
            }
        }
        report.finished_at = finished_at;
        report.state = state;
        reports.push(report);
    }
    reports
}

fn kind_name(source: &ProductSource) -> &'static str {
    match source {
        ProductSource::Clamav(_) => "clamav",
        ProductSource::Files(_) => "files",
    }
}

fn join(base: &str, file: &str) -> Result<Url, ProductError> {
    let text = format!("{}/{}", base.trim_end_matches('/'), file);
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
/// is newer download the CVD and the cdiffs of the last `cdiff_keep` versions.
async fn sync_clamav(
    product: &Product,
    source: &ClamavSource,
    base: &str,
    context: &ProductContext<'_>,
    mut staged: Option<&mut StagedRevision>,
) -> Result<ProductOutcome, ProductError> {
    let mut outcome = ProductOutcome {
        result: ProductResult::Unchanged,
        components: Vec::new(),
        entry: ProductEntry {
            name: product.name.clone(),
            kind: "clamav".into(),
            version: None,
            components: Vec::new(),
        },
        validators: context.validators.clone(),
        files_downloaded: 0,
        warnings: Vec::new(),
    };
    for db in &source.databases {
        let cvd_name = format!("{db}.cvd");
        let cvd_path = format!("{}/{cvd_name}", product.name);
        let cvd_url = join(base, &cvd_name)?;
        let previous_cvd = context.previous.and_then(|m| m.file(&cvd_path));
        let previous_version: Option<u32> =
            previous_cvd.and_then(|f| f.version.as_deref()?.parse().ok());
        let previous_db_files: Vec<FileEntry> = context
            .previous
            .map(|m| {
                m.product_files(&product.name)
                    .filter(|f| f.component == *db)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        // Only a file we still have makes a conditional request meaningful.
        let validators = previous_cvd.and_then(|_| context.validators.get(cvd_url.as_str()));
        let probe = context
            .upstream
            .fetch_head(&cvd_url, clamav::CVD_HEADER_LEN as u64, validators)
            .await?;
        let upstream_header = match probe {
            Fetched::NotModified => None,
            Fetched::NotFound => {
                return Err(ProductError::NotFound {
                    url: cvd_url.to_string(),
                });
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
        };
        if !newer {
            if let (Some(staged), Some(dir)) = (staged.as_deref_mut(), &context.previous_dir) {
                for file in &previous_db_files {
                    staged.carry_over(dir, file.clone())?;
                }
            }
            if let Some(previous) = previous_cvd {
                outcome.entry.components.push(ComponentEntry {
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
        let downloaded = download_required(context, &cvd_url, &target).await?;
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
        outcome.entry.components.push(ComponentEntry {
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
            let downloaded = match context.upstream.download(&url, &target).await? {
                Fetched::Body { body, .. } => body,
                _ => {
                    let _ = std::fs::remove_file(&target);
                    break;
                }
            };
            clamav::verify_cdiff(&read(&target)?).map_err(|source| ProductError::Clamav {
                url: url.to_string(),
                source,
            })?;
            outcome.files_downloaded += 1;
            staged.add(FileEntry {
                path,
                size: downloaded.size,
                sha256: downloaded.sha256,
                product: product.name.clone(),
                component: db.clone(),
                version: Some(cdiff_version.to_string()),
                build_time: None,
            });
            let sign_name = format!("{name}.sign");
            let sign = sign_entry(product, db, &sign_name, cdiff_version);
            outcome.files_downloaded +=
                fetch_sign_file(context, staged, join(base, &sign_name)?, sign, &target).await?;
        }
    }
    Ok(outcome)
}

/// Downloads a file upstream must have: a 404 is an error.
async fn download_required(
    context: &ProductContext<'_>,
    url: &Url,
    target: &Path,
) -> Result<crate::mirror::upstream::Downloaded, ProductError> {
    match context.upstream.download(url, target).await? {
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
    let body = match context.upstream.download(&url, &target).await? {
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

/// Whether a relative path from an index is safe to use under the product directory.
pub(crate) fn safe_relative_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\\')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
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
        .map(|m| m.product_files(&product.name).cloned().collect())
        .unwrap_or_default();
    let previous_entry = context
        .previous
        .and_then(|m| m.product(&product.name))
        .cloned();
    let validators = (!previous_files.is_empty())
        .then(|| context.validators.get(index_url.as_str()))
        .flatten();
    let mut outcome = ProductOutcome {
        result: ProductResult::Unchanged,
        components: Vec::new(),
        entry: ProductEntry {
            name: product.name.clone(),
            kind: "files".into(),
            version: None,
            components: Vec::new(),
        },
        validators: context.validators.clone(),
        files_downloaded: 0,
        warnings: Vec::new(),
    };
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
            let entry = previous_entry.unwrap_or(outcome.entry);
            outcome.components = entry
                .components
                .iter()
                .map(|c| ComponentReport {
                    name: c.name.clone(),
                    upstream_version: Some(c.version.clone()),
                    previous_version: Some(c.version.clone()),
                    version: Some(c.version.clone()),
                })
                .collect();
            outcome.entry = entry;
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
        if !safe_relative_path(&file.path) {
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
    outcome.entry.version = Some(index.version.clone());
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
        });
        outcome.entry.components.push(ComponentEntry {
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
            .join(&file.path)
            .map_err(|err| bad_index(err.to_string()))?;
        let target = staged.path_for(&path)?;
        let downloaded = download_required(context, &url, &target).await?;
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
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        ] {
            assert_eq!(safe_relative_path(path), ok, "{path}");
        }
    }
}
