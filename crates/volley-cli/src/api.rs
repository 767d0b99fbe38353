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

    /// Sends a request and returns whatever status came back; only transport errors fail.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        idempotency_key: Option<&str>,
        auth: bool,
    ) -> Result<Reply, Fail> {
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
        let replayed = r
            .headers()
            .get("Idempotent-Replayed")
            .is_some_and(|v| v.as_bytes() == b"true");
        let text = r.text().await.map_err(|e| self.transport(e))?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Reply {
            status,
            replayed,
            body,
        })
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

    pub fn transport(&self, e: reqwest::Error) -> Fail {
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
