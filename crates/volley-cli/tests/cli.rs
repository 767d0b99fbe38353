//! The real `volley` binary against the real stack (tests/harness: gateway, batch-state,
//! workers, RabbitMQ, PostgreSQL, the provider simulator).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use volley_harness::Stack;

const BIN: &str = env!("CARGO_BIN_EXE_volley");

/// Runs `volley ARGS` in `dir` against the stack, off the async executor.
async fn volley(s: &Stack, dir: &Path, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(args)
        .current_dir(dir)
        .env("VOLLEY_URL", &s.url)
        .env("VOLLEY_API_KEY", &s.key);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `n` requests cycling through every endpoint, each with a custom_id.
fn mixed(n: usize, extra: Value) -> String {
    let mut out = String::new();
    for i in 0..n {
        let (endpoint, mut body) = match i % 6 {
            0 => (
                "/v1/chat/completions",
                json!({"model": "qwen3-8b",
                  "messages": [{"role": "user", "content": format!("hello {i}")}]}),
            ),
            1 => (
                "/v1/completions",
                json!({"model": "qwen3-8b", "prompt": format!("p {i}")}),
            ),
            2 => (
                "/v1/images/generations",
                json!({"model": "flux-dev", "prompt": format!("lamp {i}")}),
            ),
            3 => (
                "/v1/videos/generations",
                json!({"model": "sim-video", "prompt": format!("waves {i}")}),
            ),
            4 => (
                "/v1/music/generations",
                json!({"model": "sim-music", "prompt": format!("jazz {i}")}),
            ),
            _ => (
                "/v1/audio/speech",
                json!({"model": "tts-1", "input": format!("number {i}"), "voice": "alloy"}),
            ),
        };
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        out.push_str(
            &json!({"custom_id": format!("item-{i:04}"), "endpoint": endpoint, "body": body})
                .to_string(),
        );
        out.push('\n');
    }
    out
}

async fn all_batches(s: &Stack) -> Vec<Value> {
    let (status, v) = s.get("/v1/batches").await;
    assert_eq!(status, 200, "{v}");
    v["data"].as_array().unwrap().clone()
}

/// Checks a downloaded media file is what its extension says, decoding PNGs fully.
fn check_media(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    match path.extension().and_then(|e| e.to_str()) {
        Some("png") => {
            let mut reader = png::Decoder::new(std::io::Cursor::new(&bytes))
                .read_info()
                .unwrap();
            let mut buf = vec![0; reader.output_buffer_size()];
            let info = reader.next_frame(&mut buf).unwrap();
            assert!(info.width > 0 && info.height > 0, "{}", path.display());
        }
        Some("wav") => {
            assert_eq!(&bytes[..4], b"RIFF", "{}", path.display());
            assert_eq!(&bytes[8..12], b"WAVE", "{}", path.display());
            let riff = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
            assert_eq!(riff + 8, bytes.len(), "{}: RIFF size", path.display());
        }
        Some("mp4") => assert_eq!(&bytes[4..8], b"ftyp", "{}", path.display()),
        other => panic!("unexpected media {other:?}: {}", path.display()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_mixed_lines_submitted_watched_and_downloaded() {
    let s = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("big.jsonl"), mixed(1000, json!({}))).unwrap();
    let started = Instant::now();

    let o = volley(&s, dir.path(), &["submit", "big.jsonl", "--label", "big"]).await;
    assert!(o.status.success(), "{}", text(&o));
    let batches = all_batches(&s).await;
    assert_eq!(batches.len(), 4, "256 + 256 + 256 + 232");
    let totals: i64 = batches.iter().map(|b| b["total"].as_i64().unwrap()).sum();
    assert_eq!(totals, 1000);

    let o = volley(&s, dir.path(), &["watch", "--interval", "0.3"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("done: 1000 jobs"),
        "{}",
        text(&o)
    );

    let o = volley(&s, dir.path(), &["results", "--out", "res", "--json"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["processed"], 1000, "{summary}");
    let res = dir.path().join("res");
    let lines: Vec<Value> = std::fs::read_to_string(res.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1000);
    let mut files = 0;
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["custom_id"], format!("item-{i:04}"), "input order");
        assert_eq!(l["status"], "PROCESSED");
        for f in l["files"].as_array().unwrap() {
            let name = f.as_str().unwrap();
            assert!(name.starts_with(&format!("item-{i:04}")), "{name}");
            check_media(&res.join(name));
            files += 1;
        }
        // Images, video, music and speech have media; chat and completions do not.
        assert_eq!(l["files"].as_array().unwrap().is_empty(), i % 6 < 2, "{l}");
    }
    assert_eq!(summary["downloaded"], files);

    // Resumable: nothing is fetched again; a missing file is.
    let victim = lines[2]["files"][0].as_str().unwrap().to_owned();
    std::fs::remove_file(res.join(&victim)).unwrap();
    let o = volley(&s, dir.path(), &["results", "--out", "res", "--json"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let again: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(again["downloaded"], 1, "{again}");
    check_media(&res.join(&victim));
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "{:?}",
        started.elapsed()
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_of_a_running_batch_list_finished_failed_and_unfinished_jobs_in_order() {
    let s = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let lines = [
        json!({"custom_id": "slow", "endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": "s", "sim_latency_ms": 120_000}}),
        json!({"custom_id": "img", "endpoint": "/v1/images/generations", "body": {"model": "flux-dev", "prompt": "lamp"}}),
        json!({"custom_id": "bad", "endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": "x", "sim_fail": "fatal"}}),
        json!({"endpoint": "/v1/chat/completions", "body": {"model": "qwen3-8b", "messages": [{"role": "user", "content": "hi"}]}}),
    ];
    let file: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.path().join("few.jsonl"), file).unwrap();
    let o = volley(&s, dir.path(), &["submit", "few.jsonl"]).await;
    assert!(o.status.success(), "{}", text(&o));
    let id = all_batches(&s).await[0]["id"].as_str().unwrap().to_owned();
    s.wait_batch(&id, Duration::from_secs(60), |b| {
        b["processed"] == 2 && b["failed"] == 1
    })
    .await;

    let o = volley(&s, dir.path(), &["results", "--out", "res", "--json"]).await;
    assert_eq!(o.status.code(), Some(1), "incomplete: {}", text(&o));
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (
            &summary["processed"],
            &summary["failed"],
            &summary["unfinished"]
        ),
        (&json!(2), &json!(1), &json!(1)),
        "{summary}"
    );
    let res = dir.path().join("res");
    let got: Vec<Value> = std::fs::read_to_string(res.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&Value> = got.iter().map(|l| &l["custom_id"]).collect();
    assert_eq!(
        ids,
        [&json!("slow"), &json!("img"), &json!("bad"), &Value::Null]
    );
    // The unfinished job, read on its own, has the same fields as the finished ones.
    assert!(matches!(
        got[0]["status"].as_str(),
        Some("QUEUED" | "PROCESSING")
    ));
    for l in &got {
        for k in [
            "job_id", "batch_id", "endpoint", "model", "status", "result", "error", "usage",
            "files",
        ] {
            assert!(l.as_object().unwrap().contains_key(k), "{k}: {l}");
        }
        assert_eq!(l["batch_id"], id.as_str());
    }
    assert_eq!(got[0]["endpoint"], "/v1/completions");
    assert!(got[0]["result"].is_null());
    assert_eq!(got[1]["status"], "PROCESSED");
    check_media(&res.join(got[1]["files"][0].as_str().unwrap()));
    assert_eq!(got[1]["files"][0], "img.png");
    assert_eq!(got[2]["status"], "FAILED");
    assert_eq!(got[2]["error"]["type"], "invalid_request");
    assert!(got[2]["result"].is_null());
    assert!(got[3]["usage"]["total_tokens"].as_i64().unwrap() > 0);
    assert!(got[3]["job_id"].is_string());
    s.post_empty(&format!("/v1/batches/{id}/cancel")).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_submit_resumes_without_duplicates() {
    let s = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f.jsonl"), mixed(600, json!({}))).unwrap();

    // Dies after the gateway accepted the second chunk, before recording it.
    let o = volley(
        &s,
        dir.path(),
        &[
            "submit",
            "f.jsonl",
            "--concurrency",
            "1",
            "--crash-after-chunks",
            "2",
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(70), "{}", text(&o));
    assert_eq!(all_batches(&s).await.len(), 2);
    let state: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("f.jsonl.volley-state.json")).unwrap(),
    )
    .unwrap();
    let recorded = state["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["batch_id"].is_string())
        .count();
    assert_eq!(recorded, 1, "{state}");

    let o = volley(&s, dir.path(), &["submit", "f.jsonl"]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("already accepted before"), "{}", text(&o));
    let batches = all_batches(&s).await;
    assert_eq!(batches.len(), 3, "no chunk submitted twice");
    let totals: i64 = batches.iter().map(|b| b["total"].as_i64().unwrap()).sum();
    assert_eq!(totals, 600);

    // A third run has nothing left to send.
    let o = volley(&s, dir.path(), &["submit", "f.jsonl"]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(all_batches(&s).await.len(), 3);

    // Even with the state file gone the keys hold: the same options replay every chunk...
    std::fs::remove_file(dir.path().join("f.jsonl.volley-state.json")).unwrap();
    let o = volley(&s, dir.path(), &["submit", "f.jsonl"]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        text(&o).matches("already accepted before").count(),
        3,
        "{}",
        text(&o)
    );
    // ...and other options are refused rather than submitted twice.
    std::fs::remove_file(dir.path().join("f.jsonl.volley-state.json")).unwrap();
    let o = volley(&s, dir.path(), &["submit", "f.jsonl", "--label", "other"]).await;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("submitted in the last 24 hours"),
        "{}",
        text(&o)
    );
    assert_eq!(all_batches(&s).await.len(), 3);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_and_bad_setups_are_reported_before_anything_is_created() {
    let s = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut f = mixed(300, json!({}));
    f.push_str("{not json\n");
    f.push_str(r#"{"endpoint": "/v1/completions", "body": {"model": "gpt-nope", "prompt": "x"}}"#);
    f.push('\n');
    f.push_str(r#"{"custom_id": "item-0001", "endpoint": "/v1/embeddings", "body": {}}"#);
    f.push('\n');
    std::fs::write(dir.path().join("bad.jsonl"), f).unwrap();

    let o = volley(&s, dir.path(), &["submit", "bad.jsonl"]).await;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nothing was submitted"), "{err}");
    assert!(err.contains("line 301: not valid JSON"), "{err}");
    assert!(err.contains("line 302: body.model"), "{err}");
    assert!(
        err.contains("line 303: custom_id: \"item-0001\" is already used on line 2"),
        "{err}"
    );
    assert!(err.contains("line 303: endpoint"), "{err}");
    assert!(all_batches(&s).await.is_empty());
    assert!(!dir.path().join("bad.jsonl.volley-state.json").exists());

    // A refused key and an unreachable gateway: exit 3 with a sentence a person understands.
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["ls"])
        .env("VOLLEY_URL", &s.url)
        .env("VOLLEY_API_KEY", "vk_wrong");
    let o = cmd.output().unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("API key was refused"),
        "{}",
        text(&o)
    );
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["ls"])
        .env("VOLLEY_URL", "http://127.0.0.1:9")
        .env("VOLLEY_API_KEY", "k");
    let o = cmd.output().unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot reach the gateway"),
        "{}",
        text(&o)
    );

    // A config file fills in what flags and variables leave unset.
    let cfg = dir.path().join("volley.toml");
    std::fs::write(
        &cfg,
        format!("url = \"{}\"\napi_key = \"{}\"\n", s.url, s.key),
    )
    .unwrap();
    let o = std::process::Command::new(BIN)
        .args(["ls", "--json", "--config", cfg.to_str().unwrap()])
        .env_remove("VOLLEY_URL")
        .env_remove("VOLLEY_API_KEY")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let list: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list["object"], "list", "{list}");
    s.stop().await;
}

/// tmux on a private socket, killed when dropped.
struct Tmux(String);

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let o = std::process::Command::new("tmux")
            .args(["-L", &self.0])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_in_a_terminal_shows_progress_bars_that_move() {
    let s = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Slow enough that the bars are seen part-way.
    std::fs::write(
        dir.path().join("slow.jsonl"),
        mixed(120, json!({"sim_latency_ms": 700})),
    )
    .unwrap();
    let o = volley(&s, dir.path(), &["submit", "slow.jsonl"]).await;
    assert!(o.status.success(), "{}", text(&o));

    let tmux = Tmux(format!("volley-cli-test-{}", std::process::id()));
    let cmd = format!(
        "VOLLEY_URL={} VOLLEY_API_KEY={} {BIN} watch --interval 0.2; echo EXIT=$?; sleep 60",
        s.url, s.key
    );
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "w",
        "-x",
        "150",
        "-y",
        "20",
        "-c",
        dir.path().to_str().unwrap(),
        &cmd,
    ]);
    let mut frames: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let screen = loop {
        let screen = tmux.run(&["capture-pane", "-p", "-t", "w"]);
        if let Some(bar) = screen.lines().find(|l| l.trim_start().starts_with("ALL ["))
            && frames.last().map(String::as_str) != Some(bar)
        {
            frames.push(bar.to_owned());
        }
        if screen.contains("EXIT=") {
            break screen;
        }
        assert!(Instant::now() < deadline, "watch did not end:\n{screen}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(screen.contains("EXIT=0"), "{screen}");
    for kind in ["LLM", "IMAGE", "VIDEO", "MUSIC", "TTS"] {
        assert!(
            screen
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{kind} ["))),
            "no {kind} bar:\n{screen}"
        );
    }
    let positions: Vec<u64> = frames
        .iter()
        .filter_map(|f| {
            f.split_whitespace()
                .find_map(|w| w.strip_suffix("/120")?.parse().ok())
        })
        .collect();
    assert!(
        positions.iter().any(|p| (1..120).contains(p)),
        "no bar seen part-way: {frames:#?}"
    );
    assert_eq!(positions.last(), Some(&120), "{frames:#?}");
    assert!(positions.windows(2).all(|w| w[0] <= w[1]), "{frames:#?}");
    // For the record (--nocapture): how the bars moved, and the final screen.
    println!("{}\n{}", frames.join("\n"), screen.trim_end());
    drop(tmux);
    s.stop().await;
}

/// README's walk-through on the shipped example file: `volley submit examples/mixed.jsonl &&
/// volley watch && volley results --out results/` (printed, for the record, with --nocapture).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walk_through_runs_on_the_shipped_example() {
    let s = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/mixed.jsonl");
    std::fs::create_dir(dir.path().join("examples")).unwrap();
    std::fs::copy(&example, dir.path().join("examples/mixed.jsonl")).unwrap();
    let n = std::fs::read_to_string(&example).unwrap().lines().count();
    for args in [
        &["submit", "examples/mixed.jsonl"][..],
        &["watch"][..],
        &["results", "--out", "results/"][..],
    ] {
        let o = volley(&s, dir.path(), args).await;
        println!(
            "$ volley {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    }
    let results = std::fs::read_to_string(dir.path().join("results/results.jsonl")).unwrap();
    assert_eq!(results.lines().count(), n);
    let first: Value = serde_json::from_str(results.lines().next().unwrap()).unwrap();
    assert_eq!(first["custom_id"], "img-01");
    check_media(&dir.path().join("results/img-01.png"));
    s.stop().await;
}
