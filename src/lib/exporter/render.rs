//! The exposition text of a snapshot, in the names and meanings of the metric contract
//! (`README.md`, section pm-exporter). The inventory's series are rendered once per snapshot in
//! both formats; the exporter's own series (age, errors, scrape time) are rendered per scrape
//! and written after them, so a scrape copies nothing large.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::inventory::{MetricsSnapshot, RolloutWaveMetrics};

/// Help of `pm_host_version_status` and `pm_host_scan_status`: the codes are part of the
/// contract.
const VERSION_STATUS_HELP: &str = "Versions against dist: 0 green (all components at dist), \
    1 yellow (some behind), 2 red (all behind or none comparable), 3 unknown (no dist or never \
    polled)";
const SCAN_STATUS_HELP: &str = "Last scan: 0 green (clean and recent), 1 yellow (none yet, too \
    old or failed), 2 red (findings)";

/// The label set of a series without labels.
const NO_LABELS: [(&str, &str); 0] = [];

/// The exposition formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// OpenMetrics when the `Accept` header names it, else the Prometheus text format.
    pub fn negotiate(accept: Option<&str>) -> Format {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }
}

/// What the inventory said, with the rollouts whose waves are shown.
#[derive(Debug, Default)]
pub struct SnapshotData {
    /// The snapshot.
    pub snapshot: MetricsSnapshot,
    /// Waves of the rollouts shown (running ones and the most recent).
    pub waves: Vec<RolloutWaveMetrics>,
    /// Rollouts whose state is `running` and whose process is alive.
    pub rollouts_in_progress: i64,
    /// When the signed dist statement in the repository expires (agents refuse dist after).
    pub dist_valid_until: Option<f64>,
}

/// Which families of a snapshot to render: the gauges read the same in both formats (checked
/// by a test), so they are rendered once; only the `*_info` families differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Every gauge family.
    Gauges,
    /// The `*_info` families.
    Infos,
}

/// Renders one part of the inventory series of `data` (no `# EOF`).
pub fn render_snapshot(data: Arc<SnapshotData>, part: Part, format: Format) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector { data, part }));
    encode(&registry, format, false)
}

/// The exporter's own values at scrape time.
#[derive(Debug, Clone)]
pub struct ExporterValues {
    /// When the snapshot served was read (None: no snapshot yet).
    pub snapshot_timestamp: Option<f64>,
    /// Now minus that.
    pub snapshot_age: Option<f64>,
    /// How long the last successful read held the file.
    pub snapshot_read_seconds: Option<f64>,
    /// Failed refreshes since start.
    pub read_errors: u64,
    /// How long rendering the previous scrape took.
    pub scrape_duration: Option<f64>,
    /// Bytes of the inventory file and its write-ahead log (None: no file).
    pub inventory_size_bytes: Option<u64>,
}

/// Renders the exporter's own series; with OpenMetrics, the closing `# EOF` too.
pub fn render_exporter(values: ExporterValues, format: Format) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ExporterCollector(values)));
    encode(&registry, format, true)
}

fn encode(registry: &Registry, format: Format, eof: bool) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail; a collector returns an error only from the writer.
    let result = match format {
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut text, registry)
        }
        Format::OpenMetrics => {
            prometheus_client::encoding::text::encode_registry(&mut text, registry).and_then(|()| {
                if eof {
                    prometheus_client::encoding::text::encode_eof(&mut text)
                } else {
                    Ok(())
                }
            })
        }
    };
    result.expect("encoding into a String does not fail");
    // The text lives until the next snapshot; growth by doubling can leave half of it unused.
    text.shrink_to_fit();
    text
}

/// Writes one gauge family, nothing at all when it has no samples (an empty family says
/// nothing and some parsers frown on it).
fn gauge<L, V>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result
where
    L: EncodeLabelSet,
    V: prometheus_client::encoding::EncodeGaugeValue,
{
    let mut samples = samples.into_iter().peekable();
    if samples.peek().is_none() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        metric.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// Writes one info family (`name` without `_info`, which the encoder adds).
fn info<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label_sets: impl IntoIterator<Item = L>,
) -> fmt::Result {
    let mut label_sets = label_sets.into_iter().peekable();
    if label_sets.peek().is_none() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Info)?;
    for labels in label_sets {
        metric.encode_info(&labels)?;
    }
    Ok(())
}

fn flag(value: bool) -> i64 {
    i64::from(value)
}

/// The `version_status` label values of `pm_hosts`, by status code.
const VERSION_STATUSES: [&str; 4] = ["green", "yellow", "red", "unknown"];

/// The `scan_status` label values of `pm_hosts_by_scan_status`, by status code.
const SCAN_STATUSES: [&str; 3] = ["green", "yellow", "red"];

/// The status codes of `pm_host_version_status`.
fn version_status(colour: &str) -> i64 {
    match colour {
        "green" => 0,
        "yellow" => 1,
        "red" => 2,
        _ => 3,
    }
}

/// The status codes of `pm_host_scan_status`.
fn scan_status(colour: &str) -> i64 {
    match colour {
        "green" => 0,
        "red" => 2,
        _ => 1,
    }
}

/// `component=version,...` as `mirror_products.upstream_versions` holds it, integers only.
fn integer_versions(text: &str) -> impl Iterator<Item = (&str, i64)> {
    text.split(',').filter_map(|pair| {
        let (component, version) = pair.split_once('=')?;
        Some((component.trim(), version.trim().parse().ok()?))
    })
}

#[derive(Debug)]
struct SnapshotCollector {
    data: Arc<SnapshotData>,
    part: Part,
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        match self.part {
            Part::Gauges => self.encode_gauges(&mut encoder),
            Part::Infos => self.encode_infos(&mut encoder),
        }
    }
}

impl SnapshotCollector {
    fn encode_infos(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let snapshot = &self.data.snapshot;
        info(
            e,
            "pm_host_agent",
            "The pm-agent version of the host",
            snapshot.hosts.iter().filter_map(|h| {
                Some([
                    ("host", h.host.clone()),
                    ("group", h.group.clone()),
                    ("version", h.agent_version.clone()?),
                ])
            }),
        )?;
        let dist = snapshot.dist.as_ref();
        info(
            e,
            "pm_dist",
            "The revision dist serves",
            dist.map(|d| [("revision", d.revision.clone())]),
        )?;
        info(
            e,
            "pm_latest",
            "The newest revision (latest)",
            snapshot
                .latest_revision
                .as_ref()
                .map(|r| [("revision", r.clone())]),
        )?;
        info(
            e,
            "pm_backup",
            "The revision of each backup generation",
            dist.into_iter().flat_map(|d| {
                d.backups
                    .iter()
                    .take(3)
                    .enumerate()
                    .filter(|(_, r)| !r.is_empty())
                    .map(|(i, r)| [("generation", (i + 1).to_string()), ("revision", r.clone())])
            }),
        )?;
        Ok(())
    }

    fn encode_gauges(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let data = &self.data;
        let snapshot = &data.snapshot;
        let hosts = &snapshot.hosts;
        let host_labels = |h: &crate::inventory::HostMetrics| {
            [("host", h.host.clone()), ("group", h.group.clone())]
        };
        let per_host = |pick: fn(&crate::inventory::HostMetrics) -> Option<f64>| {
            hosts
                .iter()
                .filter_map(move |h| Some((host_labels(h), pick(h)?)))
        };

        gauge(
            e,
            "pm_host_up",
            "1 if the last poll of the host succeeded, else 0; absent before its first poll",
            // Before its first poll nothing is known about a host: absent, not down.
            hosts
                .iter()
                .filter(|h| h.last_poll.is_some())
                .map(|h| (host_labels(h), flag(h.reachable))),
        )?;
        gauge(
            e,
            "pm_host_inactive",
            "1 if the host had no successful contact for inactive_after",
            hosts.iter().map(|h| (host_labels(h), flag(h.inactive))),
        )?;
        gauge(
            e,
            "pm_host_last_poll_timestamp_seconds",
            "Last poll attempt",
            per_host(|h| h.last_poll),
        )?;
        gauge(
            e,
            "pm_host_last_successful_poll_timestamp_seconds",
            "Last successful poll",
            per_host(|h| h.last_ok),
        )?;
        gauge(
            e,
            "pm_host_last_update_timestamp_seconds",
            "Last update run reported by the agent",
            per_host(|h| h.last_update),
        )?;
        gauge(
            e,
            "pm_host_last_update_success",
            "1 if the last update run succeeded, 0 if it failed",
            hosts
                .iter()
                .filter_map(|h| Some((host_labels(h), flag(h.last_update_ok?)))),
        )?;
        gauge(
            e,
            "pm_host_last_scan_timestamp_seconds",
            "Last scan",
            per_host(|h| h.last_scan),
        )?;
        gauge(
            e,
            "pm_host_scan_findings",
            "Findings of the last scan that ran to completion; a failed scan never lowers it",
            hosts
                .iter()
                .filter_map(|h| Some((host_labels(h), h.scan_findings?))),
        )?;
        gauge(
            e,
            "pm_host_version_status",
            VERSION_STATUS_HELP,
            hosts
                .iter()
                .map(|h| (host_labels(h), version_status(&h.version_colour))),
        )?;
        gauge(
            e,
            "pm_host_scan_status",
            SCAN_STATUS_HELP,
            hosts
                .iter()
                .map(|h| (host_labels(h), scan_status(&h.scan_colour))),
        )?;
        gauge(
            e,
            "pm_host_license_expiry_timestamp_seconds",
            "License expiry of the host",
            per_host(|h| h.license_expiry),
        )?;
        gauge(
            e,
            "pm_host_held",
            "1 if a hold is in force on the host: rollouts and its own schedule leave it alone",
            hosts.iter().map(|h| (host_labels(h), flag(h.held))),
        )?;
        gauge(
            e,
            "pm_host_hold_until_timestamp_seconds",
            "When the hold on the host ends by itself (no series: none, or until released)",
            per_host(|h| h.held_until),
        )?;
        gauge(
            e,
            "pm_host_certificate_expiry_timestamp_seconds",
            "When the agent certificate of the host expires (pm-poll renews it with a third of its life left)",
            snapshot.host_certificates.iter().map(|c| {
                (
                    [("host", c.host.clone()), ("group", c.group.clone())],
                    c.expires_at.timestamp() as f64,
                )
            }),
        )?;

        let components = &snapshot.host_components;
        let component_labels = |c: &crate::inventory::HostComponentMetrics| {
            [
                ("host", c.host.clone()),
                ("group", c.group.clone()),
                ("product", c.product.clone()),
                ("component", c.component.clone()),
            ]
        };
        gauge(
            e,
            "pm_host_component_version",
            "Installed version of the component (integer versions only)",
            components
                .iter()
                .filter_map(|c| Some((component_labels(c), c.version?))),
        )?;
        gauge(
            e,
            "pm_host_component_build_timestamp_seconds",
            "Upstream build time of the installed component",
            components
                .iter()
                .filter_map(|c| Some((component_labels(c), c.build_time?))),
        )?;
        gauge(
            e,
            "pm_host_component_behind_dist",
            "Dist version minus installed version, 0 when current or ahead",
            components
                .iter()
                .filter_map(|c| Some((component_labels(c), c.behind?))),
        )?;
        gauge(
            e,
            "pm_host_component_missing",
            "1 for a component of dist the agent would install and the host lacks (a product it \
             never installed); absent when the host has it",
            components
                .iter()
                .filter(|c| c.missing)
                .map(|c| (component_labels(c), 1)),
        )?;

        // Every status is present, also with no host in it, so a dashboard never shows a gap.
        let by_status =
            |e: &mut DescriptorEncoder,
             name: &str,
             help: &str,
             label: &'static str,
             statuses: &[&'static str],
             status_of: fn(&crate::inventory::HostMetrics) -> &'static str| {
                gauge(
                    e,
                    name,
                    help,
                    statuses.iter().map(|status| {
                        let n_hosts = hosts.iter().filter(|h| status_of(h) == *status).count();
                        ([(label, *status)], n_hosts as i64)
                    }),
                )
            };
        by_status(
            e,
            "pm_hosts",
            "Active hosts by version status",
            "version_status",
            &VERSION_STATUSES,
            |h| VERSION_STATUSES[version_status(&h.version_colour) as usize],
        )?;
        by_status(
            e,
            "pm_hosts_by_scan_status",
            "Active hosts by scan status",
            "scan_status",
            &SCAN_STATUSES,
            |h| SCAN_STATUSES[scan_status(&h.scan_colour) as usize],
        )?;
        gauge(
            e,
            "pm_hosts_inactive",
            "Active hosts that are inactive",
            [(
                NO_LABELS,
                hosts.iter().filter(|h| h.inactive).count() as i64,
            )],
        )?;

        let dist = snapshot.dist.as_ref();
        gauge(
            e,
            "pm_dist_serial",
            "Serial of the revision dist serves",
            dist.and_then(|d| Some((NO_LABELS, d.serial?))),
        )?;
        gauge(
            e,
            "pm_dist_published_timestamp_seconds",
            "When dist last changed (publish or rollback)",
            dist.and_then(|d| Some((NO_LABELS, d.changed_at?))),
        )?;
        gauge(
            e,
            "pm_dist_valid_until_timestamp_seconds",
            "When the signed dist statement expires: agents refuse dist after it unless publish re-signs it",
            data.dist_valid_until.map(|at| (NO_LABELS, at)),
        )?;
        let dist_components = &snapshot.dist_components;
        let product_component = |product: &str, component: &str| {
            [
                ("product", product.to_string()),
                ("component", component.to_string()),
            ]
        };
        gauge(
            e,
            "pm_dist_component_version",
            "Version of each dist component (integer versions only)",
            dist_components
                .iter()
                .filter_map(|c| Some((product_component(&c.product, &c.component), c.version?))),
        )?;
        gauge(
            e,
            "pm_dist_component_build_timestamp_seconds",
            "Upstream build time of each dist component",
            dist_components
                .iter()
                .filter_map(|c| Some((product_component(&c.product, &c.component), c.build_time?))),
        )?;

        let products = &snapshot.products;
        gauge(
            e,
            "pm_upstream_component_version",
            "Upstream version seen by the last sync (integer versions only)",
            products.iter().flat_map(|p| {
                integer_versions(p.upstream_versions.as_deref().unwrap_or(""))
                    .map(|(component, version)| (product_component(&p.product, component), version))
            }),
        )?;
        let product_labels =
            |p: &crate::inventory::ProductMetrics| [("product", p.product.clone())];
        gauge(
            e,
            "pm_mirror_last_sync_timestamp_seconds",
            "Last sync attempt of the product",
            products
                .iter()
                .filter_map(|p| Some((product_labels(p), p.last_sync?))),
        )?;
        gauge(
            e,
            "pm_mirror_last_successful_sync_timestamp_seconds",
            "Last successful sync of the product",
            products
                .iter()
                .filter_map(|p| Some((product_labels(p), p.last_success?))),
        )?;
        gauge(
            e,
            "pm_mirror_cooldown_until_timestamp_seconds",
            "End of the upstream cool-down (HTTP 429/403) of the product",
            products
                .iter()
                .filter_map(|p| Some((product_labels(p), p.cooldown_until?))),
        )?;
        gauge(
            e,
            "pm_bundle_last_import_timestamp_seconds",
            "Last air-gap bundle import",
            snapshot.last_bundle_import.map(|at| (NO_LABELS, at)),
        )?;

        gauge(
            e,
            "pm_rollouts_in_progress",
            "Rollout jobs running (state running, process alive)",
            [(NO_LABELS, data.rollouts_in_progress)],
        )?;
        gauge(
            e,
            "pm_rollout_hosts",
            "Hosts per wave and result of running rollouts and the most recent one",
            data.waves.iter().flat_map(|w| {
                w.results.iter().map(|(result, hosts)| {
                    (
                        [
                            ("job_id", w.job_id.to_string()),
                            ("kind", w.kind.clone()),
                            ("wave", w.wave.map_or("none".to_string(), |n| n.to_string())),
                            ("result", (*result).to_string()),
                        ],
                        *hosts,
                    )
                })
            }),
        )?;
        Ok(())
    }
}

#[derive(Debug)]
struct ExporterCollector(ExporterValues);

impl Collector for ExporterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let values = &self.0;
        let e = &mut encoder;
        info(
            e,
            "pm_exporter_build",
            "The pm-exporter version",
            [[("version", env!("CARGO_PKG_VERSION"))]],
        )?;
        gauge(
            e,
            "pm_inventory_snapshot_timestamp_seconds",
            "When the snapshot served was read",
            values.snapshot_timestamp.map(|v| (NO_LABELS, v)),
        )?;
        gauge(
            e,
            "pm_inventory_snapshot_age_seconds",
            "Now minus when the snapshot served was read",
            values.snapshot_age.map(|v| (NO_LABELS, v)),
        )?;
        let mut errors = e.encode_descriptor(
            "pm_inventory_read_errors",
            "Failed snapshot refreshes (busy, missing, damaged inventory)",
            None,
            MetricType::Counter,
        )?;
        errors.encode_counter::<prometheus_client::encoding::NoLabelSet, _, f64>(
            &values.read_errors,
            None,
        )?;
        gauge(
            e,
            "pm_inventory_size_bytes",
            "Bytes of the inventory file and its write-ahead log on disk",
            values
                .inventory_size_bytes
                .map(|v| (NO_LABELS, i64::try_from(v).unwrap_or(i64::MAX))),
        )?;
        gauge(
            e,
            "pm_inventory_snapshot_read_seconds",
            "How long the last successful snapshot read held the inventory open",
            values.snapshot_read_seconds.map(|v| (NO_LABELS, v)),
        )?;
        gauge(
            e,
            "pm_exporter_scrape_duration_seconds",
            "How long rendering the previous scrape took",
            values.scrape_duration.map(|v| (NO_LABELS, v)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{
        DistComponentMetrics, DistMetrics, HostComponentMetrics, HostMetrics, ProductMetrics,
    };

    /// One polled host with findings, one never polled, dist with backups, a product in
    /// cool-down and a rollout's canary wave.
    fn fixture() -> Arc<SnapshotData> {
        let host = |name: &str, group: &str| HostMetrics {
            host: name.into(),
            group: group.into(),
            reachable: false,
            inactive: true,
            last_poll: None,
            last_ok: None,
            last_update: None,
            last_update_ok: None,
            last_scan: None,
            scan_findings: None,
            version_colour: "unknown".into(),
            scan_colour: "yellow".into(),
            license_expiry: None,
            agent_version: None,
            held: false,
            held_until: None,
        };
        let scanned = HostMetrics {
            reachable: true,
            inactive: false,
            last_poll: Some(1_700_000_100.0),
            last_ok: Some(1_700_000_100.0),
            last_update: Some(1_700_000_050.5),
            last_update_ok: Some(true),
            last_scan: Some(1_700_000_000.0),
            scan_findings: Some(2),
            version_colour: "yellow".into(),
            scan_colour: "red".into(),
            license_expiry: Some(1_800_000_000.0),
            agent_version: Some("0.1.0".into()),
            held: true,
            held_until: Some(1_700_086_400.0),
            ..host("web-1", "web")
        };
        let component =
            |name: &str, version: Option<i64>, behind: Option<i64>| HostComponentMetrics {
                host: "web-1".into(),
                group: "web".into(),
                product: if name == "daily" { "clamav" } else { "vendor" }.into(),
                component: name.into(),
                version,
                build_time: Some(1_699_000_000.0),
                behind,
                missing: false,
            };
        Arc::new(SnapshotData {
            snapshot: MetricsSnapshot {
                hosts: vec![scanned, host("new \"one\"", "default")],
                host_components: vec![
                    component("daily", Some(27000), Some(2)),
                    component("feed", None, None),
                    HostComponentMetrics {
                        build_time: None,
                        missing: true,
                        ..component("site.hdb", None, None)
                    },
                ],
                dist: Some(DistMetrics {
                    revision: "r7".into(),
                    serial: Some(7),
                    changed_at: Some(1_699_999_000.0),
                    backups: vec!["r6".into(), "r5".into(), String::new()],
                }),
                latest_revision: Some("r8".into()),
                dist_components: vec![DistComponentMetrics {
                    product: "clamav".into(),
                    component: "daily".into(),
                    version: Some(27002),
                    build_time: Some(1_699_500_000.0),
                }],
                products: vec![ProductMetrics {
                    product: "clamav".into(),
                    last_sync: Some(1_700_000_200.0),
                    last_success: Some(1_699_000_000.0),
                    cooldown_until: Some(1_700_003_600.0),
                    upstream_versions: Some("daily=27003,feed=x".into()),
                }],
                last_bundle_import: None,
                rollouts: Vec::new(),
                host_certificates: vec![crate::inventory::HostCertificateExpiry {
                    host: "web-1".into(),
                    group: "web".into(),
                    address: "10.0.0.1:7505".into(),
                    expires_at: chrono::DateTime::from_timestamp(1_731_536_000, 0).unwrap(),
                }],
            },
            waves: vec![
                RolloutWaveMetrics {
                    job_id: 12,
                    kind: "update".into(),
                    wave: Some(0),
                    results: [
                        ("ok", 1),
                        ("failed", 0),
                        ("skipped", 0),
                        ("not_attempted", 0),
                        ("pending", 0),
                        ("held", 0),
                    ],
                },
                RolloutWaveMetrics {
                    job_id: 12,
                    kind: "update".into(),
                    wave: None,
                    results: [
                        ("ok", 0),
                        ("failed", 0),
                        ("skipped", 2),
                        ("not_attempted", 0),
                        ("pending", 0),
                        ("held", 1),
                    ],
                },
            ],
            rollouts_in_progress: 1,
            dist_valid_until: Some(1_700_604_800.0),
        })
    }

    fn check(part: Part, format: Format, expected: &str) {
        let actual = render_snapshot(fixture(), part, format);
        assert_eq!(actual, expected, "actual:\n{actual}");
    }

    #[test]
    fn a_fixture_renders_to_the_exact_gauge_text_in_both_formats() {
        // The gauges are rendered once and served in both formats: they must not differ.
        let expected = r#"# HELP pm_host_up 1 if the last poll of the host succeeded, else 0; absent before its first poll
# TYPE pm_host_up gauge
pm_host_up{host="web-1",group="web"} 1
# HELP pm_host_inactive 1 if the host had no successful contact for inactive_after
# TYPE pm_host_inactive gauge
pm_host_inactive{host="web-1",group="web"} 0
pm_host_inactive{host="new \"one\"",group="default"} 1
# HELP pm_host_last_poll_timestamp_seconds Last poll attempt
# TYPE pm_host_last_poll_timestamp_seconds gauge
pm_host_last_poll_timestamp_seconds{host="web-1",group="web"} 1700000100.0
# HELP pm_host_last_successful_poll_timestamp_seconds Last successful poll
# TYPE pm_host_last_successful_poll_timestamp_seconds gauge
pm_host_last_successful_poll_timestamp_seconds{host="web-1",group="web"} 1700000100.0
# HELP pm_host_last_update_timestamp_seconds Last update run reported by the agent
# TYPE pm_host_last_update_timestamp_seconds gauge
pm_host_last_update_timestamp_seconds{host="web-1",group="web"} 1700000050.5
# HELP pm_host_last_update_success 1 if the last update run succeeded, 0 if it failed
# TYPE pm_host_last_update_success gauge
pm_host_last_update_success{host="web-1",group="web"} 1
# HELP pm_host_last_scan_timestamp_seconds Last scan
# TYPE pm_host_last_scan_timestamp_seconds gauge
pm_host_last_scan_timestamp_seconds{host="web-1",group="web"} 1700000000.0
# HELP pm_host_scan_findings Findings of the last scan that ran to completion; a failed scan never lowers it
# TYPE pm_host_scan_findings gauge
pm_host_scan_findings{host="web-1",group="web"} 2
# HELP pm_host_version_status Versions against dist: 0 green (all components at dist), 1 yellow (some behind), 2 red (all behind or none comparable), 3 unknown (no dist or never polled)
# TYPE pm_host_version_status gauge
pm_host_version_status{host="web-1",group="web"} 1
pm_host_version_status{host="new \"one\"",group="default"} 3
# HELP pm_host_scan_status Last scan: 0 green (clean and recent), 1 yellow (none yet, too old or failed), 2 red (findings)
# TYPE pm_host_scan_status gauge
pm_host_scan_status{host="web-1",group="web"} 2
pm_host_scan_status{host="new \"one\"",group="default"} 1
# HELP pm_host_license_expiry_timestamp_seconds License expiry of the host
# TYPE pm_host_license_expiry_timestamp_seconds gauge
pm_host_license_expiry_timestamp_seconds{host="web-1",group="web"} 1800000000.0
# HELP pm_host_held 1 if a hold is in force on the host: rollouts and its own schedule leave it alone
# TYPE pm_host_held gauge
pm_host_held{host="web-1",group="web"} 1
pm_host_held{host="new \"one\"",group="default"} 0
# HELP pm_host_hold_until_timestamp_seconds When the hold on the host ends by itself (no series: none, or until released)
# TYPE pm_host_hold_until_timestamp_seconds gauge
pm_host_hold_until_timestamp_seconds{host="web-1",group="web"} 1700086400.0
# HELP pm_host_certificate_expiry_timestamp_seconds When the agent certificate of the host expires (pm-poll renews it with a third of its life left)
# TYPE pm_host_certificate_expiry_timestamp_seconds gauge
pm_host_certificate_expiry_timestamp_seconds{host="web-1",group="web"} 1731536000.0
# HELP pm_host_component_version Installed version of the component (integer versions only)
# TYPE pm_host_component_version gauge
pm_host_component_version{host="web-1",group="web",product="clamav",component="daily"} 27000
# HELP pm_host_component_build_timestamp_seconds Upstream build time of the installed component
# TYPE pm_host_component_build_timestamp_seconds gauge
pm_host_component_build_timestamp_seconds{host="web-1",group="web",product="clamav",component="daily"} 1699000000.0
pm_host_component_build_timestamp_seconds{host="web-1",group="web",product="vendor",component="feed"} 1699000000.0
# HELP pm_host_component_behind_dist Dist version minus installed version, 0 when current or ahead
# TYPE pm_host_component_behind_dist gauge
pm_host_component_behind_dist{host="web-1",group="web",product="clamav",component="daily"} 2
# HELP pm_host_component_missing 1 for a component of dist the agent would install and the host lacks (a product it never installed); absent when the host has it
# TYPE pm_host_component_missing gauge
pm_host_component_missing{host="web-1",group="web",product="vendor",component="site.hdb"} 1
# HELP pm_hosts Active hosts by version status
# TYPE pm_hosts gauge
pm_hosts{version_status="green"} 0
pm_hosts{version_status="yellow"} 1
pm_hosts{version_status="red"} 0
pm_hosts{version_status="unknown"} 1
# HELP pm_hosts_by_scan_status Active hosts by scan status
# TYPE pm_hosts_by_scan_status gauge
pm_hosts_by_scan_status{scan_status="green"} 0
pm_hosts_by_scan_status{scan_status="yellow"} 1
pm_hosts_by_scan_status{scan_status="red"} 1
# HELP pm_hosts_inactive Active hosts that are inactive
# TYPE pm_hosts_inactive gauge
pm_hosts_inactive 1
# HELP pm_dist_serial Serial of the revision dist serves
# TYPE pm_dist_serial gauge
pm_dist_serial 7
# HELP pm_dist_published_timestamp_seconds When dist last changed (publish or rollback)
# TYPE pm_dist_published_timestamp_seconds gauge
pm_dist_published_timestamp_seconds 1699999000.0
# HELP pm_dist_valid_until_timestamp_seconds When the signed dist statement expires: agents refuse dist after it unless publish re-signs it
# TYPE pm_dist_valid_until_timestamp_seconds gauge
pm_dist_valid_until_timestamp_seconds 1700604800.0
# HELP pm_dist_component_version Version of each dist component (integer versions only)
# TYPE pm_dist_component_version gauge
pm_dist_component_version{product="clamav",component="daily"} 27002
# HELP pm_dist_component_build_timestamp_seconds Upstream build time of each dist component
# TYPE pm_dist_component_build_timestamp_seconds gauge
pm_dist_component_build_timestamp_seconds{product="clamav",component="daily"} 1699500000.0
# HELP pm_upstream_component_version Upstream version seen by the last sync (integer versions only)
# TYPE pm_upstream_component_version gauge
pm_upstream_component_version{product="clamav",component="daily"} 27003
# HELP pm_mirror_last_sync_timestamp_seconds Last sync attempt of the product
# TYPE pm_mirror_last_sync_timestamp_seconds gauge
pm_mirror_last_sync_timestamp_seconds{product="clamav"} 1700000200.0
# HELP pm_mirror_last_successful_sync_timestamp_seconds Last successful sync of the product
# TYPE pm_mirror_last_successful_sync_timestamp_seconds gauge
pm_mirror_last_successful_sync_timestamp_seconds{product="clamav"} 1699000000.0
# HELP pm_mirror_cooldown_until_timestamp_seconds End of the upstream cool-down (HTTP 429/403) of the product
# TYPE pm_mirror_cooldown_until_timestamp_seconds gauge
pm_mirror_cooldown_until_timestamp_seconds{product="clamav"} 1700003600.0
# HELP pm_rollouts_in_progress Rollout jobs running (state running, process alive)
# TYPE pm_rollouts_in_progress gauge
pm_rollouts_in_progress 1
# HELP pm_rollout_hosts Hosts per wave and result of running rollouts and the most recent one
# TYPE pm_rollout_hosts gauge
pm_rollout_hosts{job_id="12",kind="update",wave="0",result="ok"} 1
pm_rollout_hosts{job_id="12",kind="update",wave="0",result="failed"} 0
pm_rollout_hosts{job_id="12",kind="update",wave="0",result="skipped"} 0
pm_rollout_hosts{job_id="12",kind="update",wave="0",result="not_attempted"} 0
pm_rollout_hosts{job_id="12",kind="update",wave="0",result="pending"} 0
pm_rollout_hosts{job_id="12",kind="update",wave="0",result="held"} 0
pm_rollout_hosts{job_id="12",kind="update",wave="none",result="ok"} 0
pm_rollout_hosts{job_id="12",kind="update",wave="none",result="failed"} 0
pm_rollout_hosts{job_id="12",kind="update",wave="none",result="skipped"} 2
pm_rollout_hosts{job_id="12",kind="update",wave="none",result="not_attempted"} 0
pm_rollout_hosts{job_id="12",kind="update",wave="none",result="pending"} 0
pm_rollout_hosts{job_id="12",kind="update",wave="none",result="held"} 1
"#;
        check(Part::Gauges, Format::Prometheus, expected);
        check(Part::Gauges, Format::OpenMetrics, expected);
    }

    #[test]
    fn info_families_differ_between_the_formats_only_in_their_descriptors() {
        let samples = r#"pm_host_agent_info{host="web-1",group="web",version="0.1.0"} 1
pm_dist_info{revision="r7"} 1
pm_latest_info{revision="r8"} 1
pm_backup_info{generation="1",revision="r6"} 1
pm_backup_info{generation="2",revision="r5"} 1
"#;
        let prometheus = render_snapshot(fixture(), Part::Infos, Format::Prometheus);
        let openmetrics = render_snapshot(fixture(), Part::Infos, Format::OpenMetrics);
        let lines = |text: &str, comments: bool| {
            text.lines()
                .filter(|l| l.starts_with('#') == comments)
                .map(|l| format!("{l}\n"))
                .collect::<String>()
        };
        assert_eq!(lines(&prometheus, false), samples);
        assert_eq!(lines(&openmetrics, false), samples);
        assert!(
            prometheus.contains("# TYPE pm_backup_info gauge\n"),
            "{prometheus}"
        );
        assert!(
            openmetrics.contains("# TYPE pm_backup info\n"),
            "{openmetrics}"
        );
    }

    #[test]
    fn the_exporter_series_end_openmetrics_with_eof_and_count_errors_as_a_counter() {
        let values = ExporterValues {
            snapshot_timestamp: Some(1_700_000_300.0),
            snapshot_age: Some(4.5),
            snapshot_read_seconds: Some(0.25),
            read_errors: 3,
            scrape_duration: None,
            inventory_size_bytes: Some(1_048_576),
        };
        let openmetrics = render_exporter(values.clone(), Format::OpenMetrics);
        assert!(
            openmetrics.ends_with("pm_inventory_snapshot_read_seconds 0.25\n# EOF\n"),
            "{openmetrics}"
        );
        assert!(openmetrics.contains(
            "# TYPE pm_inventory_read_errors counter\npm_inventory_read_errors_total 3\n"
        ));
        let prometheus = render_exporter(values, Format::Prometheus);
        assert!(!prometheus.contains("# EOF"), "{prometheus}");
        assert!(
            prometheus.contains(
                "# TYPE pm_inventory_size_bytes gauge\npm_inventory_size_bytes 1048576\n"
            ),
            "{prometheus}"
        );
        assert!(
            prometheus.contains("pm_inventory_snapshot_age_seconds 4.5\n"),
            "{prometheus}"
        );
        assert!(
            !prometheus.contains("pm_exporter_scrape_duration_seconds"),
            "no scrape yet"
        );
    }

    #[test]
    fn upstream_versions_keep_integers_only() {
        let parsed: Vec<_> = integer_versions("daily=27430,main=62,feed=2024-01-01,bad").collect();
        assert_eq!(parsed, [("daily", 27430), ("main", 62)]);
    }

    #[test]
    fn openmetrics_is_chosen_only_when_asked_for() {
        let check = |accept: Option<&str>, expected: Format| {
            assert_eq!(Format::negotiate(accept), expected, "{accept:?}");
        };
        check(None, Format::Prometheus);
        check(Some("text/plain;version=0.0.4"), Format::Prometheus);
        check(
            Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
            Format::OpenMetrics,
        );
    }
}
