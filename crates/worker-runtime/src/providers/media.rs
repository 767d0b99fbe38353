//! Moving provider media into Volley's store, streamed and capped.

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use volley_media::{MediaError, MediaStore, extension_for, job_media_key, media_ref};

use super::{Job, Provider, ProviderError};

pub(crate) struct Store<'a> {
    pub media: &'a MediaStore,
    pub job: &'a Job,
    /// Keys stored so far in this attempt: the outcome carries them, and only they may
    /// become links (the rest of a result is provider text).
    keys: std::sync::Mutex<Vec<String>>,
}

fn media_error(e: MediaError) -> ProviderError {
    match e {
        MediaError::TooLarge { max } => ProviderError::fatal(
            "media_too_large",
            format!("the provider's media is larger than the {max} byte limit"),
        ),
        MediaError::Source(m) => ProviderError::retry(format!("downloading media: {m}")),
        other => ProviderError::retry(format!("storing media: {other}")),
    }
}

impl<'a> Store<'a> {
    pub fn new(media: &'a MediaStore, job: &'a Job) -> Store<'a> {
        Store {
            media,
            job,
            keys: Default::default(),
        }
    }

    /// The keys this attempt stored, in order.
    pub(crate) fn take_keys(&self) -> Vec<String> {
        std::mem::take(&mut *self.keys.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn key(&self, i: usize, content_type: &str) -> String {
        job_media_key(
            self.job.batch_id,
            self.job.id,
            self.job.attempt,
            i,
            extension_for(content_type),
        )
    }

    /// The result entry for stored media; records the key as this attempt's.
    fn entry(&self, key: String, content_type: &str, bytes: u64) -> Value {
        let v = json!({"url": media_ref(&key), "content_type": content_type, "bytes": bytes});
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(key);
        v
    }

    /// Streams a provider's response body into the store.
    pub async fn response(
        &self,
        i: usize,
        resp: reqwest::Response,
        fallback_type: &str,
    ) -> Result<Value, ProviderError> {
        let ct = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned())
            .filter(|v| !v.is_empty() && v != "application/octet-stream")
            .unwrap_or_else(|| fallback_type.to_owned());
        if let Some(len) = resp.content_length()
            && len > self.media.max_bytes()
        {
            return Err(media_error(MediaError::TooLarge {
                max: self.media.max_bytes(),
            }));
        }
        let key = self.key(i, &ct);
        let n = self
            .media
            .put_stream(
                &key,
                resp.bytes_stream().map(|c| c.map_err(|e| e.to_string())),
            )
            .await
            .map_err(media_error)?;
        Ok(self.entry(key, &ct, n))
    }

    /// Downloads a media URL the provider returned, if the provider's egress policy allows
    /// it (a tenant's prompt may have chosen the link): refused links fail the job, unread.
    pub async fn url(
        &self,
        p: &Provider,
        i: usize,
        url: &str,
        fallback_type: &str,
    ) -> Result<Value, ProviderError> {
        let (policy, http) = p.media();
        let refused = |e: &volley_egress::Refused| {
            ProviderError::fatal(
                "media_refused",
                format!("{}: refused to fetch a media link: {e}", p.config.name),
            )
        };
        let url = policy.parse_url(url).map_err(|e| refused(&e))?;
        let resp = http
            .get(url)
            .send()
            .await
            .map_err(|e| match volley_egress::refusal(&e) {
                // A name that did not resolve may resolve next time: worth a retry.
                Some(r @ volley_egress::Refused::Resolve { .. }) => {
                    ProviderError::retry(format!("downloading media: {r}"))
                }
                Some(r) => refused(r),
                None => ProviderError::retry(format!("downloading media: {e}")),
            })?;
        if !resp.status().is_success() {
            return Err(ProviderError::retry(format!(
                "downloading media: HTTP {}",
                resp.status().as_u16()
            )));
        }
        self.response(i, resp, fallback_type).await
    }

    /// Streams bytes Volley produced itself (a local engine's output file) into the store.
    pub async fn stream<S, E>(
        &self,
        i: usize,
        content_type: &str,
        body: S,
    ) -> Result<Value, ProviderError>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let key = self.key(i, content_type);
        let n = self
            .media
            .put_stream(&key, body)
            .await
            .map_err(media_error)?;
        Ok(self.entry(key, content_type, n))
    }

    pub async fn bytes(
        &self,
        i: usize,
        content_type: &str,
        body: Bytes,
    ) -> Result<Value, ProviderError> {
        let key = self.key(i, content_type);
        let n = self
            .media
            .put_bytes(&key, body)
            .await
            .map_err(media_error)?;
        Ok(self.entry(key, content_type, n))
    }
}
