//! HTTP client for upstream feeds: conditional requests (ETag, If-Modified-Since, header range
//! reads), retries with backoff on 5xx and timeouts, cool-down on 429/403, proxies, and
//! downloads streamed to disk with their sha256 computed on the way.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ProxyConfig};
use crate::manifest::hex;

/// Default cool-down after HTTP 429 without Retry-After, as freshclam does.
pub const COOLDOWN_429: Duration = Duration::from_secs(4 * 3600);
/// Default cool-down after HTTP 403 (freshclam treats it as a ban for a day).
pub const COOLDOWN_403: Duration = Duration::from_secs(24 * 3600);

/// What makes a later request conditional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validators {
    /// `ETag` of the last 2xx answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// `Last-Modified` of the last 2xx answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
    /// For a parent pm mirror's `manifest.json`: the serial of the manifest latest follows. A
    /// parent's dist whose serial is lower later was rolled back there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_serial: Option<u32>,
    /// For a parent pm mirror: the `dist_serial` of the signed dist statement latest followed.
    /// A statement with a lower one is an old dist replayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dist_serial: Option<u64>,
}

impl Validators {
    fn from_headers(headers: &HeaderMap) -> Validators {
        let text = |name| {
            headers
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .map(String::from)
        };
        Validators {
            etag: text(header::ETAG),
            last_modified: text(header::LAST_MODIFIED),
            manifest_serial: None,
            dist_serial: None,
        }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Upstream asked us to back off (429) or refused us (403).
    #[error("`{url}` answered HTTP {status}: upstream asks to back off for {retry_after:?}")]
    Cooldown {
        url: Url,
        status: u16,
        retry_after: Duration,
    },
    /// An HTTP status that is not success, 304 or 404.
    #[error("`{url}` answered HTTP {status}")]
    Status { url: Url, status: u16 },
    /// Connection, timeout or protocol failure after all retries.
    #[error("`{url}` could not be fetched: {message}")]
    Network { url: Url, message: String },
    /// The body was shorter than announced.
    #[error("`{url}` was truncated: {received} of {expected} bytes")]
    Truncated {
        url: Url,
        expected: u64,
        received: u64,
    },
    /// The body was larger than allowed.
    #[error("`{url}` is larger than the limit of {limit} bytes")]
    TooLarge { url: Url, limit: u64 },
    /// Writing the download failed.
    #[error("cannot write `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl FetchError {
    /// Whether another attempt might succeed (5xx, timeouts, broken connections).
    fn is_transient(&self) -> bool {
        match self {
            FetchError::Status { status, .. } => *status >= 500,
            FetchError::Network { .. } | FetchError::Truncated { .. } => true,
            _ => false,
        }
    }
}

/// An answer sorted by what the caller does next.
enum Opened {
    NotModified,
    NotFound,
    Body(Box<(reqwest::Response, Validators)>),
}

/// Result of a conditional request.
#[derive(Debug)]
pub enum Fetched<T> {
    /// 304: what we have is current; no body was transferred.
    NotModified,
    /// 404.
    NotFound,
    /// A body (or its first bytes), with the validators to send next time.
    Body { body: T, validators: Validators },
}

/// A file written to disk by [`Upstream::download`].
#[derive(Debug, Clone)]
pub struct Downloaded {
    /// Bytes written.
    pub size: u64,
    /// Hex sha256 of the file.
    pub sha256: String,
}

/// The upstream HTTP client; counts every body byte it receives.
pub struct Upstream {
    client: reqwest::Client,
    retries: u32,
    backoff: Duration,
    bytes_received: AtomicU64,
    progress: Option<indicatif::MultiProgress>,
}

impl Upstream {
    /// A client configured from `pm.toml` (proxy, timeouts, retries). Without a `[proxy]`
    /// section the usual `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` variables apply.
    pub fn new(config: &Config, show_progress: bool) -> anyhow::Result<Upstream> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("pm-mirror/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.http.connect_timeout)
            // reqwest's default, said here: a request's body never waits for an ACK (Nagle).
            .tcp_nodelay(true)
            .read_timeout(config.http.timeout.min(Duration::from_secs(120)))
            .timeout(config.http.timeout);
        if let Some(proxy) = &config.proxy {
            builder = builder.proxy(build_proxy(proxy)?);
        }
        Ok(Upstream {
            client: builder.build()?,
            retries: config.http.retries,
            backoff: config.http.backoff,
            bytes_received: AtomicU64::new(0),
            progress: show_progress.then(indicatif::MultiProgress::new),
        })
    }

    /// Body bytes received so far, over all requests and attempts.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received.load(Ordering::Relaxed)
    }

    /// Reads the first `n` bytes of `url` (a `Range` request, as freshclam reads CVD headers),
    /// conditional on `validators`.
    pub async fn fetch_head(
        &self,
        url: &Url,
        n: u64,
        validators: Option<&Validators>,
    ) -> Result<Fetched<Vec<u8>>, FetchError> {
        self.with_retries(url, || async {
            let range = format!("bytes=0-{}", n - 1);
            let request = self.client.get(url.clone()).header(header::RANGE, range);
            let (mut response, validators) =
                match self.open(url, conditional(request, validators)).await? {
                    Opened::Body(body) => *body,
                    Opened::NotModified => return Ok(Fetched::NotModified),
                    Opened::NotFound => return Ok(Fetched::NotFound),
                };
            // A server that ignores Range sends the whole file: read only what we need.
            let mut body = Vec::with_capacity(n as usize);
            self.read_chunks(url, &mut response, |chunk| {
                body.extend_from_slice(chunk);
                Ok((body.len() as u64) < n)
            })
            .await?;
            body.truncate(n as usize);
            Ok(Fetched::Body { body, validators })
        })
        .await
    }

    /// Fetches a small document (an index) into memory, refusing more than `limit` bytes.
    pub async fn fetch_small(
        &self,
        url: &Url,
        validators: Option<&Validators>,
        limit: u64,
    ) -> Result<Fetched<Vec<u8>>, FetchError> {
        self.with_retries(url, || async {
            let request = conditional(self.client.get(url.clone()), validators);
            let (mut response, validators) = match self.open(url, request).await? {
                Opened::Body(body) => *body,
                Opened::NotModified => return Ok(Fetched::NotModified),
                Opened::NotFound => return Ok(Fetched::NotFound),
            };
            let expected = response.content_length();
            let mut body = Vec::new();
            self.read_chunks(url, &mut response, |chunk| {
                body.extend_from_slice(chunk);
                if body.len() as u64 > limit {
                    return Err(FetchError::TooLarge {
                        url: url.clone(),
                        limit,
                    });
                }
                Ok(true)
            })
            .await?;
            check_length(url, expected, body.len() as u64)?;
            Ok(Fetched::Body { body, validators })
        })
        .await
    }

    /// Downloads `url` to `dest` (fsynced), hashing it on the way, refusing more than `limit`
    /// bytes. Not conditional: callers decide from a header read or an index whether the file
    /// is needed.
    pub async fn download(
        &self,
        url: &Url,
        dest: &Path,
        limit: u64,
    ) -> Result<Fetched<Downloaded>, FetchError> {
        self.with_retries(url, || async {
            let (mut response, validators) =
                match self.open(url, self.client.get(url.clone())).await? {
                    Opened::Body(body) => *body,
                    Opened::NotModified => return Ok(Fetched::NotModified),
                    Opened::NotFound => return Ok(Fetched::NotFound),
                };
            let expected = response.content_length();
            let io = |source| FetchError::Io {
                path: dest.to_owned(),
                source,
            };
            // A retry starts over. Unlink rather than truncate: the path could be a hard link to
            // a live revision's file, which must never be written through.
            let _ = std::fs::remove_file(dest);
            let mut file = std::fs::File::options()
                .write(true)
                .create_new(true)
                .open(dest)
                .map_err(io)?;
            let mut writer = std::io::BufWriter::with_capacity(1 << 20, &mut file);
            let mut hasher = openssl::sha::Sha256::new();
            let mut size = 0u64;
            let bar = self.progress_bar(url, expected);
            if expected.is_some_and(|length| length > limit) {
                return Err(FetchError::TooLarge {
                    url: url.clone(),
                    limit,
                });
            }
            self.read_chunks(url, &mut response, |chunk| {
                size += chunk.len() as u64;
                // An endless body costs the limit, not the disk until the timeout.
                if size > limit {
                    return Err(FetchError::TooLarge {
                        url: url.clone(),
                        limit,
                    });
                }
                hasher.update(chunk);
                writer.write_all(chunk).map_err(io)?;
                if let Some(bar) = &bar {
                    bar.set_position(size);
                }
                Ok(true)
            })
            .await?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            writer.flush().map_err(io)?;
            drop(writer);
            check_length(url, expected, size)?;
            file.sync_all().map_err(io)?;
            let sha256 = hex(&hasher.finish());
            Ok(Fetched::Body {
                body: Downloaded { size, sha256 },
                validators,
            })
        })
        .await
    }

    /// Sends a request and sorts the answer: 304, 404 (its body drained), cool-down and other
    /// errors, or a body to read.
    async fn open(
        &self,
        url: &Url,
        request: reqwest::RequestBuilder,
    ) -> Result<Opened, FetchError> {
        let response = request.send().await.map_err(|err| network(url, err))?;
        let Some((mut response, validators)) = classify(url, response)? else {
            return Ok(Opened::NotModified);
        };
        if response.status() == StatusCode::NOT_FOUND {
            self.read_chunks(url, &mut response, |_| Ok(true))
                .await
                .ok();
            return Ok(Opened::NotFound);
        }
        Ok(Opened::Body(Box::new((response, validators))))
    }

    /// Feeds the body to `consume` chunk by chunk, counting the bytes, until the body ends or
    /// `consume` returns `Ok(false)`.
    async fn read_chunks(
        &self,
        url: &Url,
        response: &mut reqwest::Response,
        mut consume: impl FnMut(&[u8]) -> Result<bool, FetchError>,
    ) -> Result<(), FetchError> {
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    self.bytes_received
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    if !consume(&chunk)? {
                        return Ok(());
                    }
                }
                Ok(None) => return Ok(()),
                Err(err) => return Err(network(url, err)),
            }
        }
    }

    fn progress_bar(&self, url: &Url, length: Option<u64>) -> Option<indicatif::ProgressBar> {
        let progress = self.progress.as_ref()?;
        let bar = progress.add(indicatif::ProgressBar::new(length.unwrap_or(0)));
        let style = indicatif::ProgressStyle::with_template(
            "{msg:30!} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message(url.path().rsplit('/').next().unwrap_or("").to_string());
        Some(bar)
    }

    async fn with_retries<T, F, Fut>(&self, url: &Url, attempt: F) -> Result<T, FetchError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, FetchError>>,
    {
        let mut delay = self.backoff;
        let mut tries = 0;
        loop {
            match attempt().await {
                Err(err) if err.is_transient() && tries < self.retries => {
                    tries += 1;
                    tracing::warn!(url = %url, error = %err, retry_in = ?delay, "upstream request failed, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(300));
                }
                other => return other,
            }
        }
    }
}

/// Splits a response into 304 (`None`), cool-down and other errors, or a body to read.
fn classify(
    url: &Url,
    response: reqwest::Response,
) -> Result<Option<(reqwest::Response, Validators)>, FetchError> {
    let status = response.status();
    if status == StatusCode::NOT_MODIFIED {
        return Ok(None);
    }
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::FORBIDDEN {
        let default = if status == StatusCode::FORBIDDEN {
            COOLDOWN_403
        } else {
            COOLDOWN_429
        };
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after)
            .unwrap_or(default);
        return Err(FetchError::Cooldown {
            url: url.clone(),
            status: status.as_u16(),
            retry_after,
        });
    }
    if status == StatusCode::NOT_FOUND {
        return Ok(Some((response, Validators::default())));
    }
    if !status.is_success() {
        return Err(FetchError::Status {
            url: url.clone(),
            status: status.as_u16(),
        });
    }
    let validators = Validators::from_headers(response.headers());
    Ok(Some((response, validators)))
}

fn conditional(
    mut request: reqwest::RequestBuilder,
    validators: Option<&Validators>,
) -> reqwest::RequestBuilder {
    if let Some(validators) = validators {
        if let Some(etag) = &validators.etag {
            request = request.header(header::IF_NONE_MATCH, etag);
        }
        if let Some(last_modified) = &validators.last_modified {
            request = request.header(header::IF_MODIFIED_SINCE, last_modified);
        }
    }
    request
}

fn check_length(url: &Url, expected: Option<u64>, received: u64) -> Result<(), FetchError> {
    match expected {
        Some(expected) if expected != received => Err(FetchError::Truncated {
            url: url.clone(),
            expected,
            received,
        }),
        _ => Ok(()),
    }
}

fn network(url: &Url, err: reqwest::Error) -> FetchError {
    // reqwest's Display hides the cause ("error sending request"); the chain says what happened.
    let mut message = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    FetchError::Network {
        url: url.clone(),
        message,
    }
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Reads a secret from a file that must be private (0600): its first line, without the newline.
fn read_secret_file(path: &Path) -> anyhow::Result<String> {
    let text = crate::durable::read_secret(path)
        .map_err(|err| anyhow::anyhow!("proxy password file: {err}"))?;
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

fn build_proxy(config: &ProxyConfig) -> anyhow::Result<reqwest::Proxy> {
    use anyhow::Context;
    let mut proxy = reqwest::Proxy::all(&config.url)
        .with_context(|| format!("proxy url `{}` is not usable", config.url))?;
    if let Some(username) = &config.username {
        let password = match &config.password_file {
            Some(path) => read_secret_file(path)?,
            None => String::new(),
        };
        proxy = proxy.basic_auth(username, &password);
    }
    if let Some(no_proxy) = &config.no_proxy {
        proxy = proxy.no_proxy(reqwest::NoProxy::from_string(no_proxy));
    }
    Ok(proxy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        let future = std::time::SystemTime::now() + Duration::from_secs(3600);
        let parsed = parse_retry_after(&httpdate::fmt_http_date(future)).unwrap();
        assert!(parsed > Duration::from_secs(3500) && parsed <= Duration::from_secs(3600));
        assert_eq!(parse_retry_after("soon"), None);
    }
}
