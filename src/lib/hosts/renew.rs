//! Re-issuing an agent's certificate over the mutual-TLS identity it already has: the one
//! mechanism behind automatic renewal (`pm-poll`, `pm-push`'s wave polls), a new address and a
//! rename (`pm-activate host`).
//!
//! 1. `POST /v1/certificate/request`: the agent makes a new P-256 key, keeps it aside (0600) and
//!    answers a CSR for it.
//! 2. The manager CA signs it for the host's name and the address it is reached at
//!    ([`crate::hosts::reach_names`]): the names come from the manager, never from the request.
//! 3. `POST /v1/certificate/install`: the agent checks that the certificate is for the key it
//!    kept and chains to its manager CA (naming both clocks when only time is wrong), commits key
//!    and certificate in one rename, and serves every new connection with them.
//! 4. [`verify`]: a new connection, checked the way `pm-poll` checks one, must present the new
//!    certificate. Only then does the caller retire the old serial (`revoked_certificates`).
//!
//! Both requests say `Connection: close`, so the check in step 4 is a new connection (a kept one
//! would still show the old certificate).

use std::net::IpAddr;

use openssl::x509::X509;

use crate::pki::ca::{CaError, ManagerCa};
use crate::proto::{self, ErrorResponse};

/// Why a re-issue did not happen (or did not take).
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// No answer, or not the answer of a pm-agent.
    #[error("agent `{address}`: {message}")]
    Agent {
        /// The agent's address.
        address: String,
        /// What went wrong.
        message: String,
    },
    /// The agent is older than certificate renewal.
    #[error(
        "agent `{address}` cannot renew its certificate: its pm-agent is older than certificate \
         renewal"
    )]
    Unsupported {
        /// The agent's address.
        address: String,
    },
    /// The agent refused the request or the certificate.
    #[error("agent `{address}` refused the new certificate: {message} ({code})")]
    Refused {
        /// The agent's address.
        address: String,
        /// Its error code (`clock`, `bad_request`, ...).
        code: String,
        /// Its message.
        message: String,
    },
    /// The CA would not sign (a name that cannot be in a certificate).
    #[error("cannot issue a certificate for agent `{address}`: {source}")]
    Sign {
        /// The agent's address.
        address: String,
        /// Why.
        source: CaError,
    },
    /// After the install a new connection still shows another certificate.
    #[error(
        "agent `{address}` answered the install but a new connection presents certificate \
         {actual}, not the new {expected}"
    )]
    NotInstalled {
        /// The agent's address.
        address: String,
        /// The new certificate's fingerprint.
        expected: String,
        /// What the agent presents.
        actual: String,
    },
}

impl RenewError {
    /// What to do about it.
    pub fn hint(&self) -> String {
        match self {
            RenewError::Unsupported { .. } => "upgrade the agent (`pm-push upgrade-agent --host \
                 NAME`), or run `pm-agent reset` on the host and activate it again with a key"
                .into(),
            RenewError::Refused { code, .. } if code == "clock" => {
                "set the host's clock right (NTP, chrony) and run the same command again".into()
            }
            RenewError::Sign { .. } => "give the host a valid name with --name".into(),
            _ => "check that `pm-agent run` is running on the host and reachable, then run the \
                  same command again"
                .into(),
        }
    }
}

/// POSTs `body` to the agent on a connection that is closed afterwards, and reads its answer.
async fn exchange<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    address: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<T, RenewError> {
    let agent = |message: String| RenewError::Agent {
        address: address.to_string(),
        message,
    };
    let response = client
        .post(format!("https://{address}{path}"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(reqwest::header::CONNECTION, "close")
        .body(body)
        .send()
        .await
        .map_err(|err| agent(format!("{:#}", anyhow::Error::new(err))))?;
    let status = response.status();
    let bytes = proto::read_body(response, proto::MAX_ANSWER_BYTES)
        .await
        .map_err(|err| agent(err.to_string()))?;
    if !status.is_success() {
        let refusal = serde_json::from_slice::<ErrorResponse>(&bytes).ok();
        return Err(match refusal {
            // Agents from before renewal answer an activated manager's unknown path with 404.
            Some(e) if e.code == "not_found" => RenewError::Unsupported {
                address: address.to_string(),
            },
            Some(e) => RenewError::Refused {
                address: address.to_string(),
                code: e.code,
                message: e.message,
            },
            None => agent(format!("HTTP {status}")),
        });
    }
    serde_json::from_slice(&bytes).map_err(|err| {
        agent(format!(
            "answered {path} with something that is not a pm-agent answer: {err}"
        ))
    })
}

/// Has the agent at `address` (reached over `client`, mutual TLS) take a new key and a
/// certificate for `host_name` and that address (plus `resolved`, the IP a DNS name resolved
/// to); returns the certificate it installed.
pub async fn reissue(
    client: &reqwest::Client,
    address: &str,
    host_name: &str,
    ca: &ManagerCa,
    resolved: Option<IpAddr>,
) -> Result<X509, RenewError> {
    let request: proto::CertificateRequestAnswer = exchange(
        client,
        address,
        proto::CERTIFICATE_REQUEST_PATH,
        b"{}".to_vec(),
    )
    .await?;
    let (ips, dns) = super::reach_names(address, resolved);
    let dns: Vec<&str> = dns.iter().map(String::as_str).collect();
    let cert = ca
        .sign_agent_csr_with(request.csr_pem.as_bytes(), host_name, &ips, &dns)
        .map_err(|source| RenewError::Sign {
            address: address.to_string(),
            source,
        })?;
    let pem = cert.to_pem().map_err(|err| RenewError::Sign {
        address: address.to_string(),
        source: err.into(),
    })?;
    let install = proto::CertificateInstall {
        certificate_pem: String::from_utf8_lossy(&pem).into_owned(),
        host_name: host_name.to_string(),
    };
    let body = serde_json::to_vec(&install).expect("plain strings encode");
    let installed: proto::CertificateInstalled =
        exchange(client, address, proto::CERTIFICATE_INSTALL_PATH, body).await?;
    let fingerprint = crate::tls::fingerprint(&cert);
    if installed.certificate_fingerprint != fingerprint {
        return Err(RenewError::NotInstalled {
            address: address.to_string(),
            expected: fingerprint,
            actual: installed.certificate_fingerprint,
        });
    }
    Ok(cert)
}

/// Asks the agent for its status on a new connection over `client` and checks that it presents
/// the certificate `fingerprint`: with a client that verifies names as `pm-poll`'s does, proof
/// that the next poll reaches it.
pub async fn verify(
    client: &reqwest::Client,
    address: &str,
    fingerprint: &str,
) -> Result<proto::AgentStatus, RenewError> {
    let agent = |message: String| RenewError::Agent {
        address: address.to_string(),
        message,
    };
    let response = client
        .get(format!("https://{address}{}", proto::STATUS_PATH))
        .header(reqwest::header::CONNECTION, "close")
        .send()
        .await
        .map_err(|err| agent(format!("{:#}", anyhow::Error::new(err))))?;
    let actual = crate::tls::peer_fingerprint(&response).unwrap_or_default();
    if actual != fingerprint {
        return Err(RenewError::NotInstalled {
            address: address.to_string(),
            expected: fingerprint.to_string(),
            actual,
        });
    }
    let status = response.status();
    let bytes = proto::read_body(response, proto::MAX_ANSWER_BYTES)
        .await
        .map_err(|err| agent(err.to_string()))?;
    if !status.is_success() {
        return Err(agent(format!("answered its status with HTTP {status}")));
    }
    serde_json::from_slice(&bytes).map_err(|err| agent(format!("its status does not parse: {err}")))
}
