//! The agent's half of a certificate re-issue (renewal, a new address, a rename; the manager's
//! half is `crate::hosts::renew`), and where the key and certificate the manager issued live.
//!
//! `POST /v1/certificate/request` (mutual TLS) makes a new P-256 key, writes it aside to
//! `manager/renewal.key` (0600) and answers a CSR for it. `POST /v1/certificate/install` takes
//! the certificate the manager CA issued for that request: it must be for the kept key and chain
//! to the manager CA this agent trusts; when it only fails on time, the answer (`clock`) names
//! this host's clock and the certificate's validity. Then key and certificate are written
//! together to `manager/identity.pem` (0600) in one rename: the commit, so a crash leaves the
//! old pair or the new one, never a key without its certificate. The files activation wrote
//! follow ([`mirror`]: `agent.key`, a self-signed `agent.pem` for the new key, `manager/agent.pem`,
//! `manager.json`), so that they keep meaning what they meant (for an older pm-agent after a
//! downgrade, for `openssl x509 -in manager/agent.pem`, for the self-signed identity a
//! deactivation falls back to); a crash between the commit and them is repaired at the next
//! start ([`repair`]). Then the TLS listener switches for new connections.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use openssl::pkey::{PKey, Private};
use openssl::x509::X509;

use super::{
    Agent, ISSUED_CERT_FILE, KEY_FILE, MANAGER_FILE, SELF_SIGNED_CERT_FILE, error, from_manager,
    io_error,
};
use crate::durable;
use crate::pki::ca::{self, AgentIdentity, IssueProblem};
use crate::proto;
use crate::tls::{ClientAuth, TlsConnectInfo, TlsServerConfig};

/// The key and certificate of the last re-issue, in one file (PEM, key first).
pub const IDENTITY_FILE: &str = "manager/identity.pem";
/// The key of a request whose certificate has not been installed yet.
const RENEWAL_KEY_FILE: &str = "manager/renewal.key";

/// The key and the certificate the manager issued to this agent: `manager/identity.pem` after
/// a re-issue (what a crash may have left ahead of the other files), else `agent.key` with
/// `manager/agent.pem` (as activation left them).
pub(super) fn issued_identity(dir: &Path) -> Result<(PKey<Private>, X509)> {
    let path = dir.join(IDENTITY_FILE);
    if !path.exists() {
        return super::load_identity(dir, ISSUED_CERT_FILE);
    }
    let key = ca::load_private_key(&path)?;
    let cert = ca::load_certificate(&path)?;
    if !key.public_eq(cert.public_key()?.as_ref()) {
        return Err(crate::cli::UserError::failure(format!(
            "`{}` holds a key and a certificate that do not belong together",
            path.display()
        ))
        .with_hint(format!(
            "run `pm-agent --state {} reset` and activate the host again",
            dir.display()
        ))
        .into());
    }
    Ok((key, cert))
}

/// The certificate the manager issued to this agent, and the activation record as it follows
/// from it: a crash between the commit of a re-issue and the rewrite of `manager.json` leaves
/// the record's serial behind, and the certificate's own name and serial then win.
pub(super) fn issued_certificate(
    dir: &Path,
    record: super::ManagerRecord,
) -> Result<(super::ManagerRecord, X509)> {
    let path = dir.join(IDENTITY_FILE);
    let cert = if path.exists() {
        ca::load_certificate(&path)?
    } else {
        ca::load_certificate(&dir.join(ISSUED_CERT_FILE))?
    };
    let serial = ca::serial_hex(&cert)?;
    if serial == record.certificate_serial {
        return Ok((record, cert));
    }
    let record = super::ManagerRecord {
        host_name: ca::common_name(&cert).unwrap_or(record.host_name.clone()),
        certificate_serial: serial,
        ..record
    };
    Ok((record, cert))
}

/// `POST /v1/certificate/request`.
async fn request_handler(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
) -> Response {
    let inner = agent.lock();
    if let Err(response) = from_manager(&inner, &info) {
        return *response;
    }
    let host_name = inner
        .activation
        .as_ref()
        .map(|a| a.record.host_name.clone())
        .unwrap_or_default();
    let made = ca::new_key().map_err(anyhow::Error::from).and_then(|key| {
        // The manager puts its own names in the certificate; the subject is a courtesy.
        let subject = if host_name.is_empty() {
            "pm-agent"
        } else {
            &host_name
        };
        let csr = ca::make_csr(&key, subject)?;
        let path = agent.dir.join(RENEWAL_KEY_FILE);
        durable::write_atomic(&path, &key.private_key_to_pem_pkcs8()?, 0o600)
            .map_err(io_error("write", &path))?;
        Ok(csr)
    });
    match made {
        Ok(csr) => {
            tracing::info!(remote = %info.remote, "new key made for a certificate re-issue");
            axum::Json(proto::CertificateRequestAnswer {
                csr_pem: String::from_utf8_lossy(&csr).into_owned(),
            })
            .into_response()
        }
        Err(err) => super::failure_response("internal", &err),
    }
}

/// `POST /v1/certificate/install`.
async fn install_handler(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
    body: Bytes,
) -> Response {
    let request: proto::CertificateInstall = match super::parse_body(&body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let mut inner = agent.lock();
    if let Err(response) = from_manager(&inner, &info) {
        return *response;
    }
    let Some(activation) = inner.activation.as_mut() else {
        return super::not_activated();
    };
    let bad = |message: String| error(StatusCode::BAD_REQUEST, "bad_request", message);
    let key_path = agent.dir.join(RENEWAL_KEY_FILE);
    let key = match ca::load_private_key(&key_path) {
        Ok(key) => key,
        Err(_) => {
            return error(
                StatusCode::CONFLICT,
                "no_pending_request",
                "this agent has no key waiting for a certificate (another manager run used it, \
                 or the agent restarted): request a new one",
            );
        }
    };
    let Ok(cert) = X509::from_pem(request.certificate_pem.as_bytes()) else {
        return bad("certificate_pem is not a PEM certificate".into());
    };
    if !cert
        .public_key()
        .map(|public| key.public_eq(&public))
        .unwrap_or(false)
    {
        return bad(
            "the certificate is not for the key of this agent's last request (a newer request \
             replaced it): request a new one"
                .into(),
        );
    }
    if ca::check_host_name(&request.host_name).is_err() {
        return bad(format!(
            "`{}` cannot be a host name",
            request.host_name.escape_debug()
        ));
    }
    match ca::check_issued_by(&cert, &activation.ca) {
        Ok(()) => {}
        Err(IssueProblem::NotIssued) => {
            return bad("the certificate is not issued by this agent's manager CA".into());
        }
        Err(problem) => {
            let message = crate::hosts::describe_problem(
                "the new certificate",
                "this agent's clock",
                &problem,
            );
            tracing::warn!(%message, "certificate refused");
            return error(
                StatusCode::CONFLICT,
                "clock",
                format!("{message}; set this host's clock right (NTP) and try again"),
            );
        }
    }
    let record = super::ManagerRecord {
        host_name: request.host_name.clone(),
        certificate_serial: ca::serial_hex(&cert).unwrap_or_default(),
        ..activation.record.clone()
    };
    if let Err(err) = commit(&agent.dir, &key, &cert, &record, &agent.config.host_name) {
        tracing::error!(error = %format!("{err:#}"), "cannot store the new certificate");
        return super::failure_response("internal", &err);
    }
    let config = TlsServerConfig {
        key: key.clone(),
        cert: cert.clone(),
        client_auth: ClientAuth::Required {
            ca: activation.ca.clone(),
        },
    };
    if let Err(err) = agent.handle.reload(&config) {
        // Stored but not served: the next start serves it.
        tracing::error!(error = %format!("{err:#}"), "cannot switch to the new certificate");
        return super::failure_response("internal", &err);
    }
    activation.cert = cert.clone();
    activation.record = record;
    let answer = proto::CertificateInstalled {
        certificate_serial: activation.record.certificate_serial.clone(),
        certificate_fingerprint: crate::tls::fingerprint(&cert),
    };
    tracing::info!(
        remote = %info.remote,
        host_name = %activation.record.host_name,
        serial = %answer.certificate_serial,
        "installed a new certificate"
    );
    // `agent.key` is the new key now, for the self-signed identity too.
    inner.key = key;
    axum::Json(answer).into_response()
}

/// Writes the new pair (the commit), then the files that follow from it, then forgets the kept
/// key. `self_name` is the common name of the self-signed certificate (the agent's own
/// `host_name`).
fn commit(
    dir: &Path,
    key: &PKey<Private>,
    cert: &X509,
    record: &super::ManagerRecord,
    self_name: &str,
) -> Result<()> {
    let mut pair = key.private_key_to_pem_pkcs8()?;
    pair.extend_from_slice(&cert.to_pem()?);
    let identity = dir.join(IDENTITY_FILE);
    durable::write_atomic(&identity, &pair, 0o600).map_err(io_error("write", &identity))?;
    mirror(dir, key, cert, self_name)?;
    let manager = dir.join(MANAGER_FILE);
    durable::write_atomic(&manager, &serde_json::to_vec_pretty(record)?, 0o644)
        .map_err(io_error("write", &manager))?;
    let pending = dir.join(RENEWAL_KEY_FILE);
    match std::fs::remove_file(&pending) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(io_error("remove", &pending)(err)),
    }
}

/// Writes the files activation wrote for the committed pair: `agent.key` (0600), a self-signed
/// `agent.pem` for it, and `manager/agent.pem`, each by rename.
fn mirror(dir: &Path, key: &PKey<Private>, cert: &X509, self_name: &str) -> Result<()> {
    let write = |file: &str, bytes: &[u8], mode: u32| {
        let path = dir.join(file);
        durable::write_atomic(&path, bytes, mode).map_err(io_error("write", &path))
    };
    write(KEY_FILE, &key.private_key_to_pem_pkcs8()?, 0o600)?;
    let self_signed = AgentIdentity::self_signed(key, self_name)?;
    write(SELF_SIGNED_CERT_FILE, &self_signed.to_pem()?, 0o644)?;
    write(ISSUED_CERT_FILE, &cert.to_pem()?, 0o644)
}

/// At start: when a crash came between a re-issue's commit and the files that follow it, writes
/// them again from `manager/identity.pem` (nothing to do otherwise).
pub(super) fn repair(dir: &Path, self_name: &str) -> Result<()> {
    if !dir.join(IDENTITY_FILE).exists() {
        return Ok(());
    }
    let (key, cert) = issued_identity(dir)?;
    let behind = match (
        ca::load_private_key(&dir.join(KEY_FILE)),
        ca::load_certificate(&dir.join(ISSUED_CERT_FILE)),
    ) {
        (Ok(legacy_key), Ok(legacy_cert)) => {
            !legacy_key.public_eq(&key) || legacy_cert.to_der()? != cert.to_der()?
        }
        _ => true,
    };
    if behind {
        tracing::warn!("finishing a certificate re-issue an interruption left halfway");
        mirror(dir, &key, &cert, self_name)?;
    }
    Ok(())
}

/// The self-signed identity (`agent.key`, `agent.pem`) as a TLS configuration without client
/// certificates: what an agent serves once its manager is forgotten.
pub(super) fn self_signed_config(dir: &Path) -> Result<TlsServerConfig> {
    let (key, cert) = super::load_identity(dir, super::SELF_SIGNED_CERT_FILE)?;
    Ok(TlsServerConfig {
        key,
        cert,
        client_auth: ClientAuth::None,
    })
}

/// `POST /v1/certificate/request` and `/install`.
pub(super) fn routes() -> Router<Arc<Agent>> {
    Router::new()
        .route(proto::CERTIFICATE_REQUEST_PATH, post(request_handler))
        .route(proto::CERTIFICATE_INSTALL_PATH, post(install_handler))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state directory as activation leaves it: `agent.key`, its self-signed `agent.pem`, and
    /// `manager/agent.pem` issued by `ca` for that key.
    fn activated(dir: &Path, ca: &ca::ManagerCa) -> (PKey<Private>, X509) {
        let (key, self_signed) = AgentIdentity::generate("web-1").unwrap();
        let cert = ca
            .sign_agent_csr(&ca::make_csr(&key, "web-1").unwrap(), "web-1")
            .unwrap();
        durable::create_private_dir(&dir.join(super::super::MANAGER_DIR), 0o700).unwrap();
        durable::write_atomic(
            &dir.join(KEY_FILE),
            &key.private_key_to_pem_pkcs8().unwrap(),
            0o600,
        )
        .unwrap();
        std::fs::write(
            dir.join(SELF_SIGNED_CERT_FILE),
            self_signed.to_pem().unwrap(),
        )
        .unwrap();
        std::fs::write(dir.join(ISSUED_CERT_FILE), cert.to_pem().unwrap()).unwrap();
        (key, cert)
    }

    #[test]
    fn a_re_issue_interrupted_after_its_commit_is_finished_at_the_next_start() {
        let home = tempfile::tempdir().unwrap();
        let ca = ca::ManagerCa::load_or_create(home.path()).unwrap();
        let state = tempfile::tempdir().unwrap();
        let dir = state.path();
        let (old_key, old_cert) = activated(dir, &ca);
        assert!(issued_identity(dir).unwrap().1.to_der().unwrap() == old_cert.to_der().unwrap());
        repair(dir, "web-1").unwrap();

        // The commit happened, then the agent died before the other files were written.
        let key = ca::new_key().unwrap();
        let cert = ca
            .sign_agent_csr(&ca::make_csr(&key, "web-1").unwrap(), "web-1")
            .unwrap();
        let mut pair = key.private_key_to_pem_pkcs8().unwrap();
        pair.extend_from_slice(&cert.to_pem().unwrap());
        durable::write_atomic(&dir.join(IDENTITY_FILE), &pair, 0o600).unwrap();
        let (served_key, served) = issued_identity(dir).unwrap();
        assert!(served_key.public_eq(&key));
        assert_eq!(served.to_der().unwrap(), cert.to_der().unwrap());

        repair(dir, "web-1").unwrap();
        // What activation wrote means what it meant: the issued pair, and a self-signed
        // certificate for the same key to fall back to.
        let legacy = super::super::load_identity(dir, ISSUED_CERT_FILE).unwrap();
        assert!(legacy.0.public_eq(&key) && !legacy.0.public_eq(&old_key));
        assert_eq!(legacy.1.to_der().unwrap(), cert.to_der().unwrap());
        assert!(self_signed_config(dir).unwrap().key.public_eq(&key));
        use std::os::unix::fs::PermissionsExt;
        for file in [KEY_FILE, IDENTITY_FILE] {
            let mode = std::fs::metadata(dir.join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
    }
}
