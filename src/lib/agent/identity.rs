//! The agent's half of a certificate re-issue (renewal, a new address, a rename; the manager's
//! half is `crate::hosts::renew`), and where the key and certificate the manager issued live.
//!
//! `POST /v1/certificate/request` (mutual TLS) makes a new P-256 key, writes it aside to
//! `manager/renewal.key` (0600) and answers a CSR for it. `POST /v1/certificate/install` takes
//! the certificate the manager CA issued for that request: it must be for the kept key and chain
//! to the manager CA this agent trusts; when it only fails on time, the answer (`clock`) names
//! this host's clock and the certificate's validity. Then key and certificate are written
//! together to `manager/identity.pem` (0600) in one rename (the commit: a crash leaves the old
//! pair or the new one, never a key without its certificate), `manager.json` and
//! `manager/agent.pem` follow, and the TLS listener switches for new connections.
//!
//! Before the first re-issue the issued certificate is `manager/agent.pem` for the key
//! `agent.key` (what activation wrote); [`issued_identity`] reads whichever is current.
//! `agent.key` and `agent.pem` stay the self-signed identity the agent falls back to when its
//! manager is forgotten.

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

use super::{Agent, ISSUED_CERT_FILE, MANAGER_FILE, error, from_manager, io_error};
use crate::durable;
use crate::pki::ca::{self, IssueProblem};
use crate::proto;
use crate::tls::{ClientAuth, TlsConnectInfo, TlsServerConfig};

/// The key and certificate of the last re-issue, in one file (PEM, key first).
pub const IDENTITY_FILE: &str = "manager/identity.pem";
/// The key of a request whose certificate has not been installed yet.
const RENEWAL_KEY_FILE: &str = "manager/renewal.key";

/// The key and the certificate the manager issued to this agent: `manager/identity.pem` after
/// a re-issue, else `agent.key` with `manager/agent.pem` (as activation left them).
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
    if let Err(err) = commit(&agent.dir, &key, &cert, &record) {
        tracing::error!(error = %format!("{err:#}"), "cannot store the new certificate");
        return super::failure_response("internal", &err);
    }
    let config = TlsServerConfig {
        key,
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
    axum::Json(answer).into_response()
}

/// Writes the new pair (the commit), then what follows from it, then forgets the kept key.
fn commit(
    dir: &Path,
    key: &PKey<Private>,
    cert: &X509,
    record: &super::ManagerRecord,
) -> Result<()> {
    let mut pair = key.private_key_to_pem_pkcs8()?;
    pair.extend_from_slice(&cert.to_pem()?);
    let identity = dir.join(IDENTITY_FILE);
    durable::write_atomic(&identity, &pair, 0o600).map_err(io_error("write", &identity))?;
    let manager = dir.join(MANAGER_FILE);
    durable::write_atomic(&manager, &serde_json::to_vec_pretty(record)?, 0o644)
        .map_err(io_error("write", &manager))?;
    let issued = dir.join(ISSUED_CERT_FILE);
    durable::write_atomic(&issued, &cert.to_pem()?, 0o644).map_err(io_error("write", &issued))?;
    let pending = dir.join(RENEWAL_KEY_FILE);
    match std::fs::remove_file(&pending) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(io_error("remove", &pending)(err)),
    }
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
