//! The certificates of mutual TLS between the manager and its agents.
//!
//! The manager owns a small CA (ECDSA P-256, self-signed, 10 years) in `PM_HOME/pki/ca.key`
//! (0600) and `ca.pem` (0644), and a client certificate issued by it (`client.key`/`client.pem`,
//! clientAuth, 2 years) that it presents to agents. At activation an agent sends a certificate
//! request; the manager checks its self-signature and issues a certificate for the agent's key
//! whose names come from the manager (the host name it activates), never from the request.
//! Agents use [`AgentIdentity::generate`] for the self-signed certificate of their
//! pre-activation TLS server and [`make_csr`] for the request.
//!
//! Everything is created on first use with [`durable::write_atomic`], certificate after key, so a
//! crash leaves either nothing or a complete pair; creation is serialised by `pki/.lock`.

use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{HasPublic, Id, PKey, PKeyRef, Private};
use openssl::stack::Stack;
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::{X509, X509Builder, X509Name, X509NameRef, X509Ref, X509Req, X509StoreContext};

use crate::durable;

/// Private key of the manager CA, relative to the home.
pub const CA_KEY_FILE: &str = "pki/ca.key";
/// Certificate of the manager CA (what agents trust), relative to the home.
pub const CA_CERT_FILE: &str = "pki/ca.pem";
/// Private key of the manager's client certificate, relative to the home.
pub const CLIENT_KEY_FILE: &str = "pki/client.key";
/// The manager's client certificate, relative to the home.
pub const CLIENT_CERT_FILE: &str = "pki/client.pem";

const LOCK_FILE: &str = "pki/.lock";
const CA_DAYS: u32 = 3650;
const CLIENT_DAYS: u32 = 730;
/// How long an agent certificate is valid; `pm-poll` renews it well before the end
/// ([`crate::hosts::renewal_due`]).
pub const AGENT_DAYS: u32 = 365;
const SELF_SIGNED_DAYS: u32 = 3650;
/// A client certificate closer than this to its end is issued again.
const CLIENT_RENEW_DAYS: u32 = 30;
/// Certificate requests are a few hundred bytes; anything this large is not one.
const MAX_CSR_BYTES: usize = 64 * 1024;
/// X.509 `ub-common-name`.
const MAX_COMMON_NAME: usize = 64;

/// Certificate errors.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading, writing or locking a file failed.
    #[error("cannot {action} `{path}`")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A private key file is readable by group or others.
    #[error("`{path}` is readable by other users (mode {mode:o}); run `chmod 600` on it")]
    LoosePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key or certificate file does not parse.
    #[error("`{path}` is not a {what} in PEM form; restore it from a backup")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What it should hold.
        what: &'static str,
        /// The parser's error.
        source: ErrorStack,
    },
    /// A private key does not belong to the certificate next to it.
    #[error("`{key}` is not the key of `{cert}`; restore both files from the same backup")]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// The CA certificate exists but its key is gone.
    #[error(
        "the CA key `{key}` is missing but `{cert}` exists; restore the key from a backup, or \
         remove `{cert}` to create a new CA and then re-activate every host"
    )]
    MissingCaKey {
        /// The missing key file.
        key: PathBuf,
        /// The CA certificate.
        cert: PathBuf,
    },
    /// The agent's certificate request is unusable (it comes from the network).
    #[error("the agent's certificate request is refused: {reason}")]
    BadCsr {
        /// Why.
        reason: String,
    },
    /// The host name cannot be put into a certificate.
    #[error(
        "`{name}` cannot name a host in a certificate: {reason}; give a DNS name or an IP \
         address without port or brackets"
    )]
    BadHostName {
        /// The name as given.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A certificate common name is empty or too long.
    #[error("`{0}` cannot be a certificate common name (1 to 64 bytes)")]
    BadCommonName(String),
    /// An OpenSSL operation failed.
    #[error("openssl: {0}")]
    Openssl(#[from] ErrorStack),
}

/// The manager CA: issues the manager's client certificate and the agents' certificates.
pub struct ManagerCa {
    key: PKey<Private>,
    cert: X509,
}

impl ManagerCa {
    /// Loads the CA from `home/pki/`, creating it (key 0600, certificate 0644, in a 0700 `pki/`)
    /// on first use. A key readable by group or others is refused.
    pub fn load_or_create(home: &Path) -> Result<ManagerCa, CaError> {
        if let Some(ca) = Self::load(home)? {
            return Ok(ca);
        }
        let _lock = lock_pki(home)?;
        // Another process may have created it while this one waited for the lock.
        if let Some(ca) = Self::load(home)? {
            return Ok(ca);
        }
        let ca = Self::generate()?;
        let key_path = home.join(CA_KEY_FILE);
        let cert_path = home.join(CA_CERT_FILE);
        write_file(&key_path, &ca.key.private_key_to_pem_pkcs8()?, 0o600)?;
        write_file(&cert_path, &ca.cert.to_pem()?, 0o644)?;
        tracing::info!(
            path = %cert_path.display(),
            fingerprint = %cert_fingerprint(&ca.cert)?,
            "created manager CA"
        );
        Ok(ca)
    }

    fn load(home: &Path) -> Result<Option<ManagerCa>, CaError> {
        let cert_path = home.join(CA_CERT_FILE);
        let key_path = home.join(CA_KEY_FILE);
        let Some(cert) = read_optional(&cert_path)? else {
            return Ok(None);
        };
        let cert = X509::from_pem(&cert).map_err(|source| CaError::BadFile {
            path: cert_path.clone(),
            what: "certificate",
            source,
        })?;
        let key = match load_private_key(&key_path) {
            Err(CaError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(CaError::MissingCaKey {
                    key: key_path,
                    cert: cert_path,
                });
            }
            other => other?,
        };
        let public = cert.public_key()?;
        if !key.public_eq(&public) {
            return Err(CaError::KeyMismatch {
                key: key_path,
                cert: cert_path,
            });
        }
        Ok(Some(ManagerCa { key, cert }))
    }

    fn generate() -> Result<ManagerCa, CaError> {
        let key = generate_p256()?;
        let mut id = [0u8; 8];
        openssl::rand::rand_bytes(&mut id)?;
        let name = name_with_cn(&format!("pm manager CA {}", crate::manifest::hex(&id)))?;
        let mut builder = new_builder(&name, &name, &key, CA_DAYS)?;
        builder.append_extension(BasicConstraints::new().critical().ca().pathlen(0).build()?)?;
        builder.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()?,
        )?;
        let ski = SubjectKeyIdentifier::new().build(&builder.x509v3_context(None, None))?;
        builder.append_extension(ski)?;
        let aki = AuthorityKeyIdentifier::new()
            .keyid(true)
            .build(&builder.x509v3_context(None, None))?;
        builder.append_extension(aki)?;
        builder.sign(&key, MessageDigest::sha256())?;
        Ok(ManagerCa {
            key,
            cert: builder.build(),
        })
    }

    /// The CA certificate, which agents receive at activation and trust from then on.
    pub fn certificate(&self) -> &X509 {
        &self.cert
    }

    /// The CA certificate in PEM form.
    pub fn certificate_pem(&self) -> Result<Vec<u8>, CaError> {
        Ok(self.cert.to_pem()?)
    }

    /// The manager's client key and certificate (`home/pki/client.key` 0600, `client.pem`),
    /// issued by this CA on first use, and issued again when the stored one is not from this
    /// CA, does not match its key, or ends within 30 days.
    pub fn client_identity(&self, home: &Path) -> Result<(PKey<Private>, X509), CaError> {
        if let Some(identity) = self.load_client(home)? {
            return Ok(identity);
        }
        let _lock = lock_pki(home)?;
        if let Some(identity) = self.load_client(home)? {
            return Ok(identity);
        }
        let key = generate_p256()?;
        let subject = name_with_cn("pm manager")?;
        let mut builder = new_builder(&subject, self.cert.subject_name(), &key, CLIENT_DAYS)?;
        builder.append_extension(BasicConstraints::new().critical().build()?)?;
        builder.append_extension(KeyUsage::new().critical().digital_signature().build()?)?;
        builder.append_extension(ExtendedKeyUsage::new().client_auth().build()?)?;
        self.append_key_ids(&mut builder)?;
        builder.sign(&self.key, MessageDigest::sha256())?;
        let cert = builder.build();
        let key_path = home.join(CLIENT_KEY_FILE);
        let cert_path = home.join(CLIENT_CERT_FILE);
        write_file(&key_path, &key.private_key_to_pem_pkcs8()?, 0o600)?;
        write_file(&cert_path, &cert.to_pem()?, 0o644)?;
        tracing::info!(path = %cert_path.display(), "issued manager client certificate");
        Ok((key, cert))
    }

    fn load_client(&self, home: &Path) -> Result<Option<(PKey<Private>, X509)>, CaError> {
        let key_path = home.join(CLIENT_KEY_FILE);
        let cert_path = home.join(CLIENT_CERT_FILE);
        let Some(cert) = read_optional(&cert_path)? else {
            return Ok(None);
        };
        let cert = X509::from_pem(&cert).map_err(|source| CaError::BadFile {
            path: cert_path.clone(),
            what: "certificate",
            source,
        })?;
        let key = match load_private_key(&key_path) {
            Err(CaError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None);
            }
            other => other?,
        };
        let renew_by = Asn1Time::days_from_now(CLIENT_RENEW_DAYS)?;
        let public = cert.public_key()?;
        let reason = if !key.public_eq(&public) {
            "its key does not match"
        } else if !verify_issued_by(&cert, &self.cert) {
            "it is not valid under the current CA"
        } else if cert.not_after() < renew_by {
            "it expires soon"
        } else {
            return Ok(Some((key, cert)));
        };
        tracing::info!(path = %cert_path.display(), reason, "replacing manager client certificate");
        Ok(None)
    }

    /// Issues an agent certificate for the key in `csr_pem` (untrusted bytes from the agent).
    ///
    /// The request's self-signature must verify and its key must be ECDSA P-256/P-384, Ed25519
    /// or RSA 2048 to 8192 bits. Everything else in the request (subject, extensions) is
    /// ignored: the certificate has CN = `host_name`, a subjectAltName with `host_name` as an IP
    /// address or DNS name, serverAuth + clientAuth, CA:FALSE, a random 128-bit serial
    /// ([`serial_hex`]) and one year of validity.
    pub fn sign_agent_csr(&self, csr_pem: &[u8], host_name: &str) -> Result<X509, CaError> {
        self.sign_agent_csr_for(csr_pem, host_name, &[])
    }

    /// Like [`ManagerCa::sign_agent_csr`], with the IP addresses the manager reaches the agent
    /// at added to the subjectAltName (when they are not `host_name` itself), so CA-verified
    /// calls to `https://<ip>:<port>` work whatever the host is called.
    pub fn sign_agent_csr_for(
        &self,
        csr_pem: &[u8],
        host_name: &str,
        addresses: &[IpAddr],
    ) -> Result<X509, CaError> {
        self.sign_agent_csr_with(csr_pem, host_name, addresses, &[])
    }

    /// Like [`ManagerCa::sign_agent_csr_for`], with DNS names the manager reaches the agent by
    /// (the host part of an address such as `scan-7.lan:7505`) added to the subjectAltName too;
    /// each is checked like a host name.
    pub fn sign_agent_csr_with(
        &self,
        csr_pem: &[u8],
        host_name: &str,
        addresses: &[IpAddr],
        dns_names: &[&str],
    ) -> Result<X509, CaError> {
        let mut san = host_san(host_name)?;
        for address in addresses {
            if host_name.parse::<IpAddr>().ok() != Some(*address) {
                san.ip(&address.to_string());
            }
        }
        for name in dns_names {
            if !name.eq_ignore_ascii_case(host_name) {
                check_host_name(name)?;
                san.dns(name);
            }
        }
        let public = checked_csr_key(csr_pem)?;
        let subject = name_with_cn(host_name)?;
        let mut builder = new_builder(&subject, self.cert.subject_name(), &public, AGENT_DAYS)?;
        builder.append_extension(BasicConstraints::new().critical().build()?)?;
        let mut usage = KeyUsage::new();
        usage.critical().digital_signature();
        if public.id() == Id::RSA {
            usage.key_encipherment();
        }
        builder.append_extension(usage.build()?)?;
        // serverAuth only: an agent's certificate must not work as a client of another agent.
        builder.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
        let san = san.build(&builder.x509v3_context(Some(&self.cert), None))?;
        builder.append_extension(san)?;
        self.append_key_ids(&mut builder)?;
        builder.sign(&self.key, MessageDigest::sha256())?;
        Ok(builder.build())
    }

    fn append_key_ids(&self, builder: &mut X509Builder) -> Result<(), ErrorStack> {
        let ski =
            SubjectKeyIdentifier::new().build(&builder.x509v3_context(Some(&self.cert), None))?;
        builder.append_extension(ski)?;
        let aki = AuthorityKeyIdentifier::new()
            .keyid(true)
            .build(&builder.x509v3_context(Some(&self.cert), None))?;
        builder.append_extension(aki)
    }
}

/// Parses an untrusted certificate request and returns its key once the request is acceptable.
fn checked_csr_key(csr_pem: &[u8]) -> Result<PKey<openssl::pkey::Public>, CaError> {
    let refuse = |reason: &str| CaError::BadCsr {
        reason: reason.to_owned(),
    };
    if csr_pem.len() > MAX_CSR_BYTES {
        return Err(refuse("it is larger than 64 KiB"));
    }
    let csr =
        X509Req::from_pem(csr_pem).map_err(|_| refuse("it is not a PEM certificate request"))?;
    let public = csr
        .public_key()
        .map_err(|_| refuse("its public key cannot be read"))?;
    if !csr.verify(&public).unwrap_or(false) {
        return Err(refuse(
            "its signature does not match its public key (damaged or altered on the way)",
        ));
    }
    let accepted = match public.id() {
        Id::EC => public.ec_key().ok().is_some_and(|ec| {
            matches!(
                ec.group().curve_name(),
                Some(Nid::X9_62_PRIME256V1 | Nid::SECP384R1)
            )
        }),
        Id::ED25519 => true,
        Id::RSA => (2048..=8192).contains(&public.bits()),
        _ => false,
    };
    if !accepted {
        return Err(refuse(
            "its key type is not accepted (use ECDSA P-256, as `pm-agent init` does)",
        ));
    }
    Ok(public)
}

/// Helpers for the agent's own keys.
pub struct AgentIdentity;

impl AgentIdentity {
    /// A new ECDSA P-256 key and a self-signed certificate for it (CN = `common_name`,
    /// serverAuth, 10 years), for the agent's TLS server before activation. When the common
    /// name is a host name or IP address it is also the subjectAltName.
    pub fn generate(common_name: &str) -> Result<(PKey<Private>, X509), CaError> {
        let key = generate_p256()?;
        let cert = Self::self_signed(&key, common_name)?;
        Ok((key, cert))
    }

    /// A self-signed certificate as [`AgentIdentity::generate`] makes, for an existing key
    /// (an agent whose key a certificate re-issue replaced).
    pub fn self_signed(key: &PKeyRef<Private>, common_name: &str) -> Result<X509, CaError> {
        let name = name_with_cn(common_name)?;
        let mut builder = new_builder(&name, &name, key, SELF_SIGNED_DAYS)?;
        builder.append_extension(BasicConstraints::new().critical().build()?)?;
        builder.append_extension(KeyUsage::new().critical().digital_signature().build()?)?;
        builder.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
        if let Ok(san) = host_san(common_name) {
            let san = san.build(&builder.x509v3_context(None, None))?;
            builder.append_extension(san)?;
        }
        let ski = SubjectKeyIdentifier::new().build(&builder.x509v3_context(None, None))?;
        builder.append_extension(ski)?;
        builder.sign(key, digest_for(key))?;
        Ok(builder.build())
    }
}

/// A certificate request in PEM form for `key` with subject CN = `common_name`.
pub fn make_csr(key: &PKeyRef<Private>, common_name: &str) -> Result<Vec<u8>, CaError> {
    let mut builder = X509Req::builder()?;
    builder.set_version(0)?;
    let subject = name_with_cn(common_name)?;
    builder.set_subject_name(&subject)?;
    builder.set_pubkey(key)?;
    builder.sign(key, digest_for(key))?;
    Ok(builder.build().to_pem()?)
}

/// `sha256:<hex>` of the certificate's DER encoding (what `openssl x509 -fingerprint -sha256`
/// prints, in lowercase without colons).
pub fn cert_fingerprint(cert: &X509Ref) -> Result<String, CaError> {
    Ok(format!(
        "sha256:{}",
        crate::manifest::hex(&openssl::sha::sha256(&cert.to_der()?))
    ))
}

/// The certificate's serial number in lowercase hex (how revoked serials are recorded).
pub fn serial_hex(cert: &X509Ref) -> Result<String, CaError> {
    Ok(cert
        .serial_number()
        .to_bn()?
        .to_hex_str()?
        .to_ascii_lowercase())
}

/// Whether `cert` is signed by `ca`, and both are within their validity period now.
pub fn verify_issued_by(cert: &X509Ref, ca: &X509Ref) -> bool {
    let verify = || -> Result<bool, ErrorStack> {
        let mut store = X509StoreBuilder::new()?;
        store.add_cert(ca.to_owned())?;
        // `ca` is the trust anchor even when it is not self-signed.
        store.set_flags(X509VerifyFlags::PARTIAL_CHAIN)?;
        let store = store.build();
        let chain = Stack::new()?;
        let mut context = X509StoreContext::new()?;
        context.init(&store, cert, &chain, |context| context.verify_cert())
    };
    verify().unwrap_or(false)
}

/// Why a certificate does not verify under a CA, told apart so that a clock can be named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssueProblem {
    /// Not signed by the CA (another manager's, self-signed, damaged).
    NotIssued,
    /// Signed by the CA, but its validity starts after `now` (the reader's clock is behind the
    /// issuer's, or the issuer's was ahead).
    NotYetValid {
        /// Start of its validity.
        not_before: DateTime<Utc>,
        /// The clock it was checked against.
        now: DateTime<Utc>,
    },
    /// Signed by the CA, but its validity ended before `now`.
    Expired {
        /// End of its validity.
        not_after: DateTime<Utc>,
        /// The clock it was checked against.
        now: DateTime<Utc>,
    },
}

/// Whether `cert` is signed by `ca` and valid by this machine's clock; when it is signed but
/// out of its validity, says which end and both times (a chain check that ignores time, then
/// the dates).
pub fn check_issued_by(cert: &X509Ref, ca: &X509Ref) -> Result<(), IssueProblem> {
    if verify_issued_by(cert, ca) {
        return Ok(());
    }
    let signed = || -> Result<bool, ErrorStack> {
        let mut store = X509StoreBuilder::new()?;
        store.add_cert(ca.to_owned())?;
        store.set_flags(X509VerifyFlags::PARTIAL_CHAIN | X509VerifyFlags::NO_CHECK_TIME)?;
        let store = store.build();
        let chain = Stack::new()?;
        let mut context = X509StoreContext::new()?;
        context.init(&store, cert, &chain, |context| context.verify_cert())
    };
    if !signed().unwrap_or(false) {
        return Err(IssueProblem::NotIssued);
    }
    let now = Utc::now();
    let (not_before, not_after) = validity(cert);
    if not_before > now {
        Err(IssueProblem::NotYetValid { not_before, now })
    } else if not_after < now {
        Err(IssueProblem::Expired { not_after, now })
    } else {
        // The CA itself is out of its validity (10 years): name its end.
        let (ca_not_before, ca_not_after) = validity(ca);
        if ca_not_before > now {
            Err(IssueProblem::NotYetValid {
                not_before: ca_not_before,
                now,
            })
        } else {
            Err(IssueProblem::Expired {
                not_after: ca_not_after,
                now,
            })
        }
    }
}

/// Start and end of a certificate's validity.
pub fn validity(cert: &X509Ref) -> (DateTime<Utc>, DateTime<Utc>) {
    (asn1_time(cert.not_before()), asn1_time(cert.not_after()))
}

/// An ASN.1 time as UTC (the Unix epoch if OpenSSL cannot compare it, which it always can).
fn asn1_time(time: &openssl::asn1::Asn1TimeRef) -> DateTime<Utc> {
    let seconds = Asn1Time::from_unix(0)
        .and_then(|epoch| epoch.diff(time))
        .map(|diff| i64::from(diff.days) * 86_400 + i64::from(diff.secs))
        .unwrap_or_default();
    DateTime::from_timestamp(seconds, 0).unwrap_or_default()
}

/// Whether the certificate's subjectAltName names `host` (an IP address or a DNS name,
/// without port): what a client connecting to `https://host:port` checks.
pub fn names_host(cert: &X509Ref, host: &str) -> bool {
    let Some(names) = cert.subject_alt_names() else {
        return false;
    };
    let ip = host.parse::<IpAddr>().ok();
    names.iter().any(|name| match ip {
        Some(IpAddr::V4(v4)) => name.ipaddress() == Some(&v4.octets()[..]),
        Some(IpAddr::V6(v6)) => name.ipaddress() == Some(&v6.octets()[..]),
        None => name.dnsname().is_some_and(|d| d.eq_ignore_ascii_case(host)),
    })
}

/// The subject's common name (the host name the manager chose), if it has one.
pub fn common_name(cert: &X509Ref) -> Option<String> {
    cert.subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .next()
        .and_then(|entry| entry.data().to_string().ok())
}

/// Checks that `name` can name a host in a certificate: an IP address, or a DNS name of
/// labels of letters, digits, `-` and `_` (not starting or ending with `-`), at most 64 bytes.
pub fn check_host_name(name: &str) -> Result<(), CaError> {
    host_san(name).map(|_| ())
}

/// Reads a private key in PEM form, refusing a file readable by group or others.
pub fn load_private_key(path: &Path) -> Result<PKey<Private>, CaError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let io = |action| {
        move |source| CaError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    };
    let mut file = File::open(path).map_err(io("read"))?;
    let mode = file.metadata().map_err(io("read"))?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(CaError::LoosePermissions {
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    let mut pem = Vec::new();
    file.read_to_end(&mut pem).map_err(io("read"))?;
    PKey::private_key_from_pem(&pem).map_err(|source| CaError::BadFile {
        path: path.to_owned(),
        what: "private key",
        source,
    })
}

/// Reads a certificate in PEM form.
pub fn load_certificate(path: &Path) -> Result<X509, CaError> {
    let pem = std::fs::read(path).map_err(|source| CaError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })?;
    X509::from_pem(&pem).map_err(|source| CaError::BadFile {
        path: path.to_owned(),
        what: "certificate",
        source,
    })
}

/// The subjectAltName for a host name: an IP address, or a DNS name checked character by
/// character (the name ends up in certificates other programs parse).
fn host_san(host: &str) -> Result<SubjectAlternativeName, CaError> {
    let bad = |reason| CaError::BadHostName {
        name: host.to_owned(),
        reason,
    };
    let mut san = SubjectAlternativeName::new();
    if host.parse::<IpAddr>().is_ok() {
        san.ip(host);
        return Ok(san);
    }
    if host.is_empty() {
        return Err(bad("it is empty"));
    }
    if host.len() > MAX_COMMON_NAME {
        return Err(bad("it is longer than 64 characters"));
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Err(bad("it has an empty label"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad("it may hold only letters, digits, `-`, `_` and dots"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label starts or ends with `-`"));
        }
    }
    san.dns(host);
    Ok(san)
}

fn name_with_cn(common_name: &str) -> Result<X509Name, CaError> {
    if common_name.is_empty() || common_name.len() > MAX_COMMON_NAME {
        return Err(CaError::BadCommonName(common_name.to_owned()));
    }
    let mut name = X509Name::builder()?;
    name.append_entry_by_nid(Nid::COMMONNAME, common_name)?;
    Ok(name.build())
}

/// A v3 certificate builder with a random serial and validity from an hour ago (clock skew)
/// until `days` from now.
fn new_builder<T: HasPublic>(
    subject: &X509NameRef,
    issuer: &X509NameRef,
    key: &PKeyRef<T>,
    days: u32,
) -> Result<X509Builder, ErrorStack> {
    let mut builder = X509::builder()?;
    builder.set_version(2)?;
    let mut serial = BigNum::new()?;
    // Top bit set: exactly 128 bits, so every serial prints as 32 hex digits.
    serial.rand(128, MsbOption::ONE, false)?;
    let serial = Asn1Integer::from_bn(&serial)?;
    builder.set_serial_number(&serial)?;
    builder.set_subject_name(subject)?;
    builder.set_issuer_name(issuer)?;
    builder.set_pubkey(key)?;
    let not_before = chrono::Utc::now() - chrono::Duration::hours(1);
    let not_before = Asn1Time::from_str_x509(&not_before.format("%Y%m%d%H%M%SZ").to_string())?;
    builder.set_not_before(&not_before)?;
    let not_after = Asn1Time::days_from_now(days)?;
    builder.set_not_after(&not_after)?;
    Ok(builder)
}

/// A new ECDSA P-256 key, the kind agents hold (for a certificate re-issue).
pub fn new_key() -> Result<PKey<Private>, CaError> {
    Ok(generate_p256()?)
}

fn generate_p256() -> Result<PKey<Private>, ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    PKey::from_ec_key(EcKey::generate(&group)?)
}

/// Ed25519/Ed448 sign without a separate digest; everything else with SHA-256.
fn digest_for<T>(key: &PKeyRef<T>) -> MessageDigest {
    match key.id() {
        Id::ED25519 | Id::ED448 => MessageDigest::null(),
        _ => MessageDigest::sha256(),
    }
}

/// Serialises creation in `home/pki/` across processes; creates `pki/` (0700) if needed.
fn lock_pki(home: &Path) -> Result<File, CaError> {
    let pki = home.join("pki");
    durable::create_private_dir(&pki, 0o700).map_err(|source| CaError::Io {
        action: "create directory",
        path: pki.clone(),
        source,
    })?;
    let path = home.join(LOCK_FILE);
    let io = |action| {
        let path = path.clone();
        move |source| CaError::Io {
            action,
            path,
            source,
        }
    };
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io("open lock file"))?;
    file.lock().map_err(io("lock"))?;
    Ok(file)
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, CaError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CaError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        }),
    }
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    durable::write_atomic(path, contents, mode).map_err(|source| CaError::Io {
        action: "write",
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::x509::X509ExtendedKeyUsage;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Runs `openssl verify` on `cert` against `ca`; true when it prints OK.
    fn openssl_verify(dir: &Path, ca: &X509, cert: &X509, extra: &[&str]) -> bool {
        let ca_path = dir.join("verify-ca.pem");
        let cert_path = dir.join("verify-cert.pem");
        std::fs::write(&ca_path, ca.to_pem().unwrap()).unwrap();
        std::fs::write(&cert_path, cert.to_pem().unwrap()).unwrap();
        let output = Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(&ca_path)
            .args(extra)
            .arg(&cert_path)
            .output()
            .expect("the `openssl` command line tool is needed by this test");
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains(": OK")
    }

    fn common_name(cert: &X509Ref) -> String {
        let entry = cert
            .subject_name()
            .entries_by_nid(Nid::COMMONNAME)
            .next()
            .unwrap();
        entry.data().to_string().unwrap()
    }

    #[test]
    fn the_ca_is_created_private_and_reloaded_identical() {
        let home = tempfile::tempdir().unwrap();
        let ca = ManagerCa::load_or_create(home.path()).unwrap();
        assert_eq!(mode(&home.path().join("pki")), 0o700);
        assert_eq!(mode(&home.path().join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode(&home.path().join(CA_CERT_FILE)), 0o644);
        let cert = ca.certificate();
        assert!(common_name(cert).starts_with("pm manager CA "));
        assert!(verify_issued_by(cert, cert), "self-signed and valid now");
        assert!(
            cert.key_usage()
                .unwrap()
                .contains(openssl::x509::X509KeyUsage::KEY_CERT_SIGN)
        );
        assert_eq!(cert.pathlen(), Some(0));
        assert!(cert.not_after() > Asn1Time::days_from_now(3649).unwrap());

        let again = ManagerCa::load_or_create(home.path()).unwrap();
        assert_eq!(
            again.certificate().to_der().unwrap(),
            cert.to_der().unwrap()
        );
        assert_eq!(
            again.key.private_key_to_der().unwrap(),
            ca.key.private_key_to_der().unwrap()
        );
        assert_eq!(
            again.certificate_pem().unwrap(),
            std::fs::read(home.path().join(CA_CERT_FILE)).unwrap()
        );
    }

    #[test]
    fn a_world_readable_ca_key_is_refused() {
        let home = tempfile::tempdir().unwrap();
        ManagerCa::load_or_create(home.path()).unwrap();
        let path = home.path().join(CA_KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = ManagerCa::load_or_create(home.path()).err().unwrap();
        assert!(
            matches!(err, CaError::LoosePermissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("ca.key"), "{err}");
    }

    #[test]
    fn a_lost_ca_key_is_reported_rather_than_replaced() {
        let home = tempfile::tempdir().unwrap();
        let ca = ManagerCa::load_or_create(home.path()).unwrap();
        std::fs::remove_file(home.path().join(CA_KEY_FILE)).unwrap();
        let err = ManagerCa::load_or_create(home.path()).err().unwrap();
        assert!(matches!(err, CaError::MissingCaKey { .. }), "{err}");
        let pem = std::fs::read(home.path().join(CA_CERT_FILE)).unwrap();
        assert_eq!(
            pem,
            ca.certificate_pem().unwrap(),
            "the CA certificate is kept"
        );
    }

    #[test]
    fn an_agent_csr_is_signed_with_the_manager_chosen_names() {
        let home = tempfile::tempdir().unwrap();
        let ca = ManagerCa::load_or_create(home.path()).unwrap();
        let (agent_key, self_signed) = AgentIdentity::generate("agent-one").unwrap();
        assert!(self_signed.verify(&agent_key).unwrap());
        // The request asks for another name: the manager's host name wins.
        let csr = make_csr(&agent_key, "whatever-the-agent-says").unwrap();

        let cert = ca.sign_agent_csr(&csr, "agent-one.example").unwrap();
        assert!(verify_issued_by(&cert, ca.certificate()));
        assert!(agent_key.public_eq(&cert.public_key().unwrap()));
        assert_eq!(common_name(&cert), "agent-one.example");
        let sans = cert.subject_alt_names().unwrap();
        assert_eq!(sans.len(), 1);
        assert_eq!(sans.get(0).unwrap().dnsname(), Some("agent-one.example"));
        let eku = cert.extended_key_usage().unwrap();
        assert!(eku.contains(X509ExtendedKeyUsage::SSL_SERVER));
        assert!(!eku.contains(X509ExtendedKeyUsage::SSL_CLIENT));
        assert!(cert.pathlen().is_none());
        assert!(
            !verify_issued_by(ca.certificate(), &cert),
            "the agent cannot issue"
        );
        let dir = home.path();
        assert!(openssl_verify(
            dir,
            ca.certificate(),
            &cert,
            &["-purpose", "sslserver"]
        ));
        // Not a client: an agent's certificate must not open a session to another agent.
        assert!(!openssl_verify(
            dir,
            ca.certificate(),
            &cert,
            &["-purpose", "sslclient"]
        ));
        assert!(openssl_verify(
            dir,
            ca.certificate(),
            &cert,
            &["-verify_hostname", "agent-one.example"]
        ));
        assert!(!openssl_verify(
            dir,
            ca.certificate(),
            &cert,
            &["-verify_hostname", "agent-two.example"]
        ));

        let by_ip = ca.sign_agent_csr(&csr, "127.0.0.7").unwrap();
        let sans = by_ip.subject_alt_names().unwrap();
        assert_eq!(sans.get(0).unwrap().ipaddress(), Some(&[127, 0, 0, 7][..]));
        assert!(openssl_verify(
            dir,
            ca.certificate(),
            &by_ip,
            &["-verify_ip", "127.0.0.7"]
        ));

        let serial = serial_hex(&cert).unwrap();
        assert_eq!(serial.len(), 32, "{serial}");
        assert!(
            serial
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(serial, serial_hex(&by_ip).unwrap());
    }

    #[test]
    fn a_cert_from_another_ca_does_not_verify() {
        let ours = tempfile::tempdir().unwrap();
        let theirs = tempfile::tempdir().unwrap();
        let our_ca = ManagerCa::load_or_create(ours.path()).unwrap();
        let their_ca = ManagerCa::load_or_create(theirs.path()).unwrap();
        let (key, self_signed) = AgentIdentity::generate("agent-one").unwrap();
        let cert = their_ca
            .sign_agent_csr(&make_csr(&key, "agent-one").unwrap(), "agent-one")
            .unwrap();
        assert!(verify_issued_by(&cert, their_ca.certificate()));
        assert!(!verify_issued_by(&cert, our_ca.certificate()));
        assert!(!verify_issued_by(&self_signed, our_ca.certificate()));
        assert!(!openssl_verify(
            ours.path(),
            our_ca.certificate(),
            &cert,
            &[]
        ));
    }

    #[test]
    fn a_csr_with_a_broken_signature_is_refused() {
        let home = tempfile::tempdir().unwrap();
        let ca = ManagerCa::load_or_create(home.path()).unwrap();
        let (key, _) = AgentIdentity::generate("agent-one").unwrap();
        let csr = X509Req::from_pem(&make_csr(&key, "agent-one").unwrap()).unwrap();
        let mut der = csr.to_der().unwrap();
        let at = der.windows(9).position(|w| w == b"agent-one").unwrap();
        der[at..at + 9].copy_from_slice(b"agent-two");
        let altered = X509Req::from_der(&der).unwrap().to_pem().unwrap();

        let err = ca.sign_agent_csr(&altered, "agent-two").err().unwrap();
        assert!(matches!(err, CaError::BadCsr { .. }), "{err}");
        assert!(err.to_string().contains("signature"), "{err}");
        for junk in [&b""[..], b"not a csr", &[0xff; 100_000][..]] {
            let err = ca.sign_agent_csr(junk, "agent-one").err().unwrap();
            assert!(matches!(err, CaError::BadCsr { .. }), "{err}");
        }
        let truncated = &make_csr(&key, "agent-one").unwrap()[..200];
        assert!(ca.sign_agent_csr(truncated, "agent-one").is_err());
    }

    #[test]
    fn host_names_that_cannot_be_certificate_names_are_refused() {
        let home = tempfile::tempdir().unwrap();
        let ca = ManagerCa::load_or_create(home.path()).unwrap();
        let (key, _) = AgentIdentity::generate("agent").unwrap();
        let csr = make_csr(&key, "agent").unwrap();
        let long = "a".repeat(65);
        for name in [
            "",
            "a b",
            "host:7505",
            "[::1]",
            "-x.example",
            "a..b",
            "a,IP:1.2.3.4",
            &long,
        ] {
            let err = ca.sign_agent_csr(&csr, name).err().unwrap();
            assert!(matches!(err, CaError::BadHostName { .. }), "{name}: {err}");
        }
        assert!(ca.sign_agent_csr(&csr, "::1").is_ok());
        assert!(ca.sign_agent_csr(&csr, "scan_host-7.lan").is_ok());
    }

    #[test]
    fn the_client_cert_has_client_auth_and_chains_to_the_ca() {
        let home = tempfile::tempdir().unwrap();
        let ca = ManagerCa::load_or_create(home.path()).unwrap();
        let (key, cert) = ca.client_identity(home.path()).unwrap();
        assert_eq!(mode(&home.path().join(CLIENT_KEY_FILE)), 0o600);
        assert!(key.public_eq(&cert.public_key().unwrap()));
        assert!(verify_issued_by(&cert, ca.certificate()));
        assert_eq!(
            cert.extended_key_usage(),
            Some(X509ExtendedKeyUsage::SSL_CLIENT)
        );
        let dir = home.path();
        assert!(openssl_verify(
            dir,
            ca.certificate(),
            &cert,
            &["-purpose", "sslclient"]
        ));
        assert!(!openssl_verify(
            dir,
            ca.certificate(),
            &cert,
            &["-purpose", "sslserver"]
        ));

        let (_, again) = ca.client_identity(home.path()).unwrap();
        assert_eq!(
            again.to_der().unwrap(),
            cert.to_der().unwrap(),
            "reused, not reissued"
        );

        // A new CA (the old files removed) issues a new client certificate.
        std::fs::remove_file(home.path().join(CA_CERT_FILE)).unwrap();
        let new_ca = ManagerCa::load_or_create(home.path()).unwrap();
        let (_, renewed) = new_ca.client_identity(home.path()).unwrap();
        assert!(verify_issued_by(&renewed, new_ca.certificate()));
        assert!(!verify_issued_by(&cert, new_ca.certificate()));
    }

    #[test]
    fn fingerprints_are_stable() {
        let home = tempfile::tempdir().unwrap();
        let ca = ManagerCa::load_or_create(home.path()).unwrap();
        let fingerprint = cert_fingerprint(ca.certificate()).unwrap();
        assert!(fingerprint.starts_with("sha256:"));
        assert_eq!(fingerprint.len(), "sha256:".len() + 64);
        let reloaded = load_certificate(&home.path().join(CA_CERT_FILE)).unwrap();
        assert_eq!(cert_fingerprint(&reloaded).unwrap(), fingerprint);
        let again = ManagerCa::load_or_create(home.path()).unwrap();
        assert_eq!(cert_fingerprint(again.certificate()).unwrap(), fingerprint);

        let output = Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(home.path().join(CA_CERT_FILE))
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&output.stdout);
        let hex: String = printed
            .trim()
            .rsplit('=')
            .next()
            .unwrap()
            .replace(':', "")
            .to_ascii_lowercase();
        assert_eq!(format!("sha256:{hex}"), fingerprint);

        let (_, other) = AgentIdentity::generate("agent-one").unwrap();
        assert_ne!(cert_fingerprint(&other).unwrap(), fingerprint);
    }
}
