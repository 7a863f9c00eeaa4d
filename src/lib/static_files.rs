//! Serving immutable files over HTTP the way mirrors and caches expect: strong ETags,
//! Last-Modified, conditional requests (304), single byte ranges (206/416) and HEAD.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::SystemTime;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Where the bytes of a response come from.
pub enum Content {
    /// An open file of `len` bytes: a small answer is read at once ([`READ_AT_ONCE`]), a larger
    /// one streamed ([`STREAM_CHUNK`]).
    File {
        file: std::sync::Arc<std::fs::File>,
        len: u64,
    },
    /// Bytes in memory.
    Memory(Bytes),
    /// The first bytes of a file of `len` bytes, for an answer that needs no more (a header
    /// probe of a large CVD): the caller checks with [`body_range`].
    Prefix { bytes: Bytes, len: u64 },
}

/// Answers up to this many bytes (a freshclam header probe, a cdiff, a small CVD) are read with
/// one `pread` on the async worker, the way nginx reads files in its event loop: from the page
/// cache that costs microseconds, less than handing the read to a blocking thread and back,
/// which cost `pm-mirror serve` most of its time per probe (a fifth of nginx's rate).
pub const READ_AT_ONCE: u64 = 64 * 1024;

/// Larger answers are streamed in chunks of this size, each read on a blocking thread, so a
/// slow disk never stalls the workers that answer probes.
pub const STREAM_CHUNK: u64 = 1024 * 1024;

impl Content {
    fn len(&self) -> u64 {
        match self {
            Content::File { len, .. } | Content::Prefix { len, .. } => *len,
            Content::Memory(bytes) => bytes.len() as u64,
        }
    }
}

/// What an answer will be, from the request and the file's length and validators alone.
enum Plan {
    MethodNotAllowed,
    NotModified,
    Unsatisfiable,
    /// A status with the bytes `start..start + len` of the file (sent unless HEAD).
    Send {
        status: StatusCode,
        start: u64,
        len: u64,
    },
}

fn plan(
    method: &Method,
    request: &HeaderMap,
    total: u64,
    last_modified: SystemTime,
    etag: &str,
) -> Plan {
    if method != Method::GET && method != Method::HEAD {
        return Plan::MethodNotAllowed;
    }
    if not_modified(request, etag, last_modified) {
        return Plan::NotModified;
    }
    let last_modified_text = httpdate::fmt_http_date(last_modified);
    let range = request
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| if_range_matches(request, etag, &last_modified_text))
        .map(|text| parse_range(text, total));
    match range {
        None | Some(RangeRequest::Ignore) => Plan::Send {
            status: StatusCode::OK,
            start: 0,
            len: total,
        },
        Some(RangeRequest::Unsatisfiable) => Plan::Unsatisfiable,
        Some(RangeRequest::Bytes { start, end }) => Plan::Send {
            status: StatusCode::PARTIAL_CONTENT,
            start,
            len: end - start + 1,
        },
    }
}

/// The bytes of a file of `total` bytes that [`respond`] would send as the body (`start`,
/// `len`), or `None` when it sends none (HEAD, 304, 416, 405): what a caller holding only the
/// file's first bytes ([`Content::Prefix`]) checks before opening the file.
pub fn body_range(
    method: &Method,
    request: &HeaderMap,
    total: u64,
    last_modified: SystemTime,
    etag: &str,
) -> Option<(u64, u64)> {
    match plan(method, request, total, last_modified, etag) {
        Plan::Send { start, len, .. } if method == Method::GET => Some((start, len)),
        _ => None,
    }
}

/// Answers `method` with `content`, honouring If-None-Match, If-Modified-Since, Range, If-Range
/// and HEAD.
pub async fn respond(
    method: &Method,
    request: &HeaderMap,
    content: Content,
    last_modified: SystemTime,
    etag: &str,
    content_type: &str,
) -> Response {
    let total = content.len();
    let plan = plan(method, request, total, last_modified, etag);
    if let Plan::MethodNotAllowed = plan {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
        )
            .into_response();
    }
    let mut headers = HeaderMap::new();
    insert(&mut headers, header::ETAG, etag);
    insert(
        &mut headers,
        header::LAST_MODIFIED,
        &httpdate::fmt_http_date(last_modified),
    );
    insert(&mut headers, header::ACCEPT_RANGES, "bytes");
    let (status, start, len) = match plan {
        Plan::MethodNotAllowed | Plan::NotModified => {
            return (StatusCode::NOT_MODIFIED, headers).into_response();
        }
        Plan::Unsatisfiable => {
            insert(&mut headers, header::CONTENT_TYPE, content_type);
            insert(
                &mut headers,
                header::CONTENT_RANGE,
                &format!("bytes */{total}"),
            );
            return (StatusCode::RANGE_NOT_SATISFIABLE, headers).into_response();
        }
        Plan::Send { status, start, len } => (status, start, len),
    };
    insert(&mut headers, header::CONTENT_TYPE, content_type);
    if status == StatusCode::PARTIAL_CONTENT {
        let range = format!("bytes {start}-{}/{total}", start + len - 1);
        insert(&mut headers, header::CONTENT_RANGE, &range);
    }
    insert(&mut headers, header::CONTENT_LENGTH, &len.to_string());
    if method == Method::HEAD {
        return (status, headers).into_response();
    }
    let body = match content {
        Content::Memory(bytes) | Content::Prefix { bytes, .. } => {
            match bytes.get(start as usize..(start + len) as usize) {
                Some(_) => Body::from(bytes.slice(start as usize..(start + len) as usize)),
                // A prefix too short for the answer: the caller did not check `body_range`.
                None => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            }
        }
        Content::File { file, .. } if len <= READ_AT_ONCE => {
            let mut bytes = vec![0u8; len as usize];
            if file.read_exact_at(&mut bytes, start).is_err() {
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            }
            Body::from(bytes)
        }
        Content::File { file, .. } => Body::from_stream(stream_file(file, start, len)),
    };
    (status, headers, body).into_response()
}

/// `len` bytes of `file` from `start`, in [`STREAM_CHUNK`]s read on blocking threads.
fn stream_file(
    file: Arc<std::fs::File>,
    start: u64,
    len: u64,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    let end = start + len;
    futures_util::stream::try_unfold((file, start), move |(file, offset)| async move {
        if offset >= end {
            return Ok(None);
        }
        let size = (end - offset).min(STREAM_CHUNK) as usize;
        let reader = Arc::clone(&file);
        let chunk = tokio::task::spawn_blocking(move || {
            let mut chunk = vec![0u8; size];
            reader.read_exact_at(&mut chunk, offset).map(|()| chunk)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(Some((Bytes::from(chunk), (file, offset + size as u64))))
    })
}

fn insert(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

fn not_modified(request: &HeaderMap, etag: &str, last_modified: SystemTime) -> bool {
    if let Some(tags) = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        return tags
            .split(',')
            .map(str::trim)
            .any(|t| t == "*" || t.trim_start_matches("W/") == etag);
    }
    let since = request
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    match since {
        // HTTP dates have whole seconds; compare at that precision.
        Some(since) => whole_seconds(last_modified) <= whole_seconds(since),
        None => false,
    }
}

fn whole_seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn if_range_matches(request: &HeaderMap, etag: &str, last_modified: &str) -> bool {
    match request.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(value) => value == etag || value == last_modified,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum RangeRequest {
    /// Malformed or multi-range: serve the whole file (allowed by RFC 9110).
    Ignore,
    Unsatisfiable,
    Bytes {
        start: u64,
        end: u64,
    },
}

fn parse_range(text: &str, total: u64) -> RangeRequest {
    let Some(spec) = text.trim().strip_prefix("bytes=") else {
        return RangeRequest::Ignore;
    };
    if spec.contains(',') {
        return RangeRequest::Ignore;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Ignore;
    };
    let (first, last) = (first.trim(), last.trim());
    let (start, end) = if first.is_empty() {
        let Ok(suffix) = last.parse::<u64>() else {
            return RangeRequest::Ignore;
        };
        if suffix == 0 || total == 0 {
            return RangeRequest::Unsatisfiable;
        }
        (total.saturating_sub(suffix), total - 1)
    } else {
        let Ok(start) = first.parse::<u64>() else {
            return RangeRequest::Ignore;
        };
        let end = if last.is_empty() {
            total.saturating_sub(1)
        } else {
            match last.parse::<u64>() {
                Ok(end) if end >= start => end.min(total.saturating_sub(1)),
                _ => return RangeRequest::Ignore,
            }
        };
        if start >= total {
            return RangeRequest::Unsatisfiable;
        }
        (start, end)
    };
    RangeRequest::Bytes { start, end }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, total: u64, expected: RangeRequest) {
        assert_eq!(parse_range(text, total), expected, "{text} of {total}");
    }

    #[test]
    fn ranges_parse_like_rfc_9110() {
        check(
            "bytes=0-511",
            9952,
            RangeRequest::Bytes { start: 0, end: 511 },
        );
        check(
            "bytes=0-511",
            100,
            RangeRequest::Bytes { start: 0, end: 99 },
        );
        check(
            "bytes=100-",
            150,
            RangeRequest::Bytes {
                start: 100,
                end: 149,
            },
        );
        check(
            "bytes=-10",
            150,
            RangeRequest::Bytes {
                start: 140,
                end: 149,
            },
        );
        check("bytes=200-300", 150, RangeRequest::Unsatisfiable);
        check("bytes=0-1,5-6", 150, RangeRequest::Ignore);
        check("items=0-1", 150, RangeRequest::Ignore);
        check("bytes=5-1", 150, RangeRequest::Ignore);
    }

    #[tokio::test]
    async fn conditional_and_range_requests_get_the_right_status() {
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_624_412_045);
        let body = Bytes::from_static(b"0123456789");
        let status = |headers: HeaderMap, method: Method| {
            let body = body.clone();
            async move {
                let response = respond(
                    &method,
                    &headers,
                    Content::Memory(body),
                    time,
                    "\"abc\"",
                    "text/plain",
                )
                .await;
                let status = response.status();
                let bytes = axum::body::to_bytes(response.into_body(), 100)
                    .await
                    .unwrap();
                (status, bytes)
            }
        };
        let headers = |pairs: &[(header::HeaderName, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(name.clone(), HeaderValue::from_str(value).unwrap());
            }
            map
        };
        assert_eq!(status(headers(&[]), Method::GET).await.0, StatusCode::OK);
        let (code, bytes) = status(headers(&[(header::RANGE, "bytes=2-4")]), Method::GET).await;
        assert_eq!(
            (code, &bytes[..]),
            (StatusCode::PARTIAL_CONTENT, &b"234"[..])
        );
        let same = httpdate::fmt_http_date(time);
        let older = httpdate::fmt_http_date(time - std::time::Duration::from_secs(5));
        let ims = |v: &str| headers(&[(header::IF_MODIFIED_SINCE, v)]);
        assert_eq!(
            status(ims(&same), Method::GET).await.0,
            StatusCode::NOT_MODIFIED
        );
        assert_eq!(status(ims(&older), Method::GET).await.0, StatusCode::OK);
        let inm = headers(&[(header::IF_NONE_MATCH, "\"abc\"")]);
        assert_eq!(status(inm, Method::GET).await.0, StatusCode::NOT_MODIFIED);
        let (code, bytes) = status(headers(&[]), Method::HEAD).await;
        assert_eq!((code, bytes.len()), (StatusCode::OK, 0));
        let far = headers(&[(header::RANGE, "bytes=50-")]);
        assert_eq!(
            status(far, Method::GET).await.0,
            StatusCode::RANGE_NOT_SATISFIABLE
        );
    }

    #[tokio::test]
    async fn files_are_read_at_once_or_streamed_in_chunks_with_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..(2 * STREAM_CHUNK + 12_345))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let len = data.len() as u64;
        for (range, expected) in [
            (None, &data[..]),
            (Some("bytes=0-511"), &data[..512]),
            (Some("bytes=1000-"), &data[1000..]),
            (Some("bytes=-70000"), &data[data.len() - 70_000..]),
            (Some("bytes=5-65540"), &data[5..65_541]),
        ] {
            let mut headers = HeaderMap::new();
            if let Some(range) = range {
                headers.insert(header::RANGE, HeaderValue::from_static(range));
            }
            let file = Arc::new(std::fs::File::open(&path).unwrap());
            let response = respond(
                &Method::GET,
                &headers,
                Content::File { file, len },
                SystemTime::UNIX_EPOCH,
                "\"e\"",
                "application/octet-stream",
            )
            .await;
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            assert!(body[..] == *expected, "{range:?}: {} bytes", body.len());
        }
    }

    #[tokio::test]
    async fn a_prefix_answers_what_lies_within_it_and_says_when_the_file_is_needed() {
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_624_412_045);
        let prefix = Bytes::from((0..512u32).map(|i| i as u8).collect::<Vec<u8>>());
        let ranged = |range: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::RANGE, HeaderValue::from_static(range));
            headers
        };
        let wanted = |method: Method, headers: &HeaderMap| {
            body_range(&method, headers, 10_000, time, "\"e\"")
        };
        assert_eq!(wanted(Method::GET, &ranged("bytes=0-511")), Some((0, 512)));
        assert_eq!(
            wanted(Method::GET, &ranged("bytes=0-1023")),
            Some((0, 1024))
        );
        assert_eq!(wanted(Method::GET, &HeaderMap::new()), Some((0, 10_000)));
        assert_eq!(wanted(Method::HEAD, &HeaderMap::new()), None);
        assert_eq!(wanted(Method::GET, &ranged("bytes=20000-")), None);
        let response = respond(
            &Method::GET,
            &ranged("bytes=0-511"),
            Content::Prefix {
                bytes: prefix.clone(),
                len: 10_000,
            },
            time,
            "\"e\"",
            "application/octet-stream",
        )
        .await;
        assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(
            response.headers()[header::CONTENT_RANGE],
            "bytes 0-511/10000"
        );
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(body, prefix);
    }
}
