//! TLS for the agent API (`pm-agent`, HTTPS on port 7505) and the manager's client to it, on the
//! system OpenSSL.
//!
//! Server: [`TlsListener`] is an [`axum::serve::Listener`] that accepts TCP connections and runs
//! the TLS handshakes concurrently, each with a deadline ([`HANDSHAKE_TIMEOUT`]); a failed or
//! slow handshake is logged at debug and dropped, and never stops the listener. Client
//! certificates are not asked for, optional, or required ([`ClientAuth`]). The server's key,
//! certificate and trusted CA can be replaced while it runs through a [`TlsHandle`] (an agent
//! gets a CA-signed certificate and the manager CA at activation); new connections use the new
//! settings, open ones keep theirs.
//!
//! Handlers learn who is on the other end through [`TlsConnectInfo`]: serve with
//! `router.into_make_service_with_connect_info::<TlsConnectInfo>()` and extract
//! `ConnectInfo<TlsConnectInfo>`. It carries the client certificate's fingerprint, common name
//! and serial ([`PeerCertificate`]) and the fingerprint of the certificate this server presented
//! on that connection, which the activation protocol binds its proof to.
//!
//! Client: [`client`] builds a `reqwest::Client` that trusts exactly one CA, or exactly one
//! server certificate by fingerprint (trust on first use, then pin: [`fetch_server_certificate`]
//! learns it without sending anything), optionally with a client certificate. A pin is checked
//! on every new connection right after the handshake, before a single byte of HTTP is written,
//! so a request carrying a secret never reaches a server with another certificate.
//!
//! Fingerprints are `sha256:<64 lowercase hex digits>` over the certificate's DER encoding
//! ([`fingerprint`]).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use hyper_util::client::legacy::connect::Connection;
use openssl::hash::{MessageDigest, hash};
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{Ssl, SslAcceptor, SslConnector, SslMethod, SslRef, SslVerifyMode};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509, X509Ref, X509VerifyResult};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_openssl::SslStream;

/// The port `pm-agent` serves its HTTPS API on unless configured otherwise.
pub const DEFAULT_AGENT_PORT: u16 = 7505;

/// How long a client may take to complete the TLS handshake before the server drops it.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many handshakes run at once; further TCP connections wait in the kernel's
/// backlog until one finishes, so a flood of silent clients cannot exhaust memory.
const MAX_PENDING_HANDSHAKES: usize = 512;

/// How the server treats client certificates.
#[derive(Clone, Debug)]
pub enum ClientAuth {
    /// Do not ask for a client certificate; handlers see `peer: None`.
    None,
    /// Ask for a client certificate and verify it against `ca` if one is presented (a
    /// certificate that does not verify fails the handshake), but let clients without one in.
    /// For an agent around activation: the manager has no certificate of its own yet.
    Optional {
        /// The only CA whose client certificates are accepted.
        ca: X509,
    },
    /// Require a client certificate that verifies against `ca`; anything else fails the
    /// handshake. For an activated agent: every call is mutual TLS.
    Required {
        /// The only CA whose client certificates are accepted.
        ca: X509,
    },
}

/// Everything the server's TLS needs: its own key and certificate, and the client
/// certificate policy.
#[derive(Clone, Debug)]
pub struct TlsServerConfig {
    /// The server's private key; must match `cert`.
    pub key: PKey<Private>,
    /// The server's certificate (self-signed before activation, CA-signed after).
    pub cert: X509,
    /// Whether and how client certificates are checked.
    pub client_auth: ClientAuth,
}

/// The acceptor in use and the fingerprint of the certificate it presents.
struct Current {
    acceptor: SslAcceptor,
    fingerprint: String,
}

/// Replaces the TLS settings of a running [`TlsListener`]. Cheap to clone.
#[derive(Clone)]
pub struct TlsHandle {
    current: Arc<RwLock<Arc<Current>>>,
}

impl TlsHandle {
    /// Switches to `config` for every connection accepted from now on; connections already
    /// established keep the identity they were made with. On error nothing changes.
    pub fn reload(&self, config: &TlsServerConfig) -> Result<()> {
        let next = Arc::new(build_current(config)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = next;
        Ok(())
    }

    /// The fingerprint of the certificate new connections are presented with.
    pub fn fingerprint(&self) -> String {
        self.get().fingerprint.clone()
    }

    fn get(&self) -> Arc<Current> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }
}

impl std::fmt::Debug for TlsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsHandle")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

/// Builds the OpenSSL acceptor for `config`: Mozilla's intermediate profile (TLS 1.2 and 1.3).
fn build_current(config: &TlsServerConfig) -> Result<Current> {
    let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
        .context("cannot set up OpenSSL for the TLS server")?;
    builder
        .set_private_key(&config.key)
        .context("the server's private key is not usable by OpenSSL")?;
    builder
        .set_certificate(&config.cert)
        .context("the server's certificate is not usable by OpenSSL")?;
    builder
        .check_private_key()
        .map_err(|_| anyhow!("the server's private key does not belong to its certificate"))?;
    // Session resumption with client certificates needs a session id context, else OpenSSL
    // fails resumed handshakes.
    builder
        .set_session_id_context(b"pm-agent")
        .context("cannot set the TLS session id context")?;
    match &config.client_auth {
        ClientAuth::None => builder.set_verify(SslVerifyMode::NONE),
        ClientAuth::Optional { ca } | ClientAuth::Required { ca } => {
            let mut store =
                X509StoreBuilder::new().context("cannot create the client CA trust store")?;
            store
                .add_cert(ca.clone())
                .context("cannot add the client CA to the trust store")?;
            builder
                .set_verify_cert_store(store.build())
                .context("cannot set the client CA trust store")?;
            builder
                .add_client_ca(ca)
                .context("cannot announce the client CA")?;
            if matches!(config.client_auth, ClientAuth::Required { .. }) {
                // A certificate from the CA that fails only on time gets through the handshake
                // (marked `outside_validity`, never `verified`), so the agent can answer which
                // clock is wrong instead of a bare "bad certificate" alert.
                builder.set_verify_callback(
                    SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
                    |ok, context| ok || is_clock_error(context.error()),
                );
            } else {
                builder.set_verify(SslVerifyMode::PEER);
            }
        }
    }
    Ok(Current {
        acceptor: builder.build(),
        fingerprint: fingerprint(&config.cert),
    })
}

/// A TLS listener for `axum::serve`: accepts TCP connections, completes their handshakes
/// concurrently, and yields only connections whose handshake succeeded.
pub struct TlsListener {
    tcp: TcpListener,
    handle: TlsHandle,
    handshake_timeout: Duration,
    handshakes: JoinSet<Option<(SslStream<TcpStream>, SocketAddr)>>,
}

impl TlsListener {
    /// Serves TLS on an already bound TCP listener.
    pub fn new(tcp: TcpListener, config: &TlsServerConfig) -> Result<TlsListener> {
        let current = build_current(config)?;
        Ok(TlsListener {
            tcp,
            handle: TlsHandle {
                current: Arc::new(RwLock::new(Arc::new(current))),
            },
            handshake_timeout: HANDSHAKE_TIMEOUT,
            handshakes: JoinSet::new(),
        })
    }

    /// Binds `addr` (port 0 picks a free port) and serves TLS on it.
    pub async fn bind(addr: SocketAddr, config: &TlsServerConfig) -> Result<TlsListener> {
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        TlsListener::new(tcp, config)
    }

    /// Changes how long a client may take to complete its handshake (default
    /// [`HANDSHAKE_TIMEOUT`]).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> TlsListener {
        self.handshake_timeout = timeout;
        self
    }

    /// A handle that replaces the TLS settings while the listener serves.
    pub fn handle(&self) -> TlsHandle {
        self.handle.clone()
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("local_addr", &self.tcp.local_addr().ok())
            .field("handle", &self.handle)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("pending_handshakes", &self.handshakes.len())
            .finish()
    }
}

impl Listener for TlsListener {
    type Io = SslStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // Both branches are cancel-safe: axum drops this future on shutdown, and the pending
        // handshakes live on in `self.handshakes`.
        loop {
            tokio::select! {
                accepted = self.tcp.accept(), if self.handshakes.len() < MAX_PENDING_HANDSHAKES => {
                    match accepted {
                        Ok((tcp, remote)) => {
                            let current = self.handle.get();
                            self.handshakes.spawn(handshake(current, tcp, remote, self.handshake_timeout));
                        }
                        Err(error) => accept_failed(error).await,
                    }
                }
                Some(joined) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    match joined {
                        Ok(Some(connection)) => return connection,
                        Ok(None) => {}
                        Err(error) => tracing::debug!(%error, "TLS handshake task ended abnormally"),
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// Runs one server handshake within `timeout`; `None` (logged at debug) when it fails.
async fn handshake(
    current: Arc<Current>,
    tcp: TcpStream,
    remote: SocketAddr,
    timeout: Duration,
) -> Option<(SslStream<TcpStream>, SocketAddr)> {
    let _ = tcp.set_nodelay(true);
    let ssl = match Ssl::new(current.acceptor.context()) {
        Ok(ssl) => ssl,
        Err(error) => {
            tracing::debug!(%remote, %error, "cannot start a TLS session");
            return None;
        }
    };
    let mut stream = match SslStream::new(ssl, tcp) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::debug!(%remote, %error, "cannot start a TLS session");
            return None;
        }
    };
    match tokio::time::timeout(timeout, Pin::new(&mut stream).accept()).await {
        Ok(Ok(())) => Some((stream, remote)),
        Ok(Err(error)) => {
            tracing::debug!(%remote, %error, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%remote, ?timeout, "TLS handshake timed out");
            None
        }
    }
}

/// Like axum's own TCP listener: connection-level errors are the client's problem; anything
/// else (e.g. out of file descriptors) is logged and retried after a second.
async fn accept_failed(error: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        tracing::debug!(%error, "accept failed");
        return;
    }
    tracing::error!(%error, "accept failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The client certificate of a connection, as handlers see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerCertificate {
    /// `sha256:<hex>` of the certificate's DER encoding.
    pub fingerprint: String,
    /// The subject's common name, if it has one (agents and the manager put their name there).
    pub subject_cn: Option<String>,
    /// The serial number in lowercase hex.
    pub serial_hex: String,
    /// Whether OpenSSL verified it against the configured CA. Always true in practice, since
    /// a certificate that does not verify fails the handshake; handlers should still check.
    pub verified: bool,
    /// Whether it may serve TLS (extended key usage serverAuth): every agent's certificate
    /// does, the manager's client certificate does not.
    pub server_auth: bool,
    /// Not verified only because it is outside its validity by this machine's clock (expired
    /// or not yet valid): [`ClientAuth::Required`] lets such a handshake through so that the
    /// handler can refuse it naming the clocks, never serve it.
    pub outside_validity: bool,
    /// Start of its validity.
    pub not_before: chrono::DateTime<chrono::Utc>,
    /// End of its validity.
    pub not_after: chrono::DateTime<chrono::Utc>,
}

impl PeerCertificate {
    /// Describes `cert`; `verified` says whether it was verified against a trusted CA.
    pub fn new(cert: &X509Ref, verified: bool) -> PeerCertificate {
        let subject_cn = cert
            .subject_name()
            .entries_by_nid(Nid::COMMONNAME)
            .next()
            .and_then(|entry| entry.data().to_string().ok());
        let serial_hex = cert
            .serial_number()
            .to_bn()
            .and_then(|bn| bn.to_hex_str().map(|hex| hex.to_ascii_lowercase()))
            .unwrap_or_default();
        let server_auth = cert
            .extended_key_usage()
            .is_some_and(|usage| usage.contains(openssl::x509::X509ExtendedKeyUsage::SSL_SERVER));
        let (not_before, not_after) = crate::pki::ca::validity(cert);
        PeerCertificate {
            fingerprint: fingerprint(cert),
            subject_cn,
            serial_hex,
            verified,
            server_auth,
            outside_validity: false,
            not_before,
            not_after,
        }
    }
}

/// OpenSSL's `X509_V_ERR_CERT_NOT_YET_VALID` and `X509_V_ERR_CERT_HAS_EXPIRED`: the only
/// verification failures that are about the clock.
const CLOCK_ERRORS: [i32; 2] = [9, 10];

/// Whether a verification result is a clock failure only (see [`CLOCK_ERRORS`]).
fn is_clock_error(result: X509VerifyResult) -> bool {
    CLOCK_ERRORS.contains(&result.as_raw())
}

/// What a handler knows about its connection: `ConnectInfo<TlsConnectInfo>` when the router
/// is served with `into_make_service_with_connect_info::<TlsConnectInfo>()` on a
/// [`TlsListener`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TlsConnectInfo {
    /// The client's address.
    pub remote: SocketAddr,
    /// The client's certificate, if it presented one (never with [`ClientAuth::None`]).
    pub peer: Option<PeerCertificate>,
    /// The fingerprint of the certificate this server presented on this connection; the
    /// activation proof is bound to it, so a relay with another certificate cannot reuse it.
    pub local_fingerprint: String,
}

impl TlsConnectInfo {
    /// Reads the connection's certificates from an established TLS session.
    pub fn from_ssl(ssl: &SslRef, remote: SocketAddr) -> TlsConnectInfo {
        let result = ssl.verify_result();
        let verified = result == X509VerifyResult::OK;
        TlsConnectInfo {
            remote,
            peer: ssl.peer_certificate().map(|cert| PeerCertificate {
                outside_validity: is_clock_error(result),
                ..PeerCertificate::new(&cert, verified)
            }),
            local_fingerprint: ssl.certificate().map(fingerprint).unwrap_or_default(),
        }
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for TlsConnectInfo {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> TlsConnectInfo {
        TlsConnectInfo::from_ssl(stream.io().ssl(), *stream.remote_addr())
    }
}

/// `sha256:<hex>` of a certificate's DER encoding.
pub fn fingerprint(cert: &X509Ref) -> String {
    match cert.digest(MessageDigest::sha256()) {
        Ok(digest) => format!("sha256:{}", hex(&digest)),
        // Only on allocation failure inside OpenSSL; an empty string matches no pin.
        Err(_) => String::new(),
    }
}

/// `sha256:<hex>` of DER bytes (e.g. `reqwest::tls::TlsInfo::peer_certificate`).
pub fn fingerprint_der(der: &[u8]) -> String {
    match hash(MessageDigest::sha256(), der) {
        Ok(digest) => format!("sha256:{}", hex(&digest)),
        Err(_) => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, byte| {
        let _ = write!(out, "{byte:02x}");
        out
    })
}

/// Parses a pinned fingerprint: `sha256:` followed by 64 hex digits, in either case; colons
/// between bytes (as `openssl x509 -fingerprint` prints them) and a missing prefix are
/// accepted. Returns the canonical `sha256:<lowercase hex>`.
pub fn parse_fingerprint(text: &str) -> Result<String> {
    let trimmed = text.trim();
    let digits = match trimmed.split_once(':') {
        Some((algorithm, rest)) if algorithm.eq_ignore_ascii_case("sha256") => rest,
        _ => trimmed,
    };
    let digits: String = digits
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if digits.len() != 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("certificate fingerprint {text:?} is not sha256:<64 hex digits>");
    }
    Ok(format!("sha256:{digits}"))
}

/// The server certificate the last response arrived over (clients from [`client`] record it).
pub fn peer_fingerprint(response: &reqwest::Response) -> Option<String> {
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .map(fingerprint_der)
}

/// A client builder for the agent API; see [`client`]. Callers add timeouts and the like.
///
/// Trust: with `ca`, the server's chain must verify against exactly that CA (no system roots),
/// and unless a pin is also given its certificate must name the address used in the URL (an IP
/// address in the URL needs an IP subjectAltName; OpenSSL checks those). With `pin`, every new
/// connection must present exactly the certificate with that fingerprint, checked right after
/// the handshake and before any request is written; chain and name are then not checked unless
/// `ca` is also given (the pin identifies the server better than a name). One of the two is
/// required. `identity` is the client certificate presented when the server asks for one.
///
/// The client speaks HTTPS only (plain `http://` URLs fail), TLS 1.2 or newer, ignores proxy
/// settings (agents are on the local network), and records the server certificate for
/// [`peer_fingerprint`].
pub fn client_builder(
    ca: Option<&X509>,
    pin: Option<&str>,
    identity: Option<(&PKey<Private>, &X509)>,
) -> Result<reqwest::ClientBuilder> {
    let pin = pin.map(parse_fingerprint).transpose()?;
    if ca.is_none() && pin.is_none() {
        bail!(
            "refusing to build a TLS client that trusts any server: give the manager CA or the \
             server certificate's fingerprint"
        );
    }
    let mut builder = reqwest::Client::builder()
        .tls_backend_native()
        .tls_version_min(reqwest::tls::Version::TLS_1_2)
        .tls_info(true)
        .https_only(true)
        .tcp_nodelay(true)
        .no_proxy();
    let roots = match ca {
        Some(ca) => vec![
            reqwest::Certificate::from_der(&ca.to_der().context("cannot encode the CA")?)
                .context("the CA certificate is not usable")?,
        ],
        None => Vec::new(),
    };
    builder = builder.tls_certs_only(roots);
    if ca.is_none() {
        builder = builder.tls_danger_accept_invalid_certs(true);
    }
    if let Some(pin) = pin {
        builder = builder
            .tls_danger_accept_invalid_hostnames(true)
            .connector_layer(CertCheckLayer::pin(Arc::from(pin)));
    }
    if let Some((key, cert)) = identity {
        let key_pem = key
            .private_key_to_pem_pkcs8()
            .context("cannot encode the client key")?;
        let cert_pem = cert
            .to_pem()
            .context("cannot encode the client certificate")?;
        let identity = reqwest::Identity::from_pkcs8_pem(&cert_pem, &key_pem)
            .context("the client key and certificate are not usable")?;
        builder = builder.identity(identity);
    }
    Ok(builder)
}

/// A client for the agent API: trusts only `ca`, or only the server certificate whose
/// fingerprint is `pin`, or both; presents `identity` as client certificate. See
/// [`client_builder`] for the details.
///
/// First contact with an agent (trust on first use): learn its certificate with
/// [`fetch_server_certificate`], record [`fingerprint`] of it, and build the client with that
/// pin; every connection the client then makes is checked against it.
pub fn client(
    ca: Option<&X509>,
    pin: Option<&str>,
    identity: Option<(&PKey<Private>, &X509)>,
) -> Result<reqwest::Client> {
    client_builder(ca, pin, identity)?
        .build()
        .context("cannot build the TLS client")
}

/// Learns the certificate a TLS server presents, without verifying it and without sending
/// any application data: the first step of trust on first use.
pub async fn fetch_server_certificate(addr: SocketAddr, timeout: Duration) -> Result<X509> {
    let probe = async {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        let mut builder = SslConnector::builder(SslMethod::tls_client())
            .context("cannot set up OpenSSL for the TLS client")?;
        builder.set_verify(SslVerifyMode::NONE);
        builder
            .set_min_proto_version(Some(openssl::ssl::SslVersion::TLS1_2))
            .context("cannot set the minimum TLS version")?;
        let ssl = builder
            .build()
            .configure()
            .context("cannot start a TLS session")?
            .use_server_name_indication(false)
            .verify_hostname(false)
            .into_ssl("")
            .context("cannot start a TLS session")?;
        let mut stream = SslStream::new(ssl, tcp).context("cannot start a TLS session")?;
        Pin::new(&mut stream)
            .connect()
            .await
            .with_context(|| format!("TLS handshake with {addr} failed"))?;
        stream
            .ssl()
            .peer_certificate()
            .ok_or_else(|| anyhow!("{addr} presented no certificate"))
    };
    tokio::time::timeout(timeout, probe)
        .await
        .map_err(|_| anyhow!("no TLS handshake with {addr} within {timeout:?}"))?
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The server certificate did not match the pinned fingerprint.
#[derive(Debug, thiserror::Error)]
#[error(
    "the server presented certificate {actual}, not the pinned {expected}: refusing to talk to it \
     (another host at this address, or someone in between)"
)]
pub struct PinMismatch {
    /// The pinned fingerprint.
    pub expected: String,
    /// What the server presented (empty if nothing).
    pub actual: String,
}

/// The [`PinMismatch`] behind an error from a pinned client, if that is why it failed: walks
/// the error's sources, so it works on a `reqwest::Error` and on an `anyhow::Error`
/// (`pin_mismatch(error.as_ref())`).
pub fn pin_mismatch<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a PinMismatch> {
    find_cause(error)
}

/// The first `T` among `error` and its sources: why a connection check refused a server
/// ([`PinMismatch`], [`RevokedCertificate`]) behind the client's own error.
pub fn find_cause<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(cause) = error.downcast_ref::<T>() {
            return Some(cause);
        }
        current = error.source();
    }
    None
}

/// What a [`CertCheckLayer`] asks of each new connection's server certificate (DER, `None` if
/// the server presented none), and of the address connected to.
type CertCheck =
    Arc<dyn Fn(Option<SocketAddr>, Option<&[u8]>) -> Result<(), BoxError> + Send + Sync>;

/// A connector layer that checks each new connection's server certificate before any request
/// is sent on it: against a pin, or against the revoked serials.
#[derive(Clone)]
struct CertCheckLayer {
    check: CertCheck,
}

impl CertCheckLayer {
    fn pin(pin: Arc<str>) -> CertCheckLayer {
        CertCheckLayer {
            check: Arc::new(move |_, der| {
                let actual = der.map(fingerprint_der).unwrap_or_default();
                if actual != *pin {
                    return Err(Box::new(PinMismatch {
                        expected: pin.to_string(),
                        actual,
                    }) as BoxError);
                }
                Ok(())
            }),
        }
    }
}

impl<S> tower_layer::Layer<S> for CertCheckLayer {
    type Service = CertChecked<S>;

    fn layer(&self, inner: S) -> CertChecked<S> {
        CertChecked {
            inner,
            check: Arc::clone(&self.check),
        }
    }
}

#[derive(Clone)]
struct CertChecked<S> {
    inner: S,
    check: CertCheck,
}

impl<S, R> tower_service::Service<R> for CertChecked<S>
where
    S: tower_service::Service<R, Error = BoxError>,
    S::Response: Connection + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let connecting = self.inner.call(request);
        let check = Arc::clone(&self.check);
        Box::pin(async move {
            let connection = connecting.await?;
            let mut extensions = axum::http::Extensions::new();
            connection.connected().get_extras(&mut extensions);
            let der = extensions
                .get::<reqwest::tls::TlsInfo>()
                .and_then(|info| info.peer_certificate());
            let remote = extensions
                .get::<hyper_util::client::legacy::connect::HttpInfo>()
                .map(|info| info.remote_addr());
            check(remote, der)?;
            Ok(connection)
        })
    }
}

/// The server presented a certificate the manager revoked (its host was deactivated).
#[derive(Debug, thiserror::Error)]
#[error(
    "the server presented certificate serial {serial}, which was revoked when its host was \
     deactivated: refusing to talk to it (someone holds that host's old key)"
)]
pub struct RevokedCertificate {
    /// The revoked serial, lowercase hex.
    pub serial: String,
}

/// Makes `builder` refuse servers whose certificate serial (lowercase hex) is in `revoked`,
/// before any request is sent to them.
pub fn refuse_revoked(
    builder: reqwest::ClientBuilder,
    revoked: std::collections::HashSet<String>,
) -> reqwest::ClientBuilder {
    if revoked.is_empty() {
        return builder;
    }
    builder.connector_layer(CertCheckLayer {
        check: Arc::new(move |_, der| {
            let serial = der
                .and_then(|der| X509::from_der(der).ok())
                .and_then(|cert| crate::pki::ca::serial_hex(&cert).ok());
            match serial {
                Some(serial) if revoked.contains(&serial) => {
                    Err(Box::new(RevokedCertificate { serial }) as BoxError)
                }
                _ => Ok(()),
            }
        }),
    })
}

/// Makes `builder` run `check` on each new connection, with the address connected to and the
/// certificate the server presented, before any request is sent on it; its error becomes the
/// request's (find it with [`find_cause`]).
pub fn check_servers<E>(
    builder: reqwest::ClientBuilder,
    check: impl Fn(SocketAddr, &X509) -> Result<(), E> + Send + Sync + 'static,
) -> reqwest::ClientBuilder
where
    E: std::error::Error + Send + Sync + 'static,
{
    builder.connector_layer(CertCheckLayer {
        check: Arc::new(move |remote, der| {
            let cert = der.and_then(|der| X509::from_der(der).ok());
            match (remote, cert) {
                (Some(remote), Some(cert)) => {
                    check(remote, &cert).map_err(|e| Box::new(e) as BoxError)
                }
                _ => Ok(()),
            }
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::Router;
    use axum::extract::ConnectInfo;
    use axum::routing::get;
    use openssl::asn1::Asn1Time;
    use openssl::bn::{BigNum, MsbOption};
    use openssl::ec::{EcGroup, EcKey};
    use openssl::x509::X509NameBuilder;
    use openssl::x509::extension::{
        BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn new_key() -> PKey<Private> {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
    }

    /// A certificate for `cn`, signed by `issuer` (self-signed when `None`), valid for a day
    /// either side of now; `ips` become IP subjectAltNames.
    fn certificate(
        key: &PKey<Private>,
        cn: &str,
        issuer: Option<(&PKey<Private>, &X509)>,
        is_ca: bool,
        ips: &[&str],
    ) -> X509 {
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
        let name = name.build();
        let mut builder = X509::builder().unwrap();
        builder.set_version(2).unwrap();
        let mut serial = BigNum::new().unwrap();
        serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
        builder
            .set_serial_number(&serial.to_asn1_integer().unwrap())
            .unwrap();
        builder.set_subject_name(&name).unwrap();
        match issuer {
            Some((_, issuer_cert)) => builder.set_issuer_name(issuer_cert.subject_name()),
            None => builder.set_issuer_name(&name),
        }
        .unwrap();
        builder.set_pubkey(key).unwrap();
        builder
            .set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        builder
            .set_not_after(&Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        if is_ca {
            builder
                .append_extension(BasicConstraints::new().critical().ca().build().unwrap())
                .unwrap();
            builder
                .append_extension(
                    KeyUsage::new()
                        .critical()
                        .key_cert_sign()
                        .crl_sign()
                        .build()
                        .unwrap(),
                )
                .unwrap();
        } else {
            builder
                .append_extension(
                    ExtendedKeyUsage::new()
                        .server_auth()
                        .client_auth()
                        .build()
                        .unwrap(),
                )
                .unwrap();
            if !ips.is_empty() {
                let mut san = SubjectAlternativeName::new();
                for ip in ips {
                    san.ip(ip);
                }
                let context = builder.x509v3_context(issuer.map(|(_, cert)| &**cert), None);
                let san = san.build(&context).unwrap();
                builder.append_extension(san).unwrap();
            }
        }
        let signer = issuer.map_or(key, |(issuer_key, _)| issuer_key);
        builder.sign(signer, MessageDigest::sha256()).unwrap();
        builder.build()
    }

    struct Ca {
        key: PKey<Private>,
        cert: X509,
    }

    impl Ca {
        fn new(cn: &str) -> Ca {
            let key = new_key();
            let cert = certificate(&key, cn, None, true, &[]);
            Ca { key, cert }
        }

        fn issue(&self, cn: &str, ips: &[&str]) -> (PKey<Private>, X509) {
            let key = new_key();
            let cert = certificate(&key, cn, Some((&self.key, &self.cert)), false, ips);
            (key, cert)
        }
    }

    fn self_signed(cn: &str) -> (PKey<Private>, X509) {
        let key = new_key();
        let cert = certificate(&key, cn, None, false, &["127.0.0.1"]);
        (key, cert)
    }

    fn config(key_cert: &(PKey<Private>, X509), client_auth: ClientAuth) -> TlsServerConfig {
        TlsServerConfig {
            key: key_cert.0.clone(),
            cert: key_cert.1.clone(),
            client_auth,
        }
    }

    /// Serves `/whoami` (the handler's `TlsConnectInfo` as JSON) on 127.0.0.1, port 0.
    async fn serve(listener: TlsListener) -> (SocketAddr, TlsHandle) {
        let addr = listener.local_addr().unwrap();
        let handle = listener.handle();
        let router = Router::new().route(
            "/whoami",
            get(|ConnectInfo(info): ConnectInfo<TlsConnectInfo>| async move { axum::Json(info) }),
        );
        tokio::spawn(async move {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<TlsConnectInfo>(),
            )
            .await
        });
        (addr, handle)
    }

    async fn start(config: &TlsServerConfig) -> (SocketAddr, TlsHandle) {
        let listener = TlsListener::bind("127.0.0.1:0".parse().unwrap(), config)
            .await
            .unwrap();
        serve(listener).await
    }

    fn url(addr: SocketAddr) -> String {
        format!("https://{addr}/whoami")
    }

    async fn whoami(client: &reqwest::Client, addr: SocketAddr) -> Result<TlsConnectInfoJson> {
        let response = client.get(url(addr)).send().await?.error_for_status()?;
        Ok(serde_json::from_slice(&response.bytes().await?)?)
    }

    #[derive(Debug, serde::Deserialize)]
    struct PeerJson {
        fingerprint: String,
        subject_cn: Option<String>,
        serial_hex: String,
        verified: bool,
    }

    #[derive(Debug, serde::Deserialize)]
    struct TlsConnectInfoJson {
        peer: Option<PeerJson>,
        local_fingerprint: String,
    }

    fn error_chain(error: &anyhow::Error) -> String {
        format!("{error:#}")
    }

    #[tokio::test]
    async fn required_client_auth_accepts_a_certificate_from_its_ca_and_the_handler_sees_it() {
        let ca = Ca::new("pm manager CA");
        let server = ca.issue("agent-1", &["127.0.0.1"]);
        let manager = ca.issue("pm-manager", &[]);
        let (addr, _) = start(&config(
            &server,
            ClientAuth::Required {
                ca: ca.cert.clone(),
            },
        ))
        .await;

        let client = client(Some(&ca.cert), None, Some((&manager.0, &manager.1))).unwrap();
        let response = client.get(url(addr)).send().await.unwrap();
        assert_eq!(peer_fingerprint(&response), Some(fingerprint(&server.1)));
        let info: TlsConnectInfoJson =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        let peer = info.peer.expect("the handler sees the client certificate");
        assert_eq!(peer.fingerprint, fingerprint(&manager.1));
        assert_eq!(peer.subject_cn.as_deref(), Some("pm-manager"));
        let serial = manager
            .1
            .serial_number()
            .to_bn()
            .unwrap()
            .to_hex_str()
            .unwrap();
        assert_eq!(peer.serial_hex, serial.to_ascii_lowercase());
        assert!(peer.verified);
        assert_eq!(info.local_fingerprint, fingerprint(&server.1));
    }

    #[tokio::test]
    async fn required_client_auth_rejects_a_client_without_a_certificate() {
        let ca = Ca::new("pm manager CA");
        let server = ca.issue("agent-1", &["127.0.0.1"]);
        let (addr, _) = start(&config(
            &server,
            ClientAuth::Required {
                ca: ca.cert.clone(),
            },
        ))
        .await;

        let client = client(Some(&ca.cert), None, None).unwrap();
        assert!(whoami(&client, addr).await.is_err());
    }

    #[tokio::test]
    async fn required_client_auth_rejects_a_client_certificate_from_another_ca() {
        let ca = Ca::new("pm manager CA");
        let other = Ca::new("someone else's CA");
        let server = ca.issue("agent-1", &["127.0.0.1"]);
        let intruder = other.issue("pm-manager", &[]);
        let (addr, _) = start(&config(
            &server,
            ClientAuth::Required {
                ca: ca.cert.clone(),
            },
        ))
        .await;

        let client = client(Some(&ca.cert), None, Some((&intruder.0, &intruder.1))).unwrap();
        assert!(whoami(&client, addr).await.is_err());
        // A self-signed client certificate is no better.
        let (key, cert) = self_signed("pm-manager");
        let client = client_builder(Some(&ca.cert), None, Some((&key, &cert)))
            .unwrap()
            .build()
            .unwrap();
        assert!(whoami(&client, addr).await.is_err());
    }

    #[tokio::test]
    async fn optional_client_auth_lets_a_client_without_a_certificate_through_with_no_peer() {
        let ca = Ca::new("pm manager CA");
        let server = self_signed("agent-1");
        let manager = ca.issue("pm-manager", &[]);
        let (addr, handle) = start(&config(
            &server,
            ClientAuth::Optional {
                ca: ca.cert.clone(),
            },
        ))
        .await;
        let pin = handle.fingerprint();

        let anonymous = client(None, Some(&pin), None).unwrap();
        let info = whoami(&anonymous, addr).await.unwrap();
        assert!(info.peer.is_none());
        assert_eq!(info.local_fingerprint, pin);

        let with_cert = client(None, Some(&pin), Some((&manager.0, &manager.1))).unwrap();
        let peer = whoami(&with_cert, addr).await.unwrap().peer.unwrap();
        assert_eq!(peer.fingerprint, fingerprint(&manager.1));
        assert!(peer.verified);

        // A certificate that is presented must still verify.
        let other = Ca::new("someone else's CA").issue("pm-manager", &[]);
        let intruder = client(None, Some(&pin), Some((&other.0, &other.1))).unwrap();
        assert!(whoami(&intruder, addr).await.is_err());
    }

    #[tokio::test]
    async fn no_client_auth_never_sees_a_peer_even_when_the_client_has_a_certificate() {
        let server = self_signed("agent-1");
        let manager = self_signed("pm-manager");
        let (addr, handle) = start(&config(&server, ClientAuth::None)).await;
        let client = client(
            None,
            Some(&handle.fingerprint()),
            Some((&manager.0, &manager.1)),
        );
        let info = whoami(&client.unwrap(), addr).await.unwrap();
        assert!(info.peer.is_none());
    }

    #[tokio::test]
    async fn swapping_the_server_identity_takes_effect_for_new_connections() {
        let before = self_signed("agent-1");
        let (addr, handle) = start(&config(&before, ClientAuth::None)).await;
        let old_pin = fingerprint(&before.1);
        assert_eq!(handle.fingerprint(), old_pin);
        // No connection reuse, so each request below is a new connection with its own check.
        let old_client = client_builder(None, Some(&old_pin), None)
            .unwrap()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        assert_eq!(
            whoami(&old_client, addr).await.unwrap().local_fingerprint,
            old_pin
        );

        // Activation: a CA-signed certificate, and from now on client certificates are required.
        let ca = Ca::new("pm manager CA");
        let after = ca.issue("agent-1", &["127.0.0.1"]);
        let manager = ca.issue("pm-manager", &[]);
        handle
            .reload(&config(
                &after,
                ClientAuth::Required {
                    ca: ca.cert.clone(),
                },
            ))
            .unwrap();
        assert_eq!(handle.fingerprint(), fingerprint(&after.1));

        let error = whoami(&old_client, addr).await.unwrap_err();
        assert!(error_chain(&error).contains("not the pinned"), "{error:#}");

        let mutual = client(Some(&ca.cert), None, Some((&manager.0, &manager.1))).unwrap();
        let info = whoami(&mutual, addr).await.unwrap();
        assert_eq!(info.local_fingerprint, fingerprint(&after.1));
        assert_eq!(info.peer.unwrap().subject_cn.as_deref(), Some("pm-manager"));
        let anonymous = client(Some(&ca.cert), None, None).unwrap();
        assert!(whoami(&anonymous, addr).await.is_err());
    }

    #[tokio::test]
    async fn a_failed_reload_keeps_the_current_identity() {
        let current = self_signed("agent-1");
        let (addr, handle) = start(&config(&current, ClientAuth::None)).await;
        let mismatched = TlsServerConfig {
            key: new_key(),
            cert: self_signed("agent-1").1,
            client_auth: ClientAuth::None,
        };
        let error = handle.reload(&mismatched).unwrap_err();
        assert!(error.to_string().contains("does not belong"), "{error:#}");
        let pinned = client(None, Some(&fingerprint(&current.1)), None).unwrap();
        whoami(&pinned, addr).await.unwrap();
    }

    #[tokio::test]
    async fn a_pinned_client_accepts_the_matching_self_signed_server_and_refuses_another() {
        let agent = self_signed("agent-1");
        let impostor = self_signed("agent-1");
        let (addr, _) = start(&config(&agent, ClientAuth::None)).await;
        let (impostor_addr, _) = start(&config(&impostor, ClientAuth::None)).await;

        let fetched = fetch_server_certificate(addr, Duration::from_secs(1))
            .await
            .unwrap();
        let pin = fingerprint(&fetched);
        assert_eq!(pin, fingerprint(&agent.1));

        // The same pin in the notation `openssl x509 -fingerprint -sha256` prints.
        let colons = pin.as_bytes()["sha256:".len()..]
            .chunks(2)
            .map(|pair| std::str::from_utf8(pair).unwrap().to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        let client = client(None, Some(&colons), None).unwrap();
        whoami(&client, addr).await.unwrap();

        let error = client.get(url(impostor_addr)).send().await.unwrap_err();
        let mismatch = pin_mismatch(&error).expect("the error says the pin did not match");
        assert_eq!(mismatch.expected, pin);
        assert_eq!(mismatch.actual, fingerprint(&impostor.1));
        let error = whoami(&client, impostor_addr).await.unwrap_err();
        assert!(pin_mismatch(error.as_ref()).is_some());
        assert!(error_chain(&error).contains("not the pinned"), "{error:#}");
    }

    #[tokio::test]
    async fn a_pin_mismatch_fails_before_the_request_is_sent() {
        // A plain TLS server that records whatever the client writes after the handshake.
        let (key, cert) = self_signed("impostor");
        let listener = TlsListener::bind(
            "127.0.0.1:0".parse().unwrap(),
            &config(&(key, cert), ClientAuth::None),
        )
        .await
        .unwrap();
        let addr = listener.local_addr().unwrap();
        let received = tokio::spawn(async move {
            let mut listener = listener;
            let (mut stream, _) = Listener::accept(&mut listener).await;
            let mut bytes = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_millis(500), stream.read_to_end(&mut bytes))
                    .await;
            bytes
        });
        let pin = format!("sha256:{}", "ab".repeat(32));
        let client = client(None, Some(&pin), None).unwrap();
        let result = client
            .post(format!("https://{addr}/v1/activate"))
            .body("secret proof")
            .send()
            .await;
        assert!(result.is_err());
        assert!(received.await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_ca_client_verifies_ip_subject_alt_names_and_refuses_a_certificate_for_another_address()
     {
        let ca = Ca::new("pm manager CA");
        let (addr, _) = start(&config(
            &ca.issue("agent-1", &["127.0.0.1"]),
            ClientAuth::None,
        ))
        .await;
        let (wrong_addr, _) = start(&config(
            &ca.issue("agent-2", &["10.9.8.7"]),
            ClientAuth::None,
        ))
        .await;
        let (foreign_addr, _) = start(&config(
            &Ca::new("other CA").issue("agent-1", &["127.0.0.1"]),
            ClientAuth::None,
        ))
        .await;

        let client = client(Some(&ca.cert), None, None).unwrap();
        whoami(&client, addr).await.unwrap();
        assert!(whoami(&client, wrong_addr).await.is_err());
        assert!(whoami(&client, foreign_addr).await.is_err());
    }

    #[tokio::test]
    async fn handshake_garbage_and_silent_clients_do_not_stop_the_server() {
        let agent = self_signed("agent-1");
        let listener = TlsListener::bind(
            "127.0.0.1:0".parse().unwrap(),
            &config(&agent, ClientAuth::None),
        )
        .await
        .unwrap()
        .with_handshake_timeout(Duration::from_millis(600));
        let (addr, handle) = serve(listener).await;

        // One client stays silent (holding a handshake open), one sends junk, one plain HTTP.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut junk = TcpStream::connect(addr).await.unwrap();
        junk.write_all(b"\x00\x01garbage\r\n\r\n\xff\xfe")
            .await
            .unwrap();
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();

        // Meanwhile a real client is served, while the silent client's handshake is still
        // pending: handshakes do not wait for each other.
        let client = client(None, Some(&handle.fingerprint()), None).unwrap();
        whoami(&client, addr).await.unwrap();
        let mut buf = [0u8; 16];
        let still_open = silent.try_read(&mut buf);
        assert!(
            matches!(&still_open, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the real client was only served after the silent one timed out: {still_open:?}"
        );

        // The junk connections are closed, the silent one after the handshake timeout.
        for stream in [&mut junk, &mut plain, &mut silent] {
            let mut buf = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut buf)).await;
            assert!(read.is_ok(), "the server keeps a broken connection open");
        }
        let fresh = client_builder(None, Some(&handle.fingerprint()), None)
            .unwrap()
            .build()
            .unwrap();
        whoami(&fresh, addr).await.unwrap();
    }

    #[test]
    fn a_client_needs_a_ca_or_a_pin_and_a_well_formed_pin() {
        let error = client(None, None, None).unwrap_err();
        assert!(error.to_string().contains("trusts any server"), "{error:#}");
        let error = client(None, Some("sha256:abcd"), None).unwrap_err();
        assert!(error.to_string().contains("64 hex digits"), "{error:#}");
        let error = client(None, Some(&format!("md5:{}", "ab".repeat(32))), None).unwrap_err();
        assert!(error.to_string().contains("64 hex digits"), "{error:#}");
    }

    #[test]
    fn fingerprints_are_sha256_of_the_der_in_lowercase_hex() {
        let (_, cert) = self_signed("agent-1");
        let print = fingerprint(&cert);
        assert_eq!(print, fingerprint_der(&cert.to_der().unwrap()));
        assert_eq!(print.len(), "sha256:".len() + 64);
        assert_eq!(parse_fingerprint(&print.to_uppercase()).unwrap(), print);
        assert_eq!(parse_fingerprint(&print["sha256:".len()..]).unwrap(), print);
    }
}
