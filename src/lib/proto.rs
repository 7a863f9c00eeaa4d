//! Wire types shared by the manager and `pm-agent`, and the activation proofs. Only these types
//! go on the wire between them.
//!
//! Activation (DESIGN.md section 4), after the manager has read the agent's self-signed
//! certificate fingerprint `F` over TLS and pinned it for every following request:
//!
//! 1. manager -> agent `POST /v1/activation/challenge` [`ChallengeRequest`] with a fresh nonce
//!    `Nm`. The agent answers [`ChallengeResponse`]: its nonce `Na`, a CSR for its key, and
//!    `agent_proof = HMAC-SHA256(K, "pm agent proof v1" | F | Nm | Na)`. The manager checks the
//!    proof with the key `K` it holds: the agent knows `K` and holds the key of `F` (a relay
//!    would present another certificate, so the proof would not match).
//! 2. manager -> agent `POST /v1/activation/complete` [`ActivateRequest`] with
//!    `manager_proof = HMAC-SHA256(K, "pm manager proof v1" | F | Na | Nm)`, the manager CA,
//!    the agent certificate the CA issued for the CSR, the manifest signing key and the dist
//!    URL. The agent checks the proof, that the certificate is for its key and chains to the
//!    CA, stores everything, forgets `K` and from then on requires client certificates issued
//!    by that CA.
//!
//! `K` itself never crosses the wire.

use serde::{Deserialize, Serialize};

/// Path of the first activation step.
pub const CHALLENGE_PATH: &str = "/v1/activation/challenge";
/// Path of the second activation step.
pub const ACTIVATE_PATH: &str = "/v1/activation/complete";
/// Path of the agent status (mutual TLS after activation).
pub const STATUS_PATH: &str = "/v1/status";
/// Path that makes an activated agent forget its manager (mutual TLS).
pub const DEACTIVATE_PATH: &str = "/v1/deactivate";

/// Path of the first step of a certificate renewal (mutual TLS, an activated agent): the agent
/// makes a new key, keeps it aside and answers [`CertificateRequestAnswer`].
pub const CERTIFICATE_REQUEST_PATH: &str = "/v1/certificate/request";
/// Path of the second step: [`CertificateInstall`] in, [`CertificateInstalled`] out; the agent
/// serves every new connection with the new key and certificate from then on.
pub const CERTIFICATE_INSTALL_PATH: &str = "/v1/certificate/install";

/// The agent's answer to [`CERTIFICATE_REQUEST_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRequestAnswer {
    /// PEM certificate signing request for the agent's new key.
    pub csr_pem: String,
}

/// [`CERTIFICATE_INSTALL_PATH`] request: the certificate the manager CA issued for the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateInstall {
    /// The new certificate (PEM), for the key of the last request.
    pub certificate_pem: String,
    /// The name the manager knows the host by (its certificate's common name; changes with a
    /// rename).
    pub host_name: String,
}

/// The agent's answer to [`CERTIFICATE_INSTALL_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateInstalled {
    /// Serial of the certificate the agent now presents (hex).
    pub certificate_serial: String,
    /// Its fingerprint.
    pub certificate_fingerprint: String,
}

/// Step 1 request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeRequest {
    /// Manager nonce `Nm`, 32 random bytes in hex.
    pub manager_nonce: String,
    /// Fingerprint of the manager CA, so an agent activated by another manager can say so.
    pub manager_ca_fingerprint: String,
}

/// Step 1 answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeResponse {
    /// Agent nonce `Na`, 32 random bytes in hex; valid for one `complete` within a minute.
    pub agent_nonce: String,
    /// HMAC proving the agent holds the activation key, bound to its certificate.
    pub agent_proof: String,
    /// PEM certificate signing request for the agent's existing key.
    pub csr_pem: String,
    /// The agent's host name (what it will be called in its certificate).
    pub host_name: String,
    /// pm-agent version.
    pub agent_version: String,
    /// Engine adapter (`clamav`, `command`).
    pub engine: String,
}

/// Step 2 request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivateRequest {
    /// The agent nonce from step 1.
    pub agent_nonce: String,
    /// HMAC proving the manager holds the activation key, bound to the agent's certificate.
    pub manager_proof: String,
    /// The manager CA certificate (PEM): the only issuer of client certificates accepted from
    /// now on.
    pub ca_pem: String,
    /// The agent's new certificate (PEM) issued by that CA for the CSR.
    pub agent_certificate_pem: String,
    /// The manager's manifest signing public key (PEM), for verifying dist.
    pub manifest_key_pem: String,
    /// Base URL of the manager's `pm-mirror serve` (dist).
    pub dist_url: String,
    /// Name the manager knows the host by.
    pub host_name: String,
}

/// Step 2 answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivateResponse {
    /// Serial of the certificate the agent now presents (hex).
    pub certificate_serial: String,
    /// Fingerprint of that certificate.
    pub certificate_fingerprint: String,
}

/// Every error answer of the agent API: a message for the operator and a stable code for
/// programs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// `wrong_key`, `already_activated`, `no_activation_key`, `bad_request`, `forbidden`,
    /// `held` (then the body is a [`HeldResponse`]), ...
    pub code: String,
    /// What went wrong and what to do, lowercase.
    pub message: String,
}

/// An agent's refusal of an install because the host is held (HTTP 409): an
/// [`ErrorResponse`] with code `held`, and the hold, which the manager records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldResponse {
    /// `held`.
    pub code: String,
    /// Which hold, since when, until when, and how to release it.
    pub message: String,
    /// The hold in force.
    pub hold: HoldState,
}

/// Agent status, for the manager (mutual TLS) and `pm-agent status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Host name in its certificate.
    pub host_name: String,
    /// pm-agent version.
    pub agent_version: String,
    /// sha256 of the running pm-agent executable (read at start; `None` from older agents or
    /// when the file could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_sha256: Option<String>,
    /// Why the last self-upgrade did not take effect, when it failed after its answer (the new
    /// executable could not be started; the agent went back to the old one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_error: Option<String>,
    /// Whether a manager activated it.
    pub activated: bool,
    /// Fingerprint of the manager CA it trusts.
    pub manager_ca_fingerprint: Option<String>,
    /// Engine adapter.
    pub engine: String,
    /// Host group the manager gave it.
    #[serde(default)]
    pub group: Option<String>,
    /// Name of its active scan profile (`None`: no profile given yet, the engine's defaults).
    #[serde(default)]
    pub profile: Option<String>,
    /// Expiry of the license the manager gave it.
    #[serde(default)]
    pub license_expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The hold in force on the agent (none: not held).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<HoldState>,
    /// Whether the agent reports its hold in `hold` (agents from before do not: their `hold`
    /// tells nothing).
    #[serde(default)]
    pub reports_hold: bool,
    /// Fingerprint (`sha256:<hex>`) of the manager's manifest key the agent trusts (`None` from
    /// agents from before key rotation, and before activation): pm-poll records it, pm-doctor
    /// names the hosts that do not hold the manager's current key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_key: Option<String>,
}

/// Setup step: the host group (mutual TLS), [`GroupRequest`] in, [`SetupResponse`] out.
pub const GROUP_PATH: &str = "/v1/setup/group";
/// Setup step: the scan profile (mutual TLS), [`crate::profile::Profile`] in.
pub const PROFILE_PATH: &str = "/v1/setup/profile";
/// Setup step: the license file (mutual TLS), [`LicenseRequest`] in.
pub const LICENSE_PATH: &str = "/v1/setup/license";

/// The host group the manager files the host under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRequest {
    /// Group name.
    pub group: String,
}

/// A license file for the engine, registered on the manager with `pm-activate license add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LicenseRequest {
    /// The file's name as registered (a plain name, no directories).
    pub file_name: String,
    /// When it expires.
    pub expires_at: chrono::DateTime<chrono::Utc>,
    /// sha256 of the content (hex), checked on arrival.
    pub sha256: String,
    /// The content, hex-encoded.
    pub content_hex: String,
}

/// Answer of a setup step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetupResponse {
    /// Whether the agent's setup changed.
    pub changed: bool,
    /// A hold step only: the rollback's hold the agent kept instead of the window it was sent
    /// (a window never replaces a rollback's hold, see `agent::hold`); absent otherwise and
    /// from agents older than this release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept: Option<HoldState>,
}

impl From<bool> for SetupResponse {
    fn from(changed: bool) -> Self {
        SetupResponse {
            changed,
            kept: None,
        }
    }
}

/// Decodes lowercase or uppercase hex; `None` when it is not hex.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    // `from_str_radix` alone would take a sign (`+1`).
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Path of the manager's poll (mutual TLS): [`PollResponse`], with the query
/// `?scans_after=CURSOR&updates_after=CURSOR` so only reports the manager has not recorded come
/// back. A cursor is a report id (reports whose id sorts after it), or
/// `seq:<report_stream>:<N>[:<id>]` (reports whose sequence number is above N; see
/// [`PollResponse::report_stream`]), which an agent of another stream, or an older agent,
/// cannot match and answers as it can.
pub const POLL_PATH: &str = "/v1/poll";
/// Prefix of a sequence cursor in the poll query.
pub const SEQ_CURSOR_PREFIX: &str = "seq:";

/// A poll cursor by sequence number: `seq:<stream>:<n>`, or `seq:<stream>:<n>:<id>` with the
/// id of the report numbered n that the manager recorded, so that an agent whose state went
/// back (a snapshot restored) sees that its number n now names another report.
pub fn seq_cursor(stream: &str, seq: u64, id: Option<&str>) -> String {
    match id {
        Some(id) => format!("{SEQ_CURSOR_PREFIX}{stream}:{seq}:{id}"),
        None => format!("{SEQ_CURSOR_PREFIX}{stream}:{seq}"),
    }
}

/// The stream, number and report id (when given) of a sequence cursor; `None` for an id
/// cursor. Report ids hold no `:`.
pub fn parse_seq_cursor(cursor: &str) -> Option<(&str, u64, Option<&str>)> {
    let mut fields = cursor.strip_prefix(SEQ_CURSOR_PREFIX)?.splitn(3, ':');
    let stream = fields.next()?;
    let seq = fields.next()?.parse().ok()?;
    Some((stream, seq, fields.next()))
}
/// At most this many scan reports and this many update runs in one poll answer.
pub const POLL_MAX_REPORTS: usize = 50;

/// One installed component (database) on the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledComponent {
    /// Component name, e.g. `daily` or `test`.
    pub component: String,
    /// Its version, e.g. `27430`.
    pub version: Option<String>,
    /// Upstream build time, when known.
    #[serde(default)]
    pub build_time: Option<chrono::DateTime<chrono::Utc>>,
}

/// What is installed in the engine's database directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledState {
    /// Revision of the manager's dist (`r<serial>`).
    pub revision: Option<String>,
    /// Its manifest serial.
    pub serial: Option<u32>,
    /// When it was installed.
    pub installed_at: chrono::DateTime<chrono::Utc>,
    /// Its components.
    pub components: Vec<InstalledComponent>,
    /// Revisions of the local backups, `backup:1` first.
    pub backups: Vec<Option<String>>,
    /// Files of the installed set the database directory no longer holds as installed (gone,
    /// another size), for people; `revision` is then absent and their components have no
    /// version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub damaged: Vec<String>,
}

/// One configured schedule of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleEntry {
    /// `update` or `scan`.
    pub job: String,
    /// Cron expression (host local time).
    pub expression: String,
    /// Next run.
    pub next_run: Option<chrono::DateTime<chrono::Utc>>,
}

/// `GET /v1/poll`: everything the manager records about a host in one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PollResponse {
    /// Identity, version, group, profile, license.
    pub status: AgentStatus,
    /// What is installed (`None`: nothing installed yet).
    pub installed: Option<InstalledState>,
    /// The agent's own schedule.
    pub schedule: Vec<ScheduleEntry>,
    /// Scan reports newer than `scans_after`, oldest first, at most [`POLL_MAX_REPORTS`].
    pub scans: Vec<ScanReport>,
    /// Update and rollback runs newer than `updates_after`, oldest first.
    pub updates: Vec<UpdateRun>,
    /// The agent's report stream: its reports carry sequence numbers of this stream, which
    /// only grow, whatever its clock does (absent: an agent from before sequence numbers, or
    /// one that has made no report yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_stream: Option<String>,
    /// The last number the agent gave in its report stream. Below the manager's cursor, the
    /// agent's state went back (a VM snapshot or backup restored): its answer then holds every
    /// kept report, and numbers the manager recorded may name other reports now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_last: Option<u64>,
}

/// Path that makes an activated agent install the manager's dist now (mutual TLS); the body is
/// empty or an [`UpdateRequest`].
pub const UPDATE_PATH: &str = "/v1/update";

/// `POST /v1/update` request (optional: an empty body, `null` or `{}` installs dist).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRequest {
    /// Install the manager's backup N (1..=3) instead of dist: the revision `pm-mirror serve`
    /// serves at `<dist_url>/backup/N/`, verified with the manager key like dist. This is how
    /// pm-rollback moves agents back to an older revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u32>,
    /// Hold the host at what it installs (a rollback by hand, a fleet rollback): taken under
    /// the install lock once the install succeeded, so its schedule never runs in between.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<HoldSpec>,
}

/// Path that makes an activated agent replace its own executable with the pm-agent package of
/// the manager's dist for its platform, then restart itself (mutual TLS): [`UpgradeReport`].
pub const UPGRADE_PATH: &str = "/v1/upgrade";

/// The answer to [`UPGRADE_PATH`] (and `pm-agent upgrade`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeReport {
    /// Whether the executable was replaced (the agent restarts after answering).
    pub changed: bool,
    /// The package's component, `pm-agent-<arch>-<os>`.
    pub component: String,
    /// Version and sha256 of the executable that answered.
    pub from_version: String,
    /// sha256 of the executable that answered.
    pub from_sha256: String,
    /// Version of the package in dist.
    pub to_version: String,
    /// sha256 of the package in dist.
    pub to_sha256: String,
    /// Revision of dist the package came from.
    pub revision: String,
}

/// Path that makes an activated agent reinstall one of its local backups (mutual TLS).
pub const ROLLBACK_PATH: &str = "/v1/rollback";
/// Path listing the agent's last scheduled update runs, newest first (mutual TLS).
pub const UPDATES_PATH: &str = "/v1/updates";

/// One scheduled update run of the agent (`updates/<id>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateRun {
    /// Sortable id (start time, UTC).
    pub id: String,
    /// Its number in the agent's report stream (absent on runs from before them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// What started it: `schedule`, `manager` (the API) or `local` (`pm-agent update`).
    pub trigger: String,
    /// When it started.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// When it finished.
    pub finished_at: chrono::DateTime<chrono::Utc>,
    /// What the install did, when it succeeded.
    pub report: Option<InstallReport>,
    /// Why it failed.
    pub error: Option<String>,
}

/// `GET /v1/updates` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateList {
    /// Runs, newest first.
    pub runs: Vec<UpdateRun>,
}

/// `POST /v1/rollback` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackRequest {
    /// `backup:N`, N in 1..=3 (1 is the set installed before the current one).
    pub to: String,
    /// The hold the rollback leaves the host under (none: one of kind `rollback` saying the
    /// manager rolled it back): a host rolled back by hand stays there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<HoldSpec>,
}

/// Setup step: hold the host where it is, or release it (mutual TLS), [`HoldRequest`] in,
/// [`SetupResponse`] out. The answer comes once no install runs: after it, nothing moves the
/// host until the hold ends.
pub const HOLD_PATH: &str = "/v1/setup/hold";

/// Why a host is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HoldKind {
    /// Held on purpose: a maintenance window or change freeze (`pm-push hold`).
    Hold,
    /// Rolled back by hand: `pm-rollback --host H --to ...`, `pm-agent rollback`.
    Rollback,
    /// Moved by a fleet rollback whose dist has not rotated back (yet, or at all: part of the
    /// fleet); a fleet rollback that rotates dist releases these.
    FleetRollback,
}

impl HoldKind {
    /// The name in the inventory and the output: `hold`, `rollback`, `fleet-rollback`.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldKind::Hold => "hold",
            HoldKind::Rollback => "rollback",
            HoldKind::FleetRollback => "fleet-rollback",
        }
    }
}

/// A hold as the manager asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldSpec {
    /// Why.
    pub kind: HoldKind,
    /// For people: what the operator wrote, or what set it.
    pub reason: String,
    /// `user@host` of the command that set it.
    pub set_by: String,
    /// When it ends by itself, by the manager's clock (none: until released).
    #[serde(default)]
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// Seconds from the request to `until`. The agent holds until the later of `until` and
    /// this much of its own time from now, so a clock ahead of the manager's never ends a
    /// maintenance window early.
    #[serde(default)]
    pub seconds_left: Option<u64>,
}

/// `POST /v1/setup/hold`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldRequest {
    /// The hold to take (it replaces the one in force); none releases.
    pub hold: Option<HoldSpec>,
    /// With no hold: release only a hold of this kind (a fleet rollback releases the holds it
    /// set, never an operator's).
    #[serde(default)]
    pub only_kind: Option<HoldKind>,
}

/// A hold as the agent keeps it (`setup.json`) and shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldState {
    /// Why.
    pub kind: HoldKind,
    /// For people.
    pub reason: String,
    /// Who set it.
    pub set_by: String,
    /// When the agent took it (its clock).
    pub set_at: chrono::DateTime<chrono::Utc>,
    /// When it ends, by the agent's clock (none: until released).
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// The end the manager asked for, by the manager's clock.
    #[serde(default)]
    pub requested_until: Option<chrono::DateTime<chrono::Utc>>,
}

/// What an install (`update` or `rollback`) did on the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallReport {
    /// Whether a database file in the engine's directory changed.
    pub changed: bool,
    /// `update` or `rollback`.
    pub action: String,
    /// Revision now installed (`r<serial>` of the manager's dist).
    pub revision: Option<String>,
    /// Its manifest serial.
    pub serial: Option<u32>,
    /// Revision installed before.
    pub previous_revision: Option<String>,
    /// Database files that changed.
    pub files: Vec<InstalledFileChange>,
    /// Files fetched from dist (the others were already in the agent's local copies).
    pub downloaded: Vec<String>,
    /// Bytes fetched from the manager (0 from agents older than this field).
    #[serde(default)]
    pub downloaded_bytes: u64,
    /// Whether the engine was told to reload (clamd `RELOAD`).
    pub reloaded: bool,
}

/// One database file an install changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledFileChange {
    /// File name in the engine's database directory, e.g. `daily.cvd`.
    pub name: String,
    /// Version installed before (`None`: the file is new).
    pub from_version: Option<String>,
    /// Version installed now (`None`: the file was removed).
    pub to_version: Option<String>,
}

const AGENT_PROOF_LABEL: &[u8] = b"pm agent proof v1";
const MANAGER_PROOF_LABEL: &[u8] = b"pm manager proof v1";

fn hmac_hex(key: &[u8], parts: &[&[u8]]) -> String {
    let key = openssl::pkey::PKey::hmac(key).expect("an HMAC key of any length is valid");
    let mut signer = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &key)
        .expect("HMAC-SHA256 is available in every OpenSSL");
    for part in parts {
        // Length-prefixed, so no two different sequences of parts hash the same.
        signer
            .update(&(part.len() as u64).to_be_bytes())
            .expect("hmac update");
        signer.update(part).expect("hmac update");
    }
    crate::manifest::hex(&signer.sign_to_vec().expect("hmac final"))
}

/// The agent's proof: `HMAC(K, label | agent certificate fingerprint | Nm | Na)`.
pub fn agent_proof(
    key: &str,
    agent_fingerprint: &str,
    manager_nonce: &str,
    agent_nonce: &str,
) -> String {
    hmac_hex(
        key.as_bytes(),
        &[
            AGENT_PROOF_LABEL,
            agent_fingerprint.as_bytes(),
            manager_nonce.as_bytes(),
            agent_nonce.as_bytes(),
        ],
    )
}

/// The manager's proof: `HMAC(K, label | agent certificate fingerprint | Na | Nm)`.
pub fn manager_proof(
    key: &str,
    agent_fingerprint: &str,
    agent_nonce: &str,
    manager_nonce: &str,
) -> String {
    hmac_hex(
        key.as_bytes(),
        &[
            MANAGER_PROOF_LABEL,
            agent_fingerprint.as_bytes(),
            agent_nonce.as_bytes(),
            manager_nonce.as_bytes(),
        ],
    )
}

/// Compares two proofs in constant time.
pub fn proofs_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && openssl::memcmp::eq(a.as_bytes(), b.as_bytes())
}

/// 32 random bytes in hex.
pub fn nonce() -> String {
    let mut bytes = [0u8; 32];
    openssl::rand::rand_bytes(&mut bytes).expect("the OpenSSL random generator works");
    crate::manifest::hex(&bytes)
}

/// Path of an on-demand scan (mutual TLS): [`ScanRequest`] in, [`ScanReport`] out.
pub const SCAN_PATH: &str = "/v1/scan";
/// Path of the kept scan reports (mutual TLS): [`ScanList`], newest first.
pub const SCANS_PATH: &str = "/v1/scans";

/// A request to scan paths on the agent's host now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScanRequest {
    /// Absolute paths of files or directories (directories are scanned recursively).
    pub paths: Vec<String>,
}

/// How a scan ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScanResult {
    /// The engine scanned everything and found nothing.
    Clean,
    /// The engine scanned everything and found something (see the findings).
    Infected,
    /// The engine could not scan (everything): see `error`; findings may still be listed.
    Error,
}

impl ScanResult {
    /// `clean`, `infected` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            ScanResult::Clean => "clean",
            ScanResult::Infected => "infected",
            ScanResult::Error => "error",
        }
    }
}

/// One detection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanFinding {
    /// The file, as the engine named it.
    pub path: String,
    /// The signature name, e.g. `Eicar-Test-Signature`.
    pub signature: String,
}

/// The report of one scan, kept by the agent (its last N) and returned by [`SCAN_PATH`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanReport {
    /// Unique and sortable by start time: `20261126T075810.123456Z-1a2b3c4d`.
    pub id: String,
    /// Its number in the agent's report stream (absent on reports from before them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// When the engine was started.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// When it ended.
    pub finished_at: chrono::DateTime<chrono::Utc>,
    /// Wall-clock time of the engine run.
    pub duration_seconds: f64,
    /// Engine adapter (`clamav`, `command`).
    pub engine: String,
    /// The program that ran: `clamscan`, `clamdscan`, or the `command` engine's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<String>,
    /// The scanned paths.
    pub paths: Vec<String>,
    /// Files the engine scanned, when it reports the number (`Scanned files: N`).
    pub files_scanned: Option<u64>,
    /// Detections.
    pub findings: Vec<ScanFinding>,
    /// Clean, infected or error.
    pub result: ScanResult,
    /// What went wrong when `result` is `error` (the engine's error output).
    pub error: Option<String>,
}

/// The kept scan reports, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanList {
    /// Reports, newest first.
    pub reports: Vec<ScanReport>,
}

/// Setup step: the agent's own schedule (mutual TLS), [`ScheduleRequest`] in,
/// [`SetupResponse`] out.
pub const SCHEDULE_PATH: &str = "/v1/setup/schedule";

/// The schedule the manager gives an agent; it overrides `[schedule]` in the agent's
/// `agent.toml`. Neither `update` nor `scan`: the manager's schedule is removed and
/// `agent.toml`'s applies again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    /// When to install dist: a cron expression (5 fields, or 6 with seconds first), host
    /// local time.
    #[serde(default)]
    pub update: Option<String>,
    /// When to scan `scan_paths`: a cron expression.
    #[serde(default)]
    pub scan: Option<String>,
    /// Absolute paths the scheduled scan covers; required with `scan`.
    #[serde(default)]
    pub scan_paths: Vec<String>,
}

/// Largest answer the manager reads from an agent: a poll with its reports, an install or scan
/// report. A compromised or broken agent sending without end costs no more than this.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// Why an agent's answer could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// The transfer failed.
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
    /// It was longer than the limit.
    #[error("its answer is larger than {0} bytes")]
    TooLarge(usize),
}

/// Reads an answer's body, refusing more than `limit` bytes as they arrive.
pub async fn read_body(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, AnswerError> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(AnswerError::TooLarge(limit));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Err(AnswerError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequence_cursor_round_trips_and_an_id_is_not_one() {
        let cursor = seq_cursor("0a1b", 42, None);
        assert_eq!(cursor, "seq:0a1b:42");
        assert_eq!(parse_seq_cursor(&cursor), Some(("0a1b", 42, None)));
        let id = "20261126T075810.123456Z-1a2b3c4d";
        let with_id = seq_cursor("0a1b", 42, Some(id));
        assert_eq!(parse_seq_cursor(&with_id), Some(("0a1b", 42, Some(id))));
        assert_eq!(parse_seq_cursor(id), None);
        assert_eq!(parse_seq_cursor("seq:0a1b:x"), None);
        // An agent from before sequence numbers compares it as an id: it sorts after every id
        // (digits), so such an agent sends nothing rather than everything again.
        assert!(cursor.as_str() > "99991231T235959.999999Z-ffffffff");
    }

    /// Serves `body` once per request at `/` on a loopback port; returns its URL.
    async fn serve(body: fn() -> axum::body::Body) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let app = axum::Router::new().route("/", axum::routing::get(move || async move { body() }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    #[test]
    fn an_answer_longer_than_the_limit_is_refused_as_it_arrives() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let limit = 1 << 20;
            // Announced too long: refused before reading.
            let announced = serve(|| axum::body::Body::from(vec![b'x'; (1 << 20) + 1])).await;
            // Chunked without a length, and longer than any limit (bounded: 64 MiB).
            let endless = serve(|| {
                let chunks = (0..1024).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 64 << 10]));
                axum::body::Body::from_stream(futures_util::stream::iter(chunks))
            })
            .await;
            let fits = serve(|| axum::body::Body::from(vec![b'x'; 1 << 20])).await;
            for url in [announced, endless] {
                let response = reqwest::get(&url).await.unwrap();
                match read_body(response, limit).await {
                    Err(AnswerError::TooLarge(at)) => assert_eq!(at, limit),
                    other => panic!("{url}: {:?}", other.map(|b| b.len())),
                }
            }
            let response = reqwest::get(&fits).await.unwrap();
            assert_eq!(read_body(response, limit).await.unwrap().len(), limit);
        });
    }

    #[test]
    fn proofs_bind_the_key_the_certificate_and_both_nonces() {
        let proof = agent_proof("pmk1.a.secret", "sha256:aa", "nm", "na");
        assert!(proofs_equal(
            &proof,
            &agent_proof("pmk1.a.secret", "sha256:aa", "nm", "na")
        ));
        for other in [
            agent_proof("pmk1.a.other", "sha256:aa", "nm", "na"),
            agent_proof("pmk1.a.secret", "sha256:bb", "nm", "na"),
            agent_proof("pmk1.a.secret", "sha256:aa", "nm2", "na"),
            agent_proof("pmk1.a.secret", "sha256:aa", "nm", "na2"),
            manager_proof("pmk1.a.secret", "sha256:aa", "na", "nm"),
        ] {
            assert!(!proofs_equal(&proof, &other));
        }
        assert_ne!(nonce(), nonce());
    }

    #[test]
    fn hex_round_trips_and_rejects_what_is_not_hex() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(unhex(&crate::manifest::hex(&bytes)).unwrap(), bytes);
        assert_eq!(unhex("ABff").unwrap(), [0xab, 0xff]);
        for bad in ["abc", "zz", "+1", "é0"] {
            assert!(unhex(bad).is_none(), "{bad}");
        }
    }
}
