//! Local text-to-speech with espeak-ng: no network, WAV output.
//!
//! The program runs without a shell; the text goes in on stdin (so text starting with `-` is
//! never an option) and the WAV comes out in a temporary file, because on a pipe espeak-ng
//! cannot go back and write the sizes into the WAV header. The child is killed when the call
//! is dropped: on timeout, on cancellation, or when the worker stops.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::process::Command;
use volley_domain::Endpoint;

use super::media::Store;
use super::{Job, Output, Provider, ProviderError};

/// espeak-ng's own default speaking rate, in words per minute, for `speed` 1.0.
const BASE_WPM: f64 = 175.0;
/// espeak-ng accepts 80 to 450 words per minute.
const MIN_WPM: u32 = 80;
const MAX_WPM: u32 = 450;
const DEFAULT_VOICE: &str = "en-us";

/// OpenAI's voice names, mapped to espeak-ng voices and variants so that requests written
/// for OpenAI run unchanged: American or British English, with male (`m*`) or female (`f*`)
/// variants. Any other name must be an espeak-ng voice itself.
const OPENAI_VOICES: &[(&str, &str)] = &[
    ("alloy", "en-us"),
    ("ash", "en-us+m3"),
    ("ballad", "en-gb+m2"),
    ("coral", "en-us+f2"),
    ("echo", "en-us+m1"),
    ("fable", "en-gb"),
    ("onyx", "en-us+m7"),
    ("nova", "en-us+f3"),
    ("sage", "en-gb+f2"),
    ("shimmer", "en-us+f4"),
    ("verse", "en-gb+m3"),
];

fn invalid(message: String) -> ProviderError {
    ProviderError::fatal("invalid_request", message)
}

/// The espeak-ng voice for a request's `voice`: an OpenAI name, or an espeak-ng voice
/// (`en-gb`, `de`, `fr+f2`, `en-gb-x-rp`). Only letters, digits, `-` and one `+variant`
/// pass, so the value can never be read as another option or a path.
pub fn voice(requested: Option<&str>) -> Result<String, ProviderError> {
    let Some(v) = requested.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(DEFAULT_VOICE.to_owned());
    };
    let lower = v.to_ascii_lowercase();
    if let Some((_, mapped)) = OPENAI_VOICES.iter().find(|(name, _)| *name == lower) {
        return Ok((*mapped).to_owned());
    }
    let (lang, variant) = match v.split_once('+') {
        Some((l, var)) => (l, Some(var)),
        None => (v, None),
    };
    let lang_ok = lang.len() <= 40
        && lang.starts_with(|c: char| c.is_ascii_alphabetic())
        && lang.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    let variant_ok = variant.is_none_or(|var| {
        !var.is_empty()
            && var.len() <= 20
            && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    });
    if lang_ok && variant_ok {
        Ok(v.to_owned())
    } else {
        Err(invalid(format!(
            "voice {:?} is neither an OpenAI voice ({}) nor an espeak-ng voice name (letters, \
             digits and '-', optionally +variant, e.g. \"en-gb\" or \"de+f2\")",
            v.chars().take(64).collect::<String>(),
            OPENAI_VOICES
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

/// espeak-ng's words per minute for OpenAI's `speed` (0.25 to 4.0, 1.0 normal).
pub fn words_per_minute(speed: Option<f64>) -> u32 {
    let speed = speed.filter(|s| s.is_finite() && *s > 0.0).unwrap_or(1.0);
    ((BASE_WPM * speed).round() as u32).clamp(MIN_WPM, MAX_WPM)
}

pub async fn run(p: &Provider, job: &Job, store: &Store<'_>) -> Result<Output, ProviderError> {
    let name = &p.config.name;
    if job.endpoint != Endpoint::AudioSpeech {
        return Err(invalid(format!(
            "provider {name} (espeak-ng) only speaks text; it has no {}",
            job.endpoint
        )));
    }
    let input = job
        .body
        .get("input")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| invalid("`input` must be non-empty text".into()))?;
    match job.body.get("response_format").and_then(Value::as_str) {
        None | Some("wav") => {}
        Some(other) => {
            return Err(invalid(format!(
                "provider {name} (espeak-ng) produces WAV only; response_format {:?} is not \
                 available (use \"wav\" or leave it out)",
                other.chars().take(16).collect::<String>()
            )));
        }
    }
    let voice = voice(job.body.get("voice").and_then(Value::as_str))?;
    let wpm = words_per_minute(job.body.get("speed").and_then(Value::as_f64));

    let dir = tempfile::Builder::new()
        .prefix("volley-espeak-")
        .tempdir()
        .map_err(|e| ProviderError::retry(format!("{name}: cannot make a temporary file: {e}")))?;
    let wav = dir.path().join("speech.wav");
    let program = p.config.command();
    let mut child = Command::new(program)
        .arg("-v")
        .arg(&voice)
        .arg("-s")
        .arg(wpm.to_string())
        .arg("-w")
        .arg(&wav)
        .arg("--stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            // Another worker may have the program: retrying is the useful answer.
            ProviderError::retry(format!("{name}: cannot start {program:?}: {e}"))
        })?;

    let timeout = Duration::from_millis(p.config.timeout_ms);
    let synth = async {
        if let Some(mut stdin) = child.stdin.take() {
            // A child that exits early closes the pipe; its exit status says why.
            let _ = stdin.write_all(input.as_bytes()).await;
            let _ = stdin.write_all(b"\n").await;
            drop(stdin);
        }
        child.wait_with_output().await
    };
    // Dropping `synth` drops the child, which kills it (kill_on_drop).
    let out = match tokio::time::timeout(timeout, synth).await {
        Err(_) => {
            return Err(ProviderError::retry(format!(
                "{name}: espeak-ng did not finish within {} ms",
                p.config.timeout_ms
            )));
        }
        Ok(Err(e)) => {
            return Err(ProviderError::retry(format!(
                "{name}: waiting for espeak-ng: {e}"
            )));
        }
        Ok(Ok(out)) => out,
    };
    let stderr: String = String::from_utf8_lossy(&out.stderr)
        .trim()
        .chars()
        .take(300)
        .collect();
    match out.status.code() {
        Some(0) => {}
        Some(_) if stderr.contains("voice does not exist") => {
            return Err(invalid(format!(
                "espeak-ng has no voice {voice:?} (see `espeak-ng --voices`)"
            )));
        }
        Some(code) => {
            return Err(ProviderError::fatal(
                "provider_error",
                format!("{name}: espeak-ng failed (exit code {code}): {stderr}"),
            ));
        }
        // Killed by a signal (out of memory, an operator): worth another attempt.
        None => {
            return Err(ProviderError::retry(format!(
                "{name}: espeak-ng was killed ({}) {stderr}",
                out.status
            )));
        }
    }

    let meta = tokio::fs::metadata(&wav).await.map_err(|e| {
        ProviderError::fatal(
            "provider_error",
            format!("{name}: espeak-ng wrote no audio: {e}"),
        )
    })?;
    if meta.len() > store.media.max_bytes() {
        return Err(ProviderError::fatal(
            "media_too_large",
            format!(
                "the speech is larger than the {} byte limit",
                store.media.max_bytes()
            ),
        ));
    }
    let read_err = |e: std::io::Error| {
        ProviderError::retry(format!("{name}: reading espeak-ng's output: {e}"))
    };
    let mut file = tokio::fs::File::open(&wav).await.map_err(read_err)?;
    let mut head = [0u8; 12];
    let is_wav = file.read_exact(&mut head).await.is_ok()
        && &head[0..4] == b"RIFF"
        && &head[8..12] == b"WAVE";
    if !is_wav {
        return Err(ProviderError::fatal(
            "provider_error",
            format!("{name}: espeak-ng's output is not a WAV file"),
        ));
    }
    file.rewind().await.map_err(read_err)?;
    let entry = store
        .stream(0, "audio/wav", tokio_util::io::ReaderStream::new(file))
        .await?;
    Ok(Output {
        result: json!({
            "object": "audio",
            "model": job.model,
            "voice": voice,
            "words_per_minute": wpm,
            "data": [entry],
        }),
        usage: None,
        media_keys: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use serde_json::json;
    use tokio_util::sync::CancellationToken;
    use volley_config::Settings;
    use volley_media::MediaStore;

    use super::*;
    use crate::providers::Providers;

    #[test]
    fn voices_map_or_pass_through_safely() {
        assert_eq!(voice(None).unwrap(), "en-us");
        assert_eq!(voice(Some("  ")).unwrap(), "en-us");
        assert_eq!(voice(Some("alloy")).unwrap(), "en-us");
        assert_eq!(voice(Some("NOVA")).unwrap(), "en-us+f3");
        assert_eq!(voice(Some("fable")).unwrap(), "en-gb");
        for ok in ["en-gb", "de", "fr+f2", "en-gb-x-rp", "en-us+Alicia"] {
            assert_eq!(voice(Some(ok)).unwrap(), ok);
        }
        for bad in [
            "-w/tmp/x",
            "../en",
            "en gb",
            "en+",
            "en+f2+m3",
            "en;rm",
            "1en",
            "en/us",
            "é",
            &"a".repeat(41),
        ] {
            let e = voice(Some(bad)).unwrap_err();
            assert!(
                matches!(&e, ProviderError::Fatal { error_type: "invalid_request", message }
                    if message.contains("neither an OpenAI voice")),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn speed_maps_to_words_per_minute() {
        assert_eq!(words_per_minute(None), 175);
        assert_eq!(words_per_minute(Some(1.0)), 175);
        assert_eq!(words_per_minute(Some(2.0)), 350);
        assert_eq!(words_per_minute(Some(4.0)), 450);
        assert_eq!(words_per_minute(Some(0.25)), 80);
        assert_eq!(words_per_minute(Some(f64::NAN)), 175);
        assert_eq!(words_per_minute(Some(-1.0)), 175);
    }

    fn providers(dir: &Path, command: &str, timeout_ms: u64) -> Providers {
        let toml = format!(
            "[[providers]]\nname = 'say'\nkind = 'espeak'\ncommand = '{command}'\n\
             timeout_ms = {timeout_ms}\nmax_concurrency = 2\n\
             [[models]]\nname = 'say'\nendpoints = ['/v1/audio/speech']\n\
             routes = [{{ provider = 'say' }}]\n"
        );
        let s = Settings::from_toml(&toml).unwrap();
        s.validate().unwrap();
        let media = MediaStore::local(dir.join("media").to_str().unwrap(), 10_000_000).unwrap();
        Providers::new(Arc::new(s), media).unwrap()
    }

    fn job(body: serde_json::Value) -> Job {
        Job {
            id: 7,
            batch_id: 1,
            attempt: 1,
            endpoint: Endpoint::AudioSpeech,
            model: "say".into(),
            body,
        }
    }

    #[tokio::test]
    async fn real_espeak_ng_makes_a_wav() {
        let dir = tempfile::tempdir().unwrap();
        let p = providers(dir.path(), "espeak-ng", 30_000);
        let out = p
            .run(
                &job(json!({"model": "say", "input": "-v is just text", "voice": "onyx", "speed": 1.2})),
                &CancellationToken::new(),
            )
            .await
            .unwrap();
        let d = &out.result["data"][0];
        assert_eq!(d["content_type"], "audio/wav");
        assert_eq!(out.result["voice"], "en-us+m7");
        assert_eq!(out.result["words_per_minute"], 210);
        let key = d["url"]
            .as_str()
            .unwrap()
            .strip_prefix("volley-media:")
            .unwrap();
        let wav = std::fs::read(dir.path().join("media").join(key)).unwrap();
        assert_eq!(d["bytes"], wav.len() as u64);
        assert!(wav.starts_with(b"RIFF") && &wav[8..12] == b"WAVE");
        // The sizes in the header are right (a file, not a pipe, was written).
        let riff = u32::from_le_bytes(wav[4..8].try_into().unwrap()) as usize;
        assert_eq!(riff + 8, wav.len());

        let e = p
            .run(
                &job(json!({"input": "hi", "voice": "zz-nope"})),
                &CancellationToken::new(),
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("has no voice \"zz-nope\""), "{e}");
        let e = p
            .run(
                &job(json!({"input": "hi", "response_format": "opus"})),
                &CancellationToken::new(),
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("WAV only"), "{e}");
    }

    #[tokio::test]
    async fn a_missing_program_is_retryable_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let p = providers(dir.path(), "volley-no-such-espeak", 1_000);
        let e = p
            .run(&job(json!({"input": "hi"})), &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ProviderError::Retryable { message, .. }
                if message.contains("cannot start \"volley-no-such-espeak\"")),
            "{e:?}"
        );
    }

    /// A program that records its pid and hangs, standing in for a stuck espeak-ng.
    fn hanging(dir: &Path) -> (String, std::path::PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let pid = dir.join("pid");
        let script = dir.join("hang.sh");
        std::fs::write(
            &script,
            format!("#!/bin/sh\necho $$ > '{}'\nexec sleep 60\n", pid.display()),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        (script.to_string_lossy().into_owned(), pid)
    }

    async fn child_pid(file: &Path) -> u32 {
        for _ in 0..200 {
            if let Some(pid) = std::fs::read_to_string(file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the program never started");
    }

    fn alive(pid: u32) -> bool {
        // A killed child may linger as a zombie until reaped: that does not run.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit(')')
                    .next()
                    .map(|r| r.trim_start().starts_with(['Z', 'X']))
            })
            .is_some_and(|zombie| !zombie)
    }

    async fn wait_dead(pid: u32) {
        for _ in 0..200 {
            if !alive(pid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("process {pid} still runs");
    }

    #[tokio::test]
    async fn cancellation_and_timeouts_kill_the_program() {
        let dir = tempfile::tempdir().unwrap();
        let (script, pid_file) = hanging(dir.path());
        let p = Arc::new(providers(dir.path(), &script, 60_000));
        let cancel = CancellationToken::new();
        let run = tokio::spawn({
            let (p, cancel) = (p.clone(), cancel.clone());
            async move { p.run(&job(json!({"input": "hi"})), &cancel).await }
        });
        let pid = child_pid(&pid_file).await;
        assert!(alive(pid));
        cancel.cancel();
        assert_eq!(run.await.unwrap().unwrap_err(), ProviderError::Cancelled);
        wait_dead(pid).await;

        std::fs::remove_file(&pid_file).unwrap();
        let p = providers(dir.path(), &script, 200);
        let e = p
            .run(&job(json!({"input": "hi"})), &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ProviderError::Retryable { message, .. }
                if message.contains("did not finish within 200 ms")),
            "{e:?}"
        );
        wait_dead(child_pid(&pid_file).await).await;
    }
}
