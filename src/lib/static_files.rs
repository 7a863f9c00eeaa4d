//! Serving immutable files over HTTP the way mirrors and caches expect: strong ETags,
//! Last-Modified, conditional requests (304), single byte ranges (206/416) and HEAD.

use std::time::SystemTime;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Where the bytes of a response come from.
pub enum Content {
    /// An open file, streamed from its start (plus the range offset).
    File { file: tokio::fs::File, len: u64 },
    /// Bytes in memory.
    Memory(Bytes),
}

impl Content {
    fn len(&self) -> u64 {
        match self {
            Content::File { len, .. } => *len,
            Content::Memory(bytes) => bytes.len() as u64,
        }
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
    if method != Method::GET && method != Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
        )
            .into_response();
    }
    let last_modified_text = httpdate::fmt_http_date(last_modified);
    let mut headers = HeaderMap::new();
    insert(&mut headers, header::ETAG, etag);
    insert(&mut headers, header::LAST_MODIFIED, &last_modified_text);
    insert(&mut headers, header::ACCEPT_RANGES, "bytes");

    if not_modified(request, etag, last_modified) {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    let total = content.len();
    insert(&mut headers, header::CONTENT_TYPE, content_type);
    let range = request
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| if_range_matches(request, etag, &last_modified_text))
        .map(|text| parse_range(text, total));
    let (status, start, len) = match range {
        None | Some(RangeRequest::Ignore) => (StatusCode::OK, 0, total),
        Some(RangeRequest::Unsatisfiable) => {
            insert(
                &mut headers,
                header::CONTENT_RANGE,
                &format!("bytes */{total}"),
            );
            return (StatusCode::RANGE_NOT_SATISFIABLE, headers).into_response();
        }
        Some(RangeRequest::Bytes { start, end }) => {
            let range = format!("bytes {start}-{end}/{total}");
            insert(&mut headers, header::CONTENT_RANGE, &range);
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
    };
    insert(&mut headers, header::CONTENT_LENGTH, &len.to_string());
    if method == Method::HEAD {
        return (status, headers).into_response();
    }
    let body = match content {
        Content::Memory(bytes) => Body::from(bytes.slice(start as usize..(start + len) as usize)),
        Content::File { mut file, .. } => {
            if start > 0 && file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            }
            Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
                file.take(len),
                256 * 1024,
            ))
        }
    };
    (status, headers, body).into_response()
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
}
