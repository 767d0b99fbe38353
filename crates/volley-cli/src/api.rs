//! The gateway's HTTP API as the CLI uses it, with errors a person understands.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::Fail;

#[derive(Clone)]
pub struct Api {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
}

/// A response the CLI may act on: its status, whether it was an idempotent replay, its body.
pub struct Reply {
    pub status: StatusCode,
    pub replayed: bool,
    pub body: Value,
}

impl Api {
    pub fn new(base: &str, key: Option<String>) -> Result<Api, Fail> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| Fail::service(format!("cannot build an HTTP client: {e}")))?;
        Ok(Api {
            base: base.trim_end_matches('/').to_owned(),
            key,
            http,
        })
    }

    fn key(&self) -> Result<&str, Fail> {
        self.key.as_deref().ok_or_else(|| {
            Fail::usage("no API key: set VOLLEY_API_KEY or pass --api-key".to_owned())
        })
    }

    /// Sends a request and returns whatever status came back; only transport errors fail. A
    /// 429 (`rate_limited`) is waited out as its `Retry-After` says, a few times, since the
    /// gateway limits each key's request rate and the CLI is one key doing many requests.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        idempotency_key: Option<&str>,
        auth: bool,
    ) -> Result<Reply, Fail> {
        let mut attempt = 0;
        loop {
            let (reply, retry_after) = self
                .send_once(method.clone(), path, body, idempotency_key, auth)
                .await?;
            attempt += 1;
            if reply.status != StatusCode::TOO_MANY_REQUESTS || attempt >= RATE_LIMIT_ATTEMPTS {
                return Ok(reply);
            }
            tokio::time::sleep(retry_after).await;
        }
    }

    async fn send_once(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        idempotency_key: Option<&str>,
        auth: bool,
    ) -> Result<(Reply, Duration), Fail> {
        let mut rb = self.http.request(method, format!("{}{path}", self.base));
        if auth {
            rb = rb.bearer_auth(self.key()?);
        }
        if let Some(b) = body {
            rb = rb
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_vec());
        }
        if let Some(k) = idempotency_key {
            rb = rb.header("Idempotency-Key", k);
        }
        let r = rb.send().await.map_err(|e| self.transport(e))?;
        let status = r.status();
        let retry_after = retry_after(r.headers());
        let replayed = r
            .headers()
            .get("Idempotent-Replayed")
            .is_some_and(|v| v.as_bytes() == b"true");
        let text = r.text().await.map_err(|e| self.transport(e))?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((
            Reply {
                status,
                replayed,
                body,
            },
            retry_after,
        ))
    }

    /// A request that must succeed: any other status is an error naming what the server said.
    pub async fn call(&self, method: Method, path: &str, auth: bool) -> Result<Value, Fail> {
        let r = self.send(method, path, None, None, auth).await?;
        if r.status.is_success() {
            Ok(r.body)
        } else {
            Err(refused(&r))
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value, Fail> {
        self.call(Method::GET, path, true).await
    }

    fn transport(&self, e: reqwest::Error) -> Fail {
        if e.is_connect() {
            Fail::service(format!(
                "cannot reach the gateway at {} (is it running? set VOLLEY_URL or --url)",
                self.base
            ))
        } else if e.is_timeout() {
            Fail::service(format!(
                "the gateway at {} did not answer in time",
                self.base
            ))
        } else {
            Fail::service(format!("request to {} failed: {e}", self.base))
        }
    }

    /// Reads an NDJSON answer (`GET path`, such as a batch's results) line by line as it
    /// arrives: one JSON value per line. Any status but 200 is an error naming what the server
    /// said; a 429 is waited out as in [`Api::send`].
    pub async fn ndjson(&self, path: &str) -> Result<Vec<Value>, Fail> {
        use futures::StreamExt;
        let mut attempt = 0;
        let r = loop {
            let r = self
                .http
                .get(format!("{}{path}", self.base))
                .bearer_auth(self.key()?)
                .send()
                .await
                .map_err(|e| self.transport(e))?;
            attempt += 1;
            if r.status() != StatusCode::TOO_MANY_REQUESTS || attempt >= RATE_LIMIT_ATTEMPTS {
                break r;
            }
            tokio::time::sleep(retry_after(r.headers())).await;
        };
        let status = r.status();
        if !status.is_success() {
            let text = r.text().await.map_err(|e| self.transport(e))?;
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            return Err(refused(&Reply {
                status,
                replayed: false,
                body,
            }));
        }
        let mut lines = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut stream = r.bytes_stream();
        let parse = |line: &[u8]| {
            serde_json::from_slice::<Value>(line)
                .map_err(|e| Fail::service(format!("{path}: a line is not JSON: {e}")))
        };
        while let Some(chunk) = stream.next().await {
            pending.extend_from_slice(&chunk.map_err(|e| self.transport(e))?);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if line.len() > 1 {
                    lines.push(parse(&line[..line.len() - 1])?);
                }
            }
        }
        if !pending.iter().all(u8::is_ascii_whitespace) {
            // The server ends every line; a partial one means the transfer broke off.
            return Err(Fail::service(format!("{path}: the answer ended mid-line")));
        }
        Ok(lines)
    }

    /// Downloads `url` (a signed media link), streaming into `file`; returns the bytes written
    /// and the length the server announced.
    pub async fn download(
        &self,
        url: &str,
        file: &mut tokio::fs::File,
    ) -> Result<(u64, Option<u64>), Fail> {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let r = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        if !r.status().is_success() {
            return Err(Fail::service(format!("{url}: HTTP {}", r.status())));
        }
        let expected = r.content_length();
        let mut written = 0u64;
        let mut stream = r.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.transport(e))?;
            file.write_all(&chunk)
                .await
                .map_err(|e| Fail::local(format!("writing a download: {e}")))?;
            written += chunk.len() as u64;
        }
        file.flush()
            .await
            .map_err(|e| Fail::local(format!("writing a download: {e}")))?;
        Ok((written, expected))
    }
}

/// How many times one request meets a 429 before the CLI reports it.
const RATE_LIMIT_ATTEMPTS: u32 = 8;

/// The wait a 429 asks for: its `Retry-After` in seconds, between 1 and 30 (a hostile or
/// confused server cannot park the CLI for hours).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Duration {
    let secs = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(secs.clamp(1, 30))
}

/// The error a non-success reply stands for, in the contract's words.
pub fn refused(r: &Reply) -> Fail {
    let kind = r.body["error"]["type"].as_str().unwrap_or("");
    let message = r.body["error"]["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| r.body.to_string());
    match r.status {
        StatusCode::UNAUTHORIZED => Fail::service(format!(
            "the API key was refused ({message}); check VOLLEY_API_KEY or --api-key"
        )),
        StatusCode::NOT_FOUND => Fail::usage(message),
        s if s.is_client_error() => {
            let mut m = format!("{kind} ({}): {message}", s.as_u16());
            if let Some(errs) = r.body["error"]["errors"].as_array() {
                for e in errs {
                    m.push_str(&format!(
                        "\n  {}: {}",
                        e["field"].as_str().unwrap_or(""),
                        e["message"].as_str().unwrap_or("")
                    ));
                }
            }
            Fail::usage(m)
        }
        s => Fail::service(format!("the gateway answered {}: {message}", s.as_u16())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};

    #[test]
    fn retry_after_is_bounded() {
        let wait = |v: Option<&'static str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = v {
                h.insert(RETRY_AFTER, HeaderValue::from_static(v));
            }
            retry_after(&h).as_secs()
        };
        assert_eq!(wait(None), 1);
        assert_eq!(wait(Some("3")), 3);
        assert_eq!(wait(Some("0")), 1);
        assert_eq!(wait(Some("999999")), 30);
        assert_eq!(wait(Some("Wed, 21 Oct 2015 07:28:00 GMT")), 1);
    }
}
