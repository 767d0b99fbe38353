//! Media results are ours: workers stream provider media into an object store (a local
//! directory by default, S3-compatible by configuration) and job results refer to it as
//! `volley-media:<key>`. The gateway turns the references the job's worker stored (and no
//! other string, whatever it looks like) into URLs bound to the job and signed afresh on every
//! read, so a result fetched tomorrow still has a working link.

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use hmac::{Hmac, Mac};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions,
    PutPayload, WriteMultipart,
};
use serde_json::Value;
use sha2::Sha256;
use volley_config::{MediaSettings, MediaStoreKind, S3Settings};

/// Media up to this size is stored with one `put`; larger media is uploaded in parts.
const SMALL_OBJECT: u64 = 4 * 1024 * 1024;

/// Prefix of a media reference inside a stored job result.
const SCHEME: &str = "volley-media:";

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("media is larger than the {max} byte limit")]
    TooLarge { max: u64 },
    #[error("media key {0:?} is not valid")]
    BadKey(String),
    #[error("media not found")]
    NotFound,
    #[error("media store: {0}")]
    Store(String),
    #[error("reading media from the provider: {0}")]
    Source(String),
}

impl From<object_store::Error> for MediaError {
    fn from(e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { .. } => MediaError::NotFound,
            other => MediaError::Store(other.to_string()),
        }
    }
}

#[derive(Clone)]
pub struct MediaStore {
    store: Arc<dyn ObjectStore>,
    max_bytes: u64,
    /// Whether objects carry their content type (S3 does; the local store cannot). Volley
    /// serves media with the type from the key's extension either way.
    content_types: bool,
    /// The local store's one-shot writes, on a thread of their own (see [`LocalWriter`]).
    writer: Option<LocalWriter>,
}

/// A local `put` is a few blocking file calls. On the runtime's blocking pool each one woke
/// a pool thread, often a new one (a worker grew to 60 threads), and a wake-up costs more
/// than the write on a small virtual machine. One thread takes the writes in turn and, while
/// busy, takes the next without sleeping. Large media (uploaded in parts) keeps the pool.
#[derive(Clone)]
struct LocalWriter {
    tx: tokio::sync::mpsc::Sender<Write>,
}

struct Write {
    path: Path,
    payload: PutPayload,
    done: tokio::sync::oneshot::Sender<object_store::Result<object_store::PutResult>>,
}

/// Writes waiting for the writer thread; senders wait beyond this.
const WRITES_QUEUED: usize = 64;

impl LocalWriter {
    fn start(store: Arc<dyn ObjectStore>) -> Result<LocalWriter, MediaError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Write>(WRITES_QUEUED);
        // Off the runtime, object_store's local calls run on the calling thread itself. The
        // thread ends when the last store handle is dropped.
        std::thread::Builder::new()
            .name("media-writer".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                while let Some(w) = rx.blocking_recv() {
                    let r = futures::executor::block_on(store.put(&w.path, w.payload));
                    let _ = w.done.send(r);
                }
            })
            .map_err(|e| MediaError::Store(format!("cannot start the media writer: {e}")))?;
        Ok(LocalWriter { tx })
    }

    async fn put(&self, path: Path, payload: PutPayload) -> Result<(), MediaError> {
        let stopped = || MediaError::Store("the media writer has stopped".into());
        let (done, result) = tokio::sync::oneshot::channel();
        self.tx
            .send(Write {
                path,
                payload,
                done,
            })
            .await
            .map_err(|_| stopped())?;
        result.await.map_err(|_| stopped())??;
        Ok(())
    }
}

/// Keys are made by workers, but they arrive back through URLs: accept only a safe alphabet
/// and no `..`, so a request can never name anything outside the store.
fn check_key(key: &str) -> Result<(), MediaError> {
    let ok = !key.is_empty()
        && key.len() <= 512
        && !key.starts_with('/')
        && !key
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if ok {
        Ok(())
    } else {
        Err(MediaError::BadKey(key.chars().take(80).collect()))
    }
}

/// An S3 client for the settings. Builds without touching the network; credentials left
/// empty come from the `AWS_*` variables or the instance/pod role when first needed.
fn s3_builder(s3: &S3Settings) -> AmazonS3Builder {
    let mut b = AmazonS3Builder::from_env().with_bucket_name(&s3.bucket);
    if !s3.region.is_empty() {
        b = b.with_region(&s3.region);
    }
    if !s3.endpoint.is_empty() {
        // MinIO and most self-hosted servers want path-style URLs and may run plain HTTP
        // inside a cluster.
        b = b
            .with_endpoint(&s3.endpoint)
            .with_allow_http(s3.endpoint.starts_with("http://"))
            .with_virtual_hosted_style_request(false);
    }
    if !s3.access_key_id.is_empty() {
        b = b
            .with_access_key_id(s3.access_key_id.expose())
            .with_secret_access_key(s3.secret_access_key.expose());
    }
    b
}

impl MediaStore {
    /// The store the settings name: a local directory (default) or an S3-compatible bucket.
    pub fn from_settings(m: &MediaSettings) -> Result<MediaStore, MediaError> {
        match m.store {
            MediaStoreKind::Local => MediaStore::local(&m.dir, m.max_bytes),
            MediaStoreKind::S3 => {
                let s3 = s3_builder(&m.s3)
                    .build()
                    .map_err(|e| MediaError::Store(format!("S3 bucket {:?}: {e}", m.s3.bucket)))?;
                let mut store = MediaStore::with_store(Arc::new(s3), m.max_bytes);
                store.content_types = true;
                Ok(store)
            }
        }
    }

    pub fn local(dir: &str, max_bytes: u64) -> Result<MediaStore, MediaError> {
        std::fs::create_dir_all(dir).map_err(|e| MediaError::Store(format!("{dir}: {e}")))?;
        let fs: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(dir)?);
        let mut store = MediaStore::with_store(fs.clone(), max_bytes);
        store.writer = Some(LocalWriter::start(fs)?);
        Ok(store)
    }

    fn with_store(store: Arc<dyn ObjectStore>, max_bytes: u64) -> MediaStore {
        MediaStore {
            store,
            max_bytes,
            content_types: false,
            writer: None,
        }
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Streams `body` into the store under `key`. Media up to `SMALL_OBJECT` bytes is
    /// written with one `put` (one file write and rename locally, one request on S3); larger
    /// media goes up in parts, never holding more than a few parts in memory. Over the size
    /// cap, the upload is aborted and nothing is left behind.
    pub async fn put_stream<S, E>(&self, key: &str, body: S) -> Result<u64, MediaError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        check_key(key)?;
        let path = Path::from(key);
        let attributes = if self.content_types {
            Attributes::from_iter([(Attribute::ContentType, content_type_for(key))])
        } else {
            Attributes::new()
        };
        let mut body = std::pin::pin!(body);
        let mut n: u64 = 0;
        let mut head: Vec<Bytes> = Vec::new();
        // Small media, the usual case: gathered, then one put.
        loop {
            let Some(chunk) = body.next().await else {
                let payload = PutPayload::from_iter(head);
                match &self.writer {
                    // The local store keeps no attributes.
                    Some(w) => w.put(path, payload).await?,
                    None => {
                        let opts = PutOptions {
                            attributes,
                            ..Default::default()
                        };
                        self.store.put_opts(&path, payload, opts).await?;
                    }
                }
                return Ok(n);
            };
            let chunk = chunk.map_err(|e| MediaError::Source(e.to_string()))?;
            n += chunk.len() as u64;
            if n > self.max_bytes {
                return Err(MediaError::TooLarge {
                    max: self.max_bytes,
                });
            }
            head.push(chunk);
            if n > SMALL_OBJECT {
                break;
            }
        }
        let opts = PutMultipartOptions {
            attributes,
            ..Default::default()
        };
        let upload = self.store.put_multipart_opts(&path, opts).await?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, 1024 * 1024);
        for chunk in head {
            w.put(chunk);
        }
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = w.abort().await;
                    return Err(MediaError::Source(e.to_string()));
                }
            };
            n += chunk.len() as u64;
            if n > self.max_bytes {
                let _ = w.abort().await;
                return Err(MediaError::TooLarge {
                    max: self.max_bytes,
                });
            }
            w.wait_for_capacity(4).await?;
            w.put(chunk);
        }
        w.finish().await?;
        Ok(n)
    }

    pub async fn put_bytes(&self, key: &str, body: Bytes) -> Result<u64, MediaError> {
        self.put_stream(
            key,
            futures::stream::once(async move { Ok::<_, MediaError>(body) }),
        )
        .await
    }

    /// The object's size and a stream of its bytes.
    pub async fn get(
        &self,
        key: &str,
    ) -> Result<(u64, BoxStream<'static, Result<Bytes, MediaError>>), MediaError> {
        check_key(key)?;
        let r = self.store.get(&Path::from(key)).await?;
        let size = r.meta.size;
        Ok((
            size,
            r.into_stream().map(|c| c.map_err(MediaError::from)).boxed(),
        ))
    }
}

/// The content type of a stored object, from its extension.
pub fn content_type_for(key: &str) -> &'static str {
    match key.rsplit_once('.').map(|(_, e)| e) {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("wav") => "audio/wav",
        Some("mp3") => "audio/mpeg",
        Some("ogg" | "opus") => "audio/ogg",
        Some("flac") => "audio/flac",
        Some("mp4") => "video/mp4",
        Some("webm") => "video/webm",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

/// The extension to store a provider's media under, from its content type.
pub fn extension_for(content_type: &str) -> &'static str {
    let ct = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match ct.as_str() {
        "image/png" => "png",
        "image/jpeg" => "jpg",
        "image/webp" => "webp",
        "image/gif" => "gif",
        "audio/wav" | "audio/x-wav" | "audio/wave" => "wav",
        "audio/mpeg" | "audio/mp3" => "mp3",
        "audio/ogg" | "audio/opus" => "ogg",
        "audio/flac" => "flac",
        "video/mp4" => "mp4",
        "video/webm" => "webm",
        _ => "bin",
    }
}

pub fn media_ref(key: &str) -> String {
    format!("{SCHEME}{key}")
}

/// The key a worker stores a job's `i`-th media under, for attempt `attempt`. One folder per
/// batch, not per job: on a local disk a folder costs an inode allocation, which under load
/// cost more than writing the file. The 128 random bits make keys unguessable, so knowing
/// one job's key says nothing about another's.
pub fn job_media_key(batch_id: i64, job_id: i64, attempt: i32, i: usize, ext: &str) -> String {
    let nonce: u128 = rand::random();
    format!("batches/{batch_id}/{job_id}-a{attempt}-{i}-{nonce:032x}.{ext}")
}

/// Whether `key` is in job `job_id`'s part of the store (`batches/<batch>/<job>-a...`).
pub fn key_belongs_to_job(key: &str, job_id: i64) -> bool {
    let mut parts = key.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("batches"), Some(batch), Some(file), None) => {
            !batch.is_empty()
                && batch.bytes().all(|b| b.is_ascii_digit())
                && file
                    .strip_prefix(&job_id.to_string())
                    .is_some_and(|rest| rest.starts_with("-a"))
        }
        _ => false,
    }
}

/// Replaces `volley-media:<key>` strings inside `v` with `f(key)`, but only for keys in
/// `keys` (the media the job's worker stored). A result is mostly provider text: any other
/// string that merely looks like a reference stays as it is.
pub fn rewrite_refs(v: &mut Value, keys: &[String], f: &dyn Fn(&str) -> String) {
    if keys.is_empty() {
        return;
    }
    match v {
        Value::String(s) => {
            if let Some(key) = s.strip_prefix(SCHEME)
                && keys.iter().any(|k| k == key)
            {
                *s = f(key);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| rewrite_refs(i, keys, f)),
        Value::Object(map) => map.values_mut().for_each(|i| rewrite_refs(i, keys, f)),
        _ => {}
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("the link has expired")]
    Expired,
    #[error("the link's signature is not valid")]
    BadSignature,
    #[error("the link's expiry is further ahead than links are ever issued for")]
    TooFarAhead,
    #[error("the media does not belong to the link's job")]
    WrongJob,
}

/// Signs and checks media URLs with HMAC-SHA256 over a version tag, the job id, the key and
/// the expiry time: a link opens one job's media only, until its expiry.
#[derive(Clone)]
pub struct Signer {
    secret: Vec<u8>,
}

type HmacSha256 = Hmac<Sha256>;

/// Expiries may run this far past `now + ttl` (clock skew between gateway replicas).
const EXPIRY_SLACK_SECS: i64 = 60;

/// Names the signed message's layout, so no other layout's MAC can ever verify as this one.
const LINK_VERSION: &[u8] = b"volley-media-v2";

impl Signer {
    pub fn new(secret: &[u8]) -> Signer {
        Signer {
            secret: secret.to_vec(),
        }
    }

    fn mac(&self, job_id: i64, key: &str, expires: i64) -> HmacSha256 {
        // HMAC takes a key of any length, so this cannot fail.
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        // Newline-separated: no part can contain one (keys pass `check_key`).
        for part in [
            LINK_VERSION,
            job_id.to_string().as_bytes(),
            key.as_bytes(),
            expires.to_string().as_bytes(),
        ] {
            m.update(part);
            m.update(b"\n");
        }
        m
    }

    pub fn sign(&self, job_id: i64, key: &str, expires: i64) -> String {
        hex::encode(self.mac(job_id, key, expires).finalize().into_bytes())
    }

    /// `{base}/v1/media/{key}?job={job_id}&expires=..&sig=..`
    pub fn url(&self, base: &str, job_id: i64, key: &str, expires: i64) -> String {
        format!(
            "{}/v1/media/{key}?job={job_id}&expires={expires}&sig={}",
            base.trim_end_matches('/'),
            self.sign(job_id, key, expires)
        )
    }

    /// Checks a link: the key lies in the job's part of the store, the signature covers job,
    /// key and expiry, the expiry has not passed and is no further ahead than `ttl_secs` (plus
    /// `EXPIRY_SLACK_SECS`) from `now`, which is as far as links are ever issued.
    pub fn verify(
        &self,
        job_id: i64,
        key: &str,
        expires: i64,
        sig: &str,
        now: i64,
        ttl_secs: i64,
    ) -> Result<(), SignError> {
        if !key_belongs_to_job(key, job_id) {
            return Err(SignError::WrongJob);
        }
        let raw = hex::decode(sig).map_err(|_| SignError::BadSignature)?;
        // Constant-time comparison.
        self.mac(job_id, key, expires)
            .verify_slice(&raw)
            .map_err(|_| SignError::BadSignature)?;
        if now > expires {
            return Err(SignError::Expired);
        }
        if expires
            > now
                .saturating_add(ttl_secs)
                .saturating_add(EXPIRY_SLACK_SECS)
        {
            return Err(SignError::TooFarAhead);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_cannot_escape() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a b",
            "a\0b",
            "a/./b",
        ] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
        check_key("jobs/43/1-0.png").unwrap();
    }

    #[test]
    fn signatures() {
        let s = Signer::new(b"k");
        let key = "batches/7/42-a1-0-00ff.png";
        let sig = s.sign(42, key, 100);
        assert!(
            s.url("http://x/", 42, key, 100).starts_with(
                "http://x/v1/media/batches/7/42-a1-0-00ff.png?job=42&expires=100&sig="
            )
        );
        assert_eq!(s.verify(42, key, 100, &sig, 50, 3600), Ok(()));
        assert_eq!(
            s.verify(42, key, 100, &sig, 101, 3600),
            Err(SignError::Expired)
        );
        assert_eq!(
            s.verify(42, "batches/7/42-a1-1-00ff.png", 100, &sig, 50, 3600),
            Err(SignError::BadSignature)
        );
        assert_eq!(
            s.verify(42, key, 1000, &sig, 50, 3600),
            Err(SignError::BadSignature),
            "a longer expiry is a different signature"
        );
        assert_eq!(
            s.verify(42, key, 100, "zz", 50, 3600),
            Err(SignError::BadSignature)
        );
        assert!(
            Signer::new(b"other")
                .verify(42, key, 100, &sig, 50, 3600)
                .is_err()
        );
        // Another job's id: its media lies elsewhere, and the signature names the job.
        assert_eq!(
            s.verify(43, key, 100, &sig, 50, 3600),
            Err(SignError::WrongJob)
        );
        let other = "batches/7/43-a1-0-00ff.png";
        assert_eq!(
            s.verify(43, other, 100, &s.sign(42, other, 100), 50, 3600),
            Err(SignError::BadSignature),
            "a signature made for job 42 does not open job 43's media"
        );
        // An expiry decades ahead, even validly signed, is refused.
        let far = 50 + 3600 + EXPIRY_SLACK_SECS + 1;
        assert_eq!(
            s.verify(42, key, far, &s.sign(42, key, far), 50, 3600),
            Err(SignError::TooFarAhead)
        );
        let edge = 50 + 3600 + EXPIRY_SLACK_SECS;
        assert_eq!(
            s.verify(42, key, edge, &s.sign(42, key, edge), 50, 3600),
            Ok(())
        );
    }

    #[test]
    fn keys_are_unguessable_and_bound_to_their_job() {
        let a = job_media_key(7, 42, 2, 0, "png");
        let b = job_media_key(7, 42, 2, 0, "png");
        assert_ne!(a, b);
        assert!(
            a.starts_with("batches/7/42-a2-0-") && a.ends_with(".png"),
            "{a}"
        );
        assert_eq!(a.len(), "batches/7/42-a2-0-".len() + 32 + ".png".len());
        check_key(&a).unwrap();
        assert!(key_belongs_to_job(&a, 42));
        for (key, job) in [
            (a.as_str(), 4),
            (a.as_str(), 420),
            ("batches/7/420-a1-0-x.png", 42),
            ("batches/7/42.png", 42),
            ("jobs/7/42-a1-0.png", 42),
            ("batches/7/x/42-a1-0.png", 42),
            ("batches//42-a1-0.png", 42),
            ("batches/x/42-a1-0.png", 42),
        ] {
            assert!(!key_belongs_to_job(key, job), "{key} for {job}");
        }
    }

    #[test]
    fn rewrites_only_the_jobs_own_refs() {
        let mut v = json!({
            "data": [{"url": "volley-media:batches/1/2-a1-0-ab.png"}, {"url": "https://x"}],
            "choices": [{"message": {"content": "volley-media:batches/9/9-a1-0-cd.png"}}],
            "n": 1
        });
        let keys = vec!["batches/1/2-a1-0-ab.png".to_owned()];
        rewrite_refs(&mut v, &keys, &|k| format!("U({k})"));
        assert_eq!(v["data"][0]["url"], "U(batches/1/2-a1-0-ab.png)");
        assert_eq!(v["data"][1]["url"], "https://x");
        assert_eq!(
            v["choices"][0]["message"]["content"], "volley-media:batches/9/9-a1-0-cd.png",
            "a reference the worker did not store stays text"
        );
        let mut none = json!({"url": "volley-media:batches/1/2-a1-0-ab.png"});
        rewrite_refs(&mut none, &[], &|k| format!("U({k})"));
        assert_eq!(none["url"], "volley-media:batches/1/2-a1-0-ab.png");
    }

    #[test]
    fn s3_stores_build_from_settings_without_network() {
        let toml = r#"
[media]
store = "s3"
max_bytes = 1000
[media.s3]
bucket = "volley-media"
region = "eu-west-1"
endpoint = "http://127.0.0.1:9000"
access_key_id = "minio"
secret_access_key = "minio-secret"
"#;
        let s = volley_config::Settings::from_toml(toml).unwrap();
        s.validate().unwrap();
        let store = MediaStore::from_settings(&s.media).unwrap();
        assert_eq!(store.max_bytes(), 1000);
        assert!(store.content_types);
        let b = s3_builder(&s.media.s3);
        use object_store::aws::AmazonS3ConfigKey as K;
        assert_eq!(
            b.get_config_value(&K::Bucket).as_deref(),
            Some("volley-media")
        );
        assert_eq!(b.get_config_value(&K::Region).as_deref(), Some("eu-west-1"));
        assert_eq!(
            b.get_config_value(&K::Endpoint).as_deref(),
            Some("http://127.0.0.1:9000")
        );
        assert_eq!(
            b.get_config_value(&K::AccessKeyId).as_deref(),
            Some("minio")
        );
        assert_eq!(
            b.get_config_value(&K::VirtualHostedStyleRequest).as_deref(),
            Some("false")
        );

        // AWS itself: no endpoint, credentials from the environment or the instance.
        let mut m = s.media.clone();
        m.s3.endpoint.clear();
        m.s3.access_key_id = volley_config::Secret::default();
        m.s3.secret_access_key = volley_config::Secret::default();
        MediaStore::from_settings(&m).unwrap();

        // The default is the local directory.
        let dir = tempfile::tempdir().unwrap();
        let m = volley_config::MediaSettings {
            dir: dir.path().join("media").to_string_lossy().into_owned(),
            ..Default::default()
        };
        let local = MediaStore::from_settings(&m).unwrap();
        assert!(!local.content_types);
        assert!(dir.path().join("media").is_dir());
    }

    #[tokio::test]
    async fn streams_in_and_out_with_a_cap() {
        let dir = tempfile::tempdir().unwrap();
        let store = MediaStore::local(dir.path().to_str().unwrap(), 3 * 1024 * 1024).unwrap();
        let chunks: Vec<Result<Bytes, MediaError>> = (0..2)
            .map(|_| Ok(Bytes::from(vec![7u8; 1024 * 1024])))
            .collect();
        let n = store
            .put_stream("jobs/1/0.bin", futures::stream::iter(chunks))
            .await
            .unwrap();
        assert_eq!(n, 2 * 1024 * 1024);
        let (size, body) = store.get("jobs/1/0.bin").await.unwrap();
        assert_eq!(size, n);
        let got: Vec<Bytes> = body.map(|c| c.unwrap()).collect().await;
        assert_eq!(got.iter().map(|b| b.len() as u64).sum::<u64>(), n);

        let big: Vec<Result<Bytes, MediaError>> = (0..4)
            .map(|_| Ok(Bytes::from(vec![0u8; 1024 * 1024])))
            .collect();
        let e = store
            .put_stream("jobs/1/big.bin", futures::stream::iter(big))
            .await
            .unwrap_err();
        assert!(matches!(e, MediaError::TooLarge { .. }));
        assert!(matches!(
            store.get("jobs/1/big.bin").await,
            Err(MediaError::NotFound)
        ));
        assert!(matches!(
            store.get("../etc").await,
            Err(MediaError::BadKey(_))
        ));
    }

    /// The local store's one writer thread: many puts at once (more than it queues) each
    /// land whole under their own key, and a write the file system refuses comes back as an
    /// error to its caller.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_writes_queue_for_one_thread_and_report_failures() {
        let dir = tempfile::tempdir().unwrap();
        let store = MediaStore::local(dir.path().to_str().unwrap(), 1024 * 1024).unwrap();
        let n = WRITES_QUEUED * 3;
        let puts = (0..n).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let body = Bytes::from(vec![i as u8; 1000 + i]);
                store.put_bytes(&format!("b/{i}/m.bin"), body).await
            })
        });
        for (i, r) in futures::future::join_all(puts)
            .await
            .into_iter()
            .enumerate()
        {
            assert_eq!(r.unwrap().unwrap(), (1000 + i) as u64);
        }
        for i in 0..n {
            let got = std::fs::read(dir.path().join(format!("b/{i}/m.bin"))).unwrap();
            assert_eq!(got, vec![i as u8; 1000 + i], "file {i}");
        }
        // A file where the key needs a folder.
        let e = store
            .put_bytes("b/0/m.bin/x.bin", Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert!(matches!(e, MediaError::Store(_)), "{e}");
        store
            .put_bytes("b/after.bin", Bytes::from_static(b"ok"))
            .await
            .expect("the writer carries on after a failed write");
    }

    /// Media over [`SMALL_OBJECT`] goes up in parts: stored whole, or, over the cap or on a
    /// broken source, not at all; the small path refuses the same way.
    #[tokio::test]
    async fn large_media_goes_up_in_parts_and_failures_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mib = 1024 * 1024;
        let store = MediaStore::local(dir.path().to_str().unwrap(), 7 * mib).unwrap();
        let parts = |n: usize, fill: u8| -> Vec<Result<Bytes, String>> {
            (0..n)
                .map(|i| Ok(Bytes::from(vec![fill + i as u8; mib as usize])))
                .collect()
        };
        let n = store
            .put_stream("b/1/big.bin", futures::stream::iter(parts(6, 1)))
            .await
            .unwrap();
        assert_eq!(n, 6 * mib);
        assert!(n > SMALL_OBJECT);
        let (size, body) = store.get("b/1/big.bin").await.unwrap();
        assert_eq!(size, n);
        let got: Vec<u8> = body
            .map(|c| c.unwrap().to_vec())
            .collect::<Vec<_>>()
            .await
            .concat();
        let want: Vec<u8> = (0..6u8).flat_map(|i| vec![1 + i; mib as usize]).collect();
        assert!(got == want, "the parts arrive whole and in order");

        let e = store
            .put_stream("b/1/over.bin", futures::stream::iter(parts(8, 0)))
            .await
            .unwrap_err();
        assert!(matches!(e, MediaError::TooLarge { .. }));
        for (key, at) in [("b/1/broken-big.bin", 5), ("b/1/broken-small.bin", 1)] {
            let mut chunks = parts(at, 0);
            chunks.push(Err("connection reset".into()));
            let e = store
                .put_stream(key, futures::stream::iter(chunks))
                .await
                .unwrap_err();
            assert!(matches!(e, MediaError::Source(_)), "{e}");
        }
        let mut left: Vec<String> = std::fs::read_dir(dir.path().join("b/1"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec!["big.bin".to_owned()],
            "nothing else is left behind"
        );
    }
}
