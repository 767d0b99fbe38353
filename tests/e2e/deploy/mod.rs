//! Checks the deployment files against the workspace, by parsing them (Docker and Kubernetes
//! cannot run here): `Dockerfile`, `.dockerignore`, `docker-compose.yml`, everything under
//! `deploy/` and `docs/deploy.md`.
//!
//! The binaries are discovered from `crates/*/src/main.rs` (crate folder = binary name), joined
//! with the binaries the design plans, so that a new binary without deploy files fails here.
//! Environment variable names are checked against `volley_config::ENV_KEYS`, and every literal
//! environment of a service is run through `Settings::load_from`, Volley's own parser.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use volley_config::{ENV_KEYS, Settings};

mod binaries;
mod compose;
mod dockerfile;
mod env;
mod files;
mod kustomize;
mod yaml;

use binaries::*;
use compose::*;
use dockerfile::*;
use env::*;
use files::*;
use kustomize::*;
use yaml::*;

/// The binaries of the design. Checked even before their crates exist (their deploy files are
/// written ahead); any other `crates/*/src/main.rs` is checked as well.
const PLANNED: &[&str] = &[
    "gateway",
    "batch-state",
    "worker-llm",
    "worker-image",
    "worker-video",
    "worker-music",
    "worker-tts",
    "provider-sim",
    "batchctl",
];
/// Tools that run beside a stack, never in it, and are never deployed: the benchmark, the
/// fault-injection suite and the client CLI (`volley`, on users' machines).
const DEV_TOOLS: &[&str] = &["volley-bench", "volley-chaos", "volley-cli"];
const SIM: &str = "provider-sim";
const CLI: &str = "batchctl";
/// Variables only the simulator reads (besides those found in its source).
const SIM_KEYS: &[&str] = &["VOLLEY_SIM_ADDR", "VOLLEY_SIM_LATENCY_MS"];
/// Secret values: in Kubernetes they must come from a Secret, never a literal.
const SECRET_ENV: &[&str] = &[
    "VOLLEY_DATABASE_URL",
    "VOLLEY_AMQP_URL",
    "VOLLEY_MEDIA_SIGNING_KEY",
    "VOLLEY_INTERNAL_TOKEN",
];

// =============================================================================================
// Tests

#[test]
fn every_yaml_file_parses() {
    let mut errors = Vec::new();
    let files = yaml_files();
    assert!(
        files.len() > 5,
        "expected deploy/ to hold YAML files, found {files:?}"
    );
    for f in files {
        match parse_docs(&f) {
            Ok(d) if d.is_empty() => errors.push(format!("{}: no YAML document", rel(&f))),
            Ok(_) => {}
            Err(e) => errors.push(e),
        }
    }
    report("YAML files", errors);
}

#[test]
fn kustomizations_are_complete() {
    let mut errors = Vec::new();
    for l in layers() {
        errors.extend(l.problems.iter().cloned());
        let k = kustomization(&l.dir);
        let kfile = rel(&l.dir.join("kustomization.yaml"));
        if text(&k, &["namespace"]).as_deref() != Some("volley") {
            errors.push(format!("{kfile}: `namespace: volley` is missing"));
        }
        // Every manifest in the directory is either a resource or a patch (or the example
        // secret, which must never be applied by kustomize).
        let mut listed: BTreeSet<String> = list_strings(k.get("resources")).into_iter().collect();
        for p in seq(k.get("patches")) {
            listed.extend(text(p, &["path"]));
        }
        for g in seq(k.get("configMapGenerator")) {
            for f in list_strings(g.get("files")) {
                let f = f.rsplit('=').next().unwrap().to_owned();
                if !l.dir.join(&f).is_file() {
                    errors.push(format!(
                        "{kfile}: configMapGenerator file {f} does not exist"
                    ));
                }
            }
        }
        let mut files = Vec::new();
        files_under(&l.dir, &mut files);
        for f in files.iter().filter(|f| is_yaml(f)) {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            if f.parent() != Some(l.dir.as_path()) || name == "kustomization.yaml" {
                continue;
            }
            if name == "secrets.example.yaml" {
                if listed.contains(&name) {
                    errors.push(format!(
                        "{kfile} lists secrets.example.yaml: secrets must not be applied from git"
                    ));
                }
            } else if !listed.contains(&name) {
                errors.push(format!(
                    "{}: not listed in {kfile} (resources or patches)",
                    rel(f)
                ));
            }
        }
        for r in &l.res {
            if r.kind() == "Secret" {
                errors.push(format!("{}: a Secret in the kustomization", r.at()));
            }
        }
    }
    report("kustomizations", errors);
}

#[test]
fn dockerfile_has_one_target_per_binary() {
    let stages = dockerfile();
    let mut errors = Vec::new();
    let bins = binaries();
    for bin in &bins {
        let Some(stage) = stages.iter().find(|s| &s.name == bin) else {
            errors.push(format!(
                "Dockerfile: no target `FROM runtime AS {bin}` for binary {bin}"
            ));
            continue;
        };
        // COPY --from=<builder> .../target/release/<bin> /usr/local/bin/...
        let copy = stage.instrs.iter().find(|(i, a)| {
            i == "COPY"
                && a.contains("--from=")
                && a.split_whitespace()
                    .any(|w| w.ends_with(&format!("/target/release/{bin}")))
        });
        match copy {
            None => errors.push(format!(
                "Dockerfile target {bin}: no `COPY --from=builder /app/target/release/{bin} ...`"
            )),
            Some((_, args)) => {
                let from = args
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("--from="))
                    .unwrap_or("");
                let builds = chain(&stages, from).iter().any(|s| {
                    s.instrs.iter().any(|(i, a)| {
                        i == "RUN"
                            && a.contains("cargo build")
                            && a.contains("--release")
                            && a.contains("--workspace")
                            && a.contains("--locked")
                    })
                });
                if !builds {
                    errors.push(format!(
                        "Dockerfile target {bin} copies from stage {from:?}, which does not run \
                         `cargo build --release --workspace --locked`"
                    ));
                }
            }
        }
        // ENTRYPOINT in exec form naming the binary (so SIGTERM reaches it as PID 1).
        match stage.instrs.iter().rev().find(|(i, _)| i == "ENTRYPOINT") {
            None => errors.push(format!("Dockerfile target {bin}: no ENTRYPOINT")),
            Some((_, a)) => match serde_json::from_str::<Vec<String>>(a) {
                Ok(argv) if argv.first().is_some_and(|p| p.rsplit('/').next() == Some(bin)) => {}
                Ok(argv) => errors.push(format!(
                    "Dockerfile target {bin}: ENTRYPOINT {argv:?} does not run {bin}"
                )),
                Err(_) => errors.push(format!(
                    "Dockerfile target {bin}: ENTRYPOINT {a} is not in exec form [\"/usr/local/bin/{bin}\"]"
                )),
            },
        }
        let ch = chain(&stages, bin);
        // Non-root user.
        let user = ch.iter().find_map(|s| {
            s.instrs
                .iter()
                .rev()
                .find(|(i, _)| i == "USER")
                .map(|(_, a)| a.clone())
        });
        match user.as_deref() {
            None | Some("root") | Some("0") | Some("0:0") => errors.push(format!(
                "Dockerfile target {bin}: runs as root (add `USER volley`)"
            )),
            _ => {}
        }
        // A slim runtime: no Rust image, no build tools.
        let root_image = ch.last().map(|s| s.from.clone()).unwrap_or_default();
        if root_image.starts_with("rust") {
            errors.push(format!(
                "Dockerfile target {bin}: based on the build image {root_image}"
            ));
        }
        for s in &ch {
            for (i, a) in &s.instrs {
                if i != "RUN" || !a.contains("install") {
                    continue;
                }
                for tool in BUILD_TOOLS {
                    if a.split_whitespace().any(|w| w == *tool) {
                        errors.push(format!(
                            "Dockerfile target {bin}: stage {} installs build tool {tool}",
                            s.name
                        ));
                    }
                }
            }
        }
        if bin == "worker-tts" {
            let espeak = ch.iter().any(|s| {
                s.instrs
                    .iter()
                    .any(|(i, a)| i == "RUN" && a.contains("espeak-ng"))
            });
            if !espeak {
                errors.push("Dockerfile target worker-tts: espeak-ng is not installed".into());
            }
        }
    }
    // Every runnable target is a binary.
    for s in &stages {
        if s.instrs.iter().any(|(i, _)| i == "ENTRYPOINT") && !bins.contains(&s.name) {
            errors.push(format!(
                "Dockerfile target {} has an ENTRYPOINT but there is no binary {0} \
                 (crates/{0}/src/main.rs)",
                s.name
            ));
        }
    }
    let ignore = read(&root().join(".dockerignore"));
    for must in ["target", ".git", ".volley"] {
        if !ignore
            .lines()
            .any(|l| l.trim().trim_end_matches('/') == must)
        {
            errors.push(format!(".dockerignore: {must} is not excluded"));
        }
    }
    report("Dockerfile", errors);
}

#[test]
fn compose_runs_every_binary() {
    let c = compose();
    let stages = dockerfile();
    let svcs = c.get("services").and_then(|s| s.as_mapping()).unwrap();
    let svc = |n: &str| c.get("services").and_then(|s| s.get(n));
    let mut errors = Vec::new();
    for bin in binaries() {
        let name = if bin == CLI {
            "migrate".to_owned()
        } else {
            bin.clone()
        };
        let Some(s) = svc(&name) else {
            errors.push(format!(
                "docker-compose.yml: no service `{name}` for binary {bin}"
            ));
            continue;
        };
        if text(s, &["build", "target"]).as_deref() != Some(bin.as_str()) {
            errors.push(format!(
                "docker-compose.yml service {name}: build.target must be {bin}"
            ));
        }
        if text(s, &["build", "context"]).as_deref() != Some(".") {
            errors.push(format!(
                "docker-compose.yml service {name}: build.context must be ."
            ));
        }
        let image = format!("volley/{bin}:latest");
        if text(s, &["image"]).as_deref() != Some(image.as_str()) {
            errors.push(format!(
                "docker-compose.yml service {name}: image must be {image}"
            ));
        }
        if bin == CLI {
            let cmd = seq(s.get("command"))
                .iter()
                .filter_map(scalar)
                .collect::<Vec<_>>();
            if cmd.first().map(String::as_str) != Some("migrate") {
                errors.push(
                    "docker-compose.yml service migrate: command must be [\"migrate\"]".into(),
                );
            }
            continue;
        }
        // Health check on /readyz (or /healthz) at the port the service listens on.
        match healthcheck_url(s) {
            None => errors.push(format!(
                "docker-compose.yml service {name}: no healthcheck calling http://127.0.0.1:<port>{}",
                readiness_path(&bin)
            )),
            Some(url) => {
                let path = url.splitn(4, '/').nth(3).map(|p| format!("/{p}"));
                if !matches!(path.as_deref(), Some("/readyz") | Some("/healthz")) {
                    errors.push(format!(
                        "docker-compose.yml service {name}: healthcheck {url} must call /readyz or /healthz"
                    ));
                }
                if let Some(var) = addr_var(&bin) {
                    let env = compose_env(s);
                    let want = match env.get(var) {
                        Some(EnvSrc::Lit(a)) => port_of(a),
                        _ => None,
                    };
                    if want.is_none() || port_of(&url) != want {
                        errors.push(format!(
                            "docker-compose.yml service {name}: healthcheck port of {url} differs \
                             from {var} ({:?})",
                            env.get(var)
                        ));
                    }
                }
            }
        }
    }
    // gateway and batch-state start after the migrations.
    for name in ["gateway", "batch-state"] {
        if let Some(s) = svc(name)
            && text(s, &["depends_on", "migrate", "condition"]).as_deref()
                != Some("service_completed_successfully")
        {
            errors.push(format!(
                "docker-compose.yml service {name}: depends_on.migrate.condition must be \
                     service_completed_successfully"
            ));
        }
    }
    for (name, s) in svcs {
        let name = scalar(name).unwrap();
        if let Some(t) = text(s, &["build", "target"]) {
            if !stages.iter().any(|st| st.name == t) {
                errors.push(format!(
                    "docker-compose.yml service {name}: build target {t} is not a Dockerfile stage"
                ));
            }
            if !binaries().contains(&t) {
                errors.push(format!(
                    "docker-compose.yml service {name}: builds {t}, which is not a binary"
                ));
            }
        }
        if let Some(deps) = s.get("depends_on").and_then(|d| d.as_mapping()) {
            for (dep, cond) in deps {
                let dep = scalar(dep).unwrap();
                match svc(&dep) {
                    None => errors.push(format!(
                        "docker-compose.yml service {name}: depends on unknown service {dep}"
                    )),
                    Some(d) => {
                        if text(cond, &["condition"]).as_deref() == Some("service_healthy")
                            && d.get("healthcheck").is_none()
                        {
                            errors.push(format!(
                                "docker-compose.yml service {name}: waits for {dep} to be healthy, \
                                 but {dep} has no healthcheck"
                            ));
                        }
                    }
                }
            }
        }
    }
    // Infrastructure.
    match svc("rabbitmq") {
        None => errors.push("docker-compose.yml: no rabbitmq service".into()),
        Some(r) => {
            if !text(r, &["image"]).is_some_and(|i| i.starts_with("rabbitmq:3.13-management")) {
                errors.push(
                    "docker-compose.yml rabbitmq: image must be rabbitmq:3.13-management".into(),
                );
            }
            if !compose_mounts(r)
                .iter()
                .any(|(src, _)| src.trim_start_matches("./") == "deploy/rabbitmq/rabbitmq.conf")
            {
                errors.push(
                    "docker-compose.yml rabbitmq: deploy/rabbitmq/rabbitmq.conf is not mounted"
                        .into(),
                );
            }
            if healthcheck_text(r).is_none_or(|t| !t.contains("rabbitmq-diagnostics")) {
                errors.push("docker-compose.yml rabbitmq: healthcheck must run rabbitmq-diagnostics -q ping".into());
            }
        }
    }
    match svc("postgres") {
        None => errors.push("docker-compose.yml: no postgres service".into()),
        Some(p) => {
            if healthcheck_text(p).is_none_or(|t| !t.contains("pg_isready")) {
                errors.push("docker-compose.yml postgres: healthcheck must run pg_isready".into());
            }
        }
    }
    if let Some(g) = svc("gateway") {
        let ports: Vec<String> = seq(g.get("ports")).iter().filter_map(scalar).collect();
        if !ports.iter().any(|p| p.ends_with("8080:8080")) {
            errors.push("docker-compose.yml gateway: port 8080:8080 is not published".into());
        }
    }
    report("docker-compose.yml services", errors);
}

fn healthcheck_text(svc: &Value) -> Option<String> {
    let test = svc.get("healthcheck")?.get("test")?;
    Some(match test {
        Value::Sequence(s) => s.iter().filter_map(scalar).collect::<Vec<_>>().join(" "),
        v => scalar(v)?,
    })
}

#[test]
fn compose_gives_every_service_its_environment() {
    let c = compose();
    let svc = |n: &str| c.get("services").and_then(|s| s.get(n));
    let sim = sim_keys();
    let named_volumes: BTreeSet<String> = c
        .get("volumes")
        .and_then(|v| v.as_mapping())
        .map(|m| m.keys().filter_map(scalar).collect())
        .unwrap_or_default();
    let service_names: BTreeSet<String> = c
        .get("services")
        .and_then(|v| v.as_mapping())
        .map(|m| m.keys().filter_map(scalar).collect())
        .unwrap();
    let mut errors = Vec::new();
    let mut media_volumes: BTreeMap<String, String> = BTreeMap::new();
    for bin in binaries() {
        let name = if bin == CLI {
            "migrate".to_owned()
        } else {
            bin.clone()
        };
        let Some(s) = svc(&name) else { continue };
        let env = compose_env(s);
        let at = format!("docker-compose.yml service {name}");
        if !env.contains_key("RUST_LOG") {
            errors.push(format!("{at}: RUST_LOG is not set"));
        }
        for var in required_env(&bin) {
            if !env.contains_key(var) {
                errors.push(format!("{at}: {var} is not set"));
            }
        }
        for var in forbidden_env(&bin) {
            if env.contains_key(var) {
                errors.push(format!(
                    "{at}: {var} must not be set (workers hold no database credentials)"
                ));
            }
        }
        if let (Some(var), Some(EnvSrc::Lit(a))) =
            (addr_var(&bin), addr_var(&bin).and_then(|v| env.get(v)))
            && !a.starts_with("0.0.0.0:")
        {
            errors.push(format!(
                "{at}: {var}={a} must listen on 0.0.0.0 inside a container"
            ));
        }
        // URLs name compose services, at the port those services listen on.
        for (k, v) in &env {
            let EnvSrc::Lit(v) = v else { continue };
            let Some(host) = url_host(v) else { continue };
            // Public URLs are what clients (and the simulator's callers) see: not checked.
            if k == "VOLLEY_PUBLIC_URL" || (k == "VOLLEY_SIM_PUBLIC_URL" && host == name) {
                continue;
            }
            if is_local_host(&host) {
                errors.push(format!(
                    "{at}: {k}={v} points at the container itself, not at a service"
                ));
                continue;
            }
            if !service_names.contains(&host) {
                errors.push(format!("{at}: {k}={v} names no compose service {host}"));
                continue;
            }
            let target_addr = binaries()
                .into_iter()
                .find(|b| b == &host)
                .and_then(|b| addr_var(&b))
                .and_then(|var| match compose_env(svc(&host)?).get(var) {
                    Some(EnvSrc::Lit(a)) => port_of(a),
                    _ => None,
                });
            if let Some(p) = target_addr
                && port_of(v) != Some(p)
            {
                errors.push(format!(
                    "{at}: {k}={v} does not use port {p}, where {host} listens"
                ));
            }
        }
        // VOLLEY_CONFIG is a mounted file of the repository.
        let mounts = compose_mounts(s);
        let mut catalogue = None;
        if let Some(EnvSrc::Lit(path)) = env.get("VOLLEY_CONFIG") {
            match mounts.iter().find(|(_, t)| t == path) {
                None => errors.push(format!("{at}: VOLLEY_CONFIG={path} is not a mounted file")),
                Some((src, _)) => {
                    let f = root().join(src.trim_start_matches("./"));
                    if f.is_file() {
                        catalogue = Some(f);
                    } else {
                        errors.push(format!("{at}: mounts {src}, which does not exist"));
                    }
                }
            }
        }
        // The media store: one named volume, mounted at VOLLEY_MEDIA_DIR.
        if uses_media(&bin)
            && let Some(EnvSrc::Lit(dir)) = env.get("VOLLEY_MEDIA_DIR")
        {
            match mounts.iter().find(|(_, t)| t == dir) {
                Some((src, _)) if named_volumes.contains(src) => {
                    media_volumes.insert(name.clone(), src.clone());
                }
                _ => errors.push(format!(
                    "{at}: no named volume is mounted at VOLLEY_MEDIA_DIR={dir}"
                )),
            }
        }
        // Volley's own loader accepts the environment (provider names, numbers, ...).
        if bin != SIM {
            let catalogue = catalogue.unwrap_or_else(|| root().join("config").join("volley.toml"));
            if let Err(e) = settings_accept(&catalogue, &env, &sim) {
                errors.push(format!("{at}: Volley would not start: {e}"));
            }
        }
    }
    let distinct: BTreeSet<&String> = media_volumes.values().collect();
    if distinct.len() > 1 {
        errors.push(format!(
            "docker-compose.yml: gateway and workers must share one media volume, found {media_volumes:?}"
        ));
    }
    report("docker-compose.yml environment", errors);
}

#[test]
fn kubernetes_deploys_every_service() {
    let ls = layers();
    let base = layer(&ls, "base");
    let dev = layer(&ls, "dev");
    let mut errors = Vec::new();
    for bin in services() {
        let in_base = base.find("Deployment", &bin).is_some();
        if bin == SIM {
            if in_base {
                errors.push("deploy/base: provider-sim must only be in the dev overlay".into());
            }
            if dev.find("Deployment", SIM).is_none() {
                errors.push("deploy/overlays/dev: no Deployment provider-sim".into());
            }
            for l in &ls {
                if l.name != "dev" && l.find("Deployment", SIM).is_some() {
                    errors.push(format!(
                        "deploy layer {}: provider-sim must only be in the dev overlay",
                        l.name
                    ));
                }
            }
        } else if !in_base {
            errors.push(format!("deploy/base: no Deployment named {bin}"));
        }
    }
    // Nothing stale: every Deployment runs a binary of the same name.
    for l in &ls {
        for d in l.of_kind("Deployment") {
            if !binaries().contains(&d.name()) {
                errors.push(format!("{}: there is no binary {}", d.at(), d.name()));
            }
        }
    }
    // Services others reach.
    for (name, port) in [("gateway", 8080), ("batch-state", 8081)] {
        match base.find("Service", name) {
            None => errors.push(format!("deploy/base: no Service {name}")),
            Some(s) => {
                let ports: Vec<i64> = seq(at(&s.doc, &["spec", "ports"]))
                    .iter()
                    .filter_map(|p| int(p, &["port"]))
                    .collect();
                if !ports.contains(&port) {
                    errors.push(format!("{}: port {port} missing (has {ports:?})", s.at()));
                }
            }
        }
    }
    // The HPA of the gateway.
    match base
        .of_kind("HorizontalPodAutoscaler")
        .into_iter()
        .find(|h| text(&h.doc, &["spec", "scaleTargetRef", "name"]).as_deref() == Some("gateway"))
    {
        None => errors.push("deploy/base: no HorizontalPodAutoscaler for the gateway".into()),
        Some(h) => {
            if int(&h.doc, &["spec", "minReplicas"]).is_none_or(|n| n < 2) {
                errors.push(format!("{}: minReplicas must be at least 2", h.at()));
            }
            let cpu = seq(at(&h.doc, &["spec", "metrics"])).iter().any(|m| {
                text(m, &["resource", "name"]).as_deref() == Some("cpu")
                    && int(m, &["resource", "target", "averageUtilization"]).is_some()
            });
            if !cpu {
                errors.push(format!("{}: no CPU utilization target", h.at()));
            }
        }
    }
    // Replica counts owned by autoscalers are not also set in the Deployment.
    for w in workers().iter().map(String::as_str).chain(["gateway"]) {
        if let Some(d) = base.find("Deployment", w)
            && at(&d.doc, &["spec", "replicas"]).is_some()
        {
            errors.push(format!(
                "{}: spec.replicas is set, but an autoscaler owns the replica count",
                d.at()
            ));
        }
    }
    // The migrations Job.
    let job = base.of_kind("Job").into_iter().find(|j| {
        j.containers()
            .iter()
            .any(|c| text(c, &["image"]).is_some_and(|i| image_repo(&i) == format!("volley/{CLI}")))
    });
    match job {
        None => errors.push(format!(
            "deploy/base: no migrations Job running image volley/{CLI}"
        )),
        Some(j) => {
            let c = &j.containers()[0];
            let argv: Vec<String> = list_strings(c.get("command"))
                .into_iter()
                .chain(list_strings(c.get("args")))
                .collect();
            if !argv.iter().any(|a| a == "migrate") {
                errors.push(format!("{}: does not run `batchctl migrate`", j.at()));
            }
        }
    }
    report("Kubernetes services", errors);
}

#[test]
fn kubernetes_pods_are_wired_correctly() {
    let ls = layers();
    let sim = sim_keys();
    let secrets = example_secrets();
    let mut errors = Vec::new();
    for l in &ls {
        let catalogue = l.catalogue();
        let configmaps = generated_configmaps(&l.dir);
        // TriggerAuthentications read documented Secret keys.
        for a in l.of_kind("TriggerAuthentication") {
            for r in seq(at(&a.doc, &["spec", "secretTargetRef"])) {
                let (name, key) = (
                    text(r, &["name"]).unwrap_or_default(),
                    text(r, &["key"]).unwrap_or_default(),
                );
                if !secrets.get(&name).is_some_and(|k| k.contains(&key)) {
                    errors.push(format!(
                        "[{}] {}: Secret {name} key {key} is not in deploy/base/secrets.example.yaml",
                        l.name,
                        a.at()
                    ));
                }
            }
        }
        if catalogue.is_none() {
            errors.push(format!(
                "deploy layer {}: no configMapGenerator `volley-config`",
                l.name
            ));
        }
        let pvcs: BTreeSet<String> = l
            .of_kind("PersistentVolumeClaim")
            .iter()
            .filter(|p| {
                list_strings(at(&p.doc, &["spec", "accessModes"]))
                    .contains(&"ReadWriteMany".to_owned())
            })
            .map(|p| p.name())
            .collect();
        let service_ports: BTreeMap<String, Vec<i64>> = l
            .of_kind("Service")
            .iter()
            .map(|s| {
                (
                    s.name(),
                    seq(at(&s.doc, &["spec", "ports"]))
                        .iter()
                        .filter_map(|p| int(p, &["port"]))
                        .collect(),
                )
            })
            .collect();
        for r in l
            .res
            .iter()
            .filter(|r| r.kind() == "Deployment" || r.kind() == "Job")
        {
            let is_job = r.kind() == "Job";
            let bin = if is_job { CLI.to_owned() } else { r.name() };
            let where_ = format!("[{}] {}", l.name, r.at());
            let Some(pod) = r.pod_spec() else {
                errors.push(format!("{where_}: no pod template"));
                continue;
            };
            let non_root = text(pod, &["securityContext", "runAsNonRoot"]).as_deref()
                == Some("true")
                || r.containers().iter().all(|c| {
                    text(c, &["securityContext", "runAsNonRoot"]).as_deref() == Some("true")
                });
            if !non_root {
                errors.push(format!(
                    "{where_}: securityContext.runAsNonRoot is not true"
                ));
            }
            if worker_key(&bin).is_some() && int(pod, &["terminationGracePeriodSeconds"]).is_none()
            {
                errors.push(format!(
                    "{where_}: terminationGracePeriodSeconds is not set"
                ));
            }
            let volumes = seq(pod.get("volumes"));
            let annotations = labels(at(&r.doc, &["spec", "template", "metadata", "annotations"]));
            // Each PDB selects the pods of this Deployment.
            if !is_job {
                let pod_labels = labels(at(&r.doc, &["spec", "template", "metadata", "labels"]));
                let pdb = l.of_kind("PodDisruptionBudget").into_iter().any(|p| {
                    let sel = labels(at(&p.doc, &["spec", "selector", "matchLabels"]));
                    !sel.is_empty() && sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
                });
                if !pdb && bin != SIM {
                    errors.push(format!("{where_}: no PodDisruptionBudget selects its pods"));
                }
            }
            for (ci, c) in r.containers().iter().enumerate() {
                let image = text(c, &["image"]).unwrap_or_default();
                if l.name == "base" || bin == SIM {
                    let want = format!("volley/{bin}");
                    if image_repo(&image) != want {
                        errors.push(format!("{where_}: image {image} is not {want}:<tag>"));
                    }
                }
                for what in ["requests", "limits"] {
                    for res in ["cpu", "memory"] {
                        if at(c, &["resources", what, res]).is_none() {
                            errors.push(format!("{where_}: resources.{what}.{res} is not set"));
                        }
                    }
                }
                let env = r.env(ci);
                if !env.contains_key("RUST_LOG") {
                    errors.push(format!("{where_}: RUST_LOG is not set"));
                }
                for var in required_env(&bin) {
                    if !env.contains_key(var) {
                        errors.push(format!("{where_}: {var} is not set"));
                    }
                }
                for var in forbidden_env(&bin) {
                    if env.contains_key(var) {
                        errors.push(format!(
                            "{where_}: {var} must not be set (workers hold no database credentials)"
                        ));
                    }
                }
                for (k, v) in &env {
                    match v {
                        EnvSrc::Secret { name, key }
                            if !secrets.get(name).is_some_and(|ks| ks.contains(key)) =>
                        {
                            errors.push(format!(
                                "{where_}: {k} reads Secret {name} key {key}, which \
                                 deploy/base/secrets.example.yaml does not document"
                            ));
                        }
                        EnvSrc::ConfigMap { name, key }
                            if !configmaps.get(name).is_some_and(|ks| ks.contains(key)) =>
                        {
                            errors.push(format!(
                                "{where_}: {k} reads ConfigMap {name} key {key}, which no \
                                 configMapGenerator of this layer provides"
                            ));
                        }
                        EnvSrc::Other => errors.push(format!(
                            "{where_}: {k} has neither a value nor a secretKeyRef/configMapKeyRef"
                        )),
                        _ => {}
                    }
                    let secret = SECRET_ENV.contains(&k.as_str()) || k.ends_with("_API_KEY");
                    if secret && !matches!(v, EnvSrc::Secret { .. }) {
                        errors.push(format!(
                            "{where_}: {k} must come from a Secret (valueFrom.secretKeyRef)"
                        ));
                    }
                    // In-cluster URLs name a Service of the layer, at its port.
                    if let EnvSrc::Lit(v) = v
                        && let Some(host) = url_host(v)
                    {
                        let svc = host.split('.').next().unwrap_or("").to_owned();
                        if k == "VOLLEY_SIM_PUBLIC_URL" || k == "VOLLEY_PUBLIC_URL" {
                            // Public URLs are for clients, checked by hand.
                        } else if is_local_host(&host) {
                            errors.push(format!("{where_}: {k}={v} points at the pod itself"));
                        } else if let Some(ports) = service_ports.get(&svc) {
                            if !port_of(v).is_some_and(|p| ports.contains(&i64::from(p))) {
                                errors.push(format!(
                                    "{where_}: {k}={v}: Service {svc} has ports {ports:?}"
                                ));
                            }
                        } else if !host.contains('.') {
                            errors.push(format!(
                                "{where_}: {k}={v} names no Service {svc} of this layer"
                            ));
                        }
                    }
                }
                // VOLLEY_CONFIG: a file of the mounted volley-config ConfigMap.
                if let Some(EnvSrc::Lit(path)) = env.get("VOLLEY_CONFIG") {
                    let p = Path::new(path);
                    let dir = p.parent().unwrap().to_string_lossy().into_owned();
                    let file = p.file_name().unwrap().to_string_lossy().into_owned();
                    let mounted = seq(c.get("volumeMounts")).iter().any(|m| {
                        text(m, &["mountPath"]).as_deref() == Some(dir.as_str())
                            && volumes.iter().any(|v| {
                                text(v, &["name"]) == text(m, &["name"])
                                    && text(v, &["configMap", "name"]).as_deref()
                                        == Some("volley-config")
                            })
                    });
                    let in_generator = catalogue
                        .as_ref()
                        .is_some_and(|c| c.file_name().unwrap().to_string_lossy() == file);
                    if !mounted || !in_generator {
                        errors.push(format!(
                            "{where_}: VOLLEY_CONFIG={path} is not the file {file} of ConfigMap \
                             volley-config mounted at {dir}"
                        ));
                    }
                }
                // The media store: the RWX claim volley-media at VOLLEY_MEDIA_DIR.
                if uses_media(&bin) {
                    let dir = match env.get("VOLLEY_MEDIA_DIR") {
                        Some(EnvSrc::Lit(d)) => d.clone(),
                        _ => String::new(),
                    };
                    let mounted = seq(c.get("volumeMounts")).iter().any(|m| {
                        text(m, &["mountPath"]).as_deref() == Some(dir.as_str())
                            && volumes.iter().any(|v| {
                                text(v, &["name"]) == text(m, &["name"])
                                    && text(v, &["persistentVolumeClaim", "claimName"])
                                        .is_some_and(|n| pvcs.contains(&n))
                            })
                    });
                    if !mounted {
                        errors.push(format!(
                            "{where_}: no ReadWriteMany PersistentVolumeClaim of this layer is \
                             mounted at VOLLEY_MEDIA_DIR={dir:?}"
                        ));
                    }
                }
                // Volley's own loader accepts the environment with the layer's catalogue.
                if bin != SIM {
                    let cat = if env.contains_key("VOLLEY_CONFIG") {
                        catalogue.clone()
                    } else {
                        // The image's built-in default (a copy of config/volley.toml).
                        Some(root().join("config").join("volley.toml"))
                    };
                    if let Some(cat) = cat
                        && let Err(e) = settings_accept(&cat, &env, &sim)
                    {
                        errors.push(format!(
                            "{where_}: Volley would not start with catalogue {}: {e}",
                            rel(&cat)
                        ));
                    }
                }
                if is_job {
                    continue;
                }
                // Ports: probes = container port = *_ADDR port = metrics annotation.
                let ports: Vec<i64> = seq(c.get("ports"))
                    .iter()
                    .filter_map(|p| int(p, &["containerPort"]))
                    .collect();
                let Some(&port) = ports.first() else {
                    errors.push(format!("{where_}: no containerPort"));
                    continue;
                };
                // The main address is on the first port; others (an internal metrics port) on
                // another port of the container, which then carries the metrics annotation.
                let mut metrics_port = port;
                for (k, v) in &env {
                    if let (true, EnvSrc::Lit(a)) = (k.ends_with("_ADDR"), v) {
                        let p = port_of(a).map(i64::from);
                        if Some(k.as_str()) == addr_var(&bin) || !k.ends_with("_METRICS_ADDR") {
                            if p != Some(port) {
                                errors.push(format!(
                                    "{where_}: {k}={a} but the containerPort is {port}"
                                ));
                            }
                        } else if let Some(p) = p.filter(|p| ports.contains(p) && *p != port) {
                            metrics_port = p;
                        } else {
                            errors.push(format!(
                                "{where_}: {k}={a} is not a second containerPort of {ports:?}"
                            ));
                        }
                        if !a.starts_with("0.0.0.0:") {
                            errors.push(format!("{where_}: {k}={a} must listen on 0.0.0.0"));
                        }
                    }
                }
                if let Some(var) = addr_var(&bin)
                    && !matches!(env.get(var), Some(EnvSrc::Lit(_)))
                {
                    errors.push(format!("{where_}: {var} is not set to 0.0.0.0:{port}"));
                }
                if let Some(p) = annotations.get("prometheus.io/port")
                    && p.parse::<i64>().ok() != Some(metrics_port)
                {
                    errors.push(format!(
                        "{where_}: prometheus.io/port {p} is not the metrics port {metrics_port}"
                    ));
                }
                for (probe, want) in [
                    ("readinessProbe", readiness_path(&bin)),
                    ("livenessProbe", "/healthz"),
                ] {
                    let Some(get) = at(c, &[probe, "httpGet"]) else {
                        errors.push(format!("{where_}: no {probe}.httpGet"));
                        continue;
                    };
                    if text(get, &["path"]).as_deref() != Some(want) {
                        errors.push(format!(
                            "{where_}: {probe} path is {:?}, must be {want}",
                            text(get, &["path"])
                        ));
                    }
                    let p = get.get("port").and_then(|p| container_port(c, p));
                    if p != Some(port) {
                        errors.push(format!(
                            "{where_}: {probe} port {p:?} is not the containerPort {port}"
                        ));
                    }
                }
            }
        }
        // Services route to a container port of the pods they select.
        for s in l.of_kind("Service") {
            let sel = labels(at(&s.doc, &["spec", "selector"]));
            let target = l.of_kind("Deployment").into_iter().find(|d| {
                let pl = labels(at(&d.doc, &["spec", "template", "metadata", "labels"]));
                !sel.is_empty() && sel.iter().all(|(k, v)| pl.get(k) == Some(v))
            });
            let Some(d) = target else {
                errors.push(format!("[{}] {}: selects no Deployment", l.name, s.at()));
                continue;
            };
            let c = &d.containers()[0];
            for p in seq(at(&s.doc, &["spec", "ports"])) {
                let tp = p.get("targetPort").or_else(|| p.get("port")).unwrap();
                if container_port(c, tp).is_none_or(|n| {
                    !seq(c.get("ports"))
                        .iter()
                        .any(|cp| int(cp, &["containerPort"]) == Some(n))
                }) {
                    errors.push(format!(
                        "[{}] {}: targetPort {tp:?} is not a port of {}",
                        l.name,
                        s.at(),
                        d.name()
                    ));
                }
            }
        }
    }
    report("Kubernetes pods", errors);
}

#[test]
fn production_pins_every_image() {
    let ls = layers();
    let base = layer(&ls, "base");
    let prod = layer(&ls, "production");
    let k = kustomization(&prod.dir);
    let mut errors = Vec::new();
    let images: BTreeMap<String, Value> = seq(k.get("images"))
        .iter()
        .filter_map(|i| Some((text(i, &["name"])?, i.clone())))
        .collect();
    let used: BTreeSet<String> = base
        .res
        .iter()
        .flat_map(|r| r.containers().iter().filter_map(|c| text(c, &["image"])))
        .map(|i| i.split(':').next().unwrap().to_owned())
        .collect();
    for img in &used {
        match images.get(img) {
            None => errors.push(format!(
                "deploy/overlays/production: no `images:` entry for {img}"
            )),
            Some(i) => {
                if text(i, &["newTag"]).is_none_or(|t| t == "latest")
                    && text(i, &["digest"]).is_none()
                {
                    errors.push(format!(
                        "deploy/overlays/production: image {img} has no pinned newTag"
                    ));
                }
            }
        }
    }
    for name in images.keys() {
        if !used.contains(name) {
            errors.push(format!(
                "deploy/overlays/production: `images:` entry {name} matches no image of the base"
            ));
        }
    }
    report("production images", errors);
}

#[test]
fn every_worker_scales_on_its_own_queue() {
    let ls = layers();
    let base = layer(&ls, "base");
    let mut errors = Vec::new();
    // The queue prefix of every layer's catalogue (ScaledObjects live in the base).
    let mut prefixes = BTreeSet::new();
    for l in &ls {
        if let Some(c) = l.catalogue() {
            match Settings::from_file(&c) {
                Ok(s) => {
                    prefixes.insert(s.queue_prefix);
                }
                Err(e) => errors.push(format!("{}: {e}", rel(&c))),
            }
        }
    }
    let auths: BTreeMap<String, &Res> = base
        .of_kind("TriggerAuthentication")
        .into_iter()
        .map(|a| (a.name(), a))
        .collect();
    for w in workers() {
        let key = worker_key(&w).unwrap();
        let Some(so) = base.of_kind("ScaledObject").into_iter().find(|s| {
            text(&s.doc, &["spec", "scaleTargetRef", "name"]).as_deref() == Some(w.as_str())
        }) else {
            errors.push(format!(
                "deploy/base: no KEDA ScaledObject with scaleTargetRef.name {w}"
            ));
            continue;
        };
        let at_ = so.at();
        if text(&so.doc, &["apiVersion"]).as_deref() != Some("keda.sh/v1alpha1") {
            errors.push(format!("{at_}: apiVersion must be keda.sh/v1alpha1"));
        }
        let triggers = seq(at(&so.doc, &["spec", "triggers"]));
        let Some(t) = triggers
            .iter()
            .find(|t| text(t, &["type"]).as_deref() == Some("rabbitmq"))
        else {
            errors.push(format!("{at_}: no trigger of type rabbitmq"));
            continue;
        };
        let mut env_prefix = prefixes.clone();
        if let Some(d) = base.find("Deployment", &w)
            && let Some(EnvSrc::Lit(p)) = d.env(0).get("VOLLEY_QUEUE_PREFIX")
        {
            env_prefix = BTreeSet::from([p.clone()]);
        }
        let queue = text(t, &["metadata", "queueName"]).unwrap_or_default();
        for p in &env_prefix {
            let want = format!("{p}.jobs.{key}");
            if queue != want {
                errors.push(format!(
                    "{at_}: queueName is {queue:?}, but {w} consumes {want}"
                ));
            }
        }
        for (field, want) in [("protocol", "http"), ("mode", "QueueLength")] {
            if text(t, &["metadata", field]).as_deref() != Some(want) {
                errors.push(format!("{at_}: trigger metadata.{field} must be {want}"));
            }
        }
        if text(t, &["metadata", "value"])
            .and_then(|v| v.parse::<f64>().ok())
            .is_none_or(|v| v <= 0.0)
        {
            errors.push(format!(
                "{at_}: trigger metadata.value must be a positive number"
            ));
        }
        match text(t, &["authenticationRef", "name"]).and_then(|n| auths.get(&n).copied()) {
            None => errors.push(format!(
                "{at_}: authenticationRef names no TriggerAuthentication of deploy/base"
            )),
            Some(a) => {
                let host = seq(at(&a.doc, &["spec", "secretTargetRef"]))
                    .iter()
                    .any(|s| {
                        text(s, &["parameter"]).as_deref() == Some("host")
                            && text(s, &["key"]).as_deref() == Some("rabbitmq-management-url")
                    });
                if !host {
                    errors.push(format!(
                        "{}: must map parameter host to Secret key rabbitmq-management-url",
                        a.at()
                    ));
                }
            }
        }
        // Fair dispatch holds part of the backlog in PostgreSQL: KEDA must count it too.
        let upper = key.to_ascii_uppercase();
        match triggers
            .iter()
            .find(|t| text(t, &["type"]).as_deref() == Some("postgresql"))
        {
            None => errors.push(format!(
                "{at_}: no trigger of type postgresql (the held backlog is in PostgreSQL)"
            )),
            Some(t) => {
                let query = text(t, &["metadata", "query"]).unwrap_or_default();
                if !query.contains("status = 'QUEUED'")
                    || !query.contains(&format!("inference_type = '{upper}'"))
                {
                    errors.push(format!(
                        "{at_}: the postgresql trigger must count QUEUED jobs of {upper}, not {query:?}"
                    ));
                }
                let pg_auth = text(t, &["authenticationRef", "name"])
                    .and_then(|n| auths.get(&n).copied())
                    .is_some_and(|a| {
                        seq(at(&a.doc, &["spec", "secretTargetRef"]))
                            .iter()
                            .any(|s| {
                                text(s, &["parameter"]).as_deref() == Some("connection")
                                    && text(s, &["key"]).as_deref() == Some("database-url")
                            })
                    });
                if !pg_auth {
                    errors.push(format!(
                        "{at_}: the postgresql trigger's TriggerAuthentication must map \
                         connection to Secret key database-url"
                    ));
                }
            }
        }
        let min = int(&so.doc, &["spec", "minReplicaCount"]);
        let max = int(&so.doc, &["spec", "maxReplicaCount"]);
        match (min, max) {
            (Some(a), Some(b)) if a <= b && b >= 1 => {}
            _ => errors.push(format!(
                "{at_}: minReplicaCount/maxReplicaCount missing or inconsistent ({min:?}/{max:?})"
            )),
        }
        // Long jobs are invisible to the metric once claimed: never scale those to zero.
        if matches!(key, "video" | "music") && min.is_none_or(|m| m < 1) {
            errors.push(format!(
                "{at_}: minReplicaCount must be at least 1 for long-running {key} jobs"
            ));
        }
        let window = int(
            &so.doc,
            &[
                "spec",
                "advanced",
                "horizontalPodAutoscalerConfig",
                "behavior",
                "scaleDown",
                "stabilizationWindowSeconds",
            ],
        );
        if window.is_none_or(|s| s < 300) {
            errors.push(format!(
                "{at_}: advanced.horizontalPodAutoscalerConfig.behavior.scaleDown.\
                 stabilizationWindowSeconds must be set, at least 300"
            ));
        }
    }
    for l in &ls {
        for so in l.of_kind("ScaledObject") {
            let target = text(&so.doc, &["spec", "scaleTargetRef", "name"]).unwrap_or_default();
            if l.find("Deployment", &target).is_none() {
                errors.push(format!(
                    "[{}] {}: scales {target}, which is no Deployment",
                    l.name,
                    so.at()
                ));
            }
        }
    }
    report("KEDA scaling", errors);
}

#[test]
fn video_workers_get_the_longest_grace_period() {
    let ls = layers();
    let base = layer(&ls, "base");
    let c = compose();
    let mut errors = Vec::new();
    let mut k8s = BTreeMap::new();
    let mut dc = BTreeMap::new();
    for w in workers() {
        if let Some(g) = base
            .find("Deployment", &w)
            .and_then(|d| d.pod_spec())
            .and_then(|p| int(p, &["terminationGracePeriodSeconds"]))
        {
            k8s.insert(w.clone(), g);
        }
        match text(&c, &["services", &w, "stop_grace_period"]) {
            Some(g) => match duration_secs(&g) {
                Some(s) => {
                    dc.insert(w.clone(), s as i64);
                }
                None => errors.push(format!(
                    "docker-compose.yml service {w}: stop_grace_period {g:?} is not a duration"
                )),
            },
            None => errors.push(format!(
                "docker-compose.yml service {w}: stop_grace_period is not set"
            )),
        }
    }
    // A worker's own drain time (VOLLEY_SHUTDOWN_GRACE_SECS, as Volley's loader reads it) must
    // end before the platform kills it, leaving time to hand jobs back and flush telemetry.
    let sim = sim_keys();
    for w in workers() {
        let k8s_env = base.find("Deployment", &w).map(|d| d.env(0));
        let base_cat = base.catalogue();
        let dc_env = c.get("services").and_then(|s| s.get(&w)).map(compose_env);
        let repo_cat = Some(root().join("config").join("volley.toml"));
        for (what, env, cat, grace) in [
            (
                "Kubernetes terminationGracePeriodSeconds",
                k8s_env,
                base_cat,
                k8s.get(&w),
            ),
            ("compose stop_grace_period", dc_env, repo_cat, dc.get(&w)),
        ] {
            let (Some(env), Some(cat), Some(grace)) = (env, cat, grace) else {
                continue;
            };
            match settings_accept(&cat, &env, &sim) {
                Err(e) => errors.push(format!("{w}: Volley would not start: {e}")),
                Ok(s) => {
                    let drain = s.worker.shutdown_grace_secs as i64;
                    if drain + 10 > *grace {
                        errors.push(format!(
                            "{w}: VOLLEY_SHUTDOWN_GRACE_SECS is {drain}s, which leaves less than \
                             10s of its {what} ({grace}s) to hand jobs back"
                        ));
                    }
                }
            }
        }
    }
    for (what, m) in [
        ("terminationGracePeriodSeconds", &k8s),
        ("compose stop_grace_period", &dc),
    ] {
        let Some(video) = m.get("worker-video") else {
            errors.push(format!("worker-video: {what} is not set"));
            continue;
        };
        for (w, g) in m {
            if w != "worker-video" && g >= video {
                errors.push(format!(
                    "{what}: {w} has {g}s, worker-video ({video}s) must have the longest"
                ));
            }
        }
    }
    report("grace periods", errors);
}

/// batch-state's port hands out jobs (`/internal/*`): in every layer a NetworkPolicy selects
/// its pods and admits the workers, and no pod of the layer that is not a worker (gateway,
/// simulator, migrations) nor the world at large; batch-state and the workers share one token.
#[test]
fn batch_state_admits_only_workers() {
    let mut errors = Vec::new();
    for l in layers() {
        let Some(state) = l.find("Deployment", "batch-state") else {
            continue;
        };
        let pod_labels = |r: &Res| labels(at(&r.doc, &["spec", "template", "metadata", "labels"]));
        let state_labels = pod_labels(state);
        let selects = |sel: Option<&Value>, l: &BTreeMap<String, String>| -> bool {
            let want = labels(sel.and_then(|s| s.get("matchLabels")));
            at_least_one_key(sel) && want.iter().all(|(k, v)| l.get(k) == Some(v))
        };
        let policies: Vec<&Res> = l
            .of_kind("NetworkPolicy")
            .into_iter()
            .filter(|p| selects(at(&p.doc, &["spec", "podSelector"]), &state_labels))
            .collect();
        if policies.is_empty() {
            errors.push(format!(
                "[{}] no NetworkPolicy selects the batch-state pods",
                l.name
            ));
            continue;
        }
        // Peers of every ingress rule: (podSelector, namespaceSelector).
        let mut pod_peers = Vec::new();
        for p in &policies {
            let types = list_strings(at(&p.doc, &["spec", "policyTypes"]));
            if !types.iter().any(|t| t == "Ingress") {
                errors.push(format!("{}: policyTypes must include Ingress", p.at()));
            }
            for rule in seq(at(&p.doc, &["spec", "ingress"])) {
                let from = seq(rule.get("from"));
                if from.is_empty() {
                    errors.push(format!(
                        "{}: an ingress rule without `from` admits anyone",
                        p.at()
                    ));
                }
                if seq(rule.get("ports")).is_empty() {
                    errors.push(format!("{}: an ingress rule without `ports`", p.at()));
                }
                for peer in from {
                    if peer.get("ipBlock").is_some() {
                        errors.push(format!("{}: an ipBlock peer", p.at()));
                    }
                    match (peer.get("podSelector"), peer.get("namespaceSelector")) {
                        (Some(ps), None) => {
                            if !at_least_one_key(Some(ps)) {
                                errors.push(format!(
                                    "{}: an empty podSelector admits every pod",
                                    p.at()
                                ));
                            }
                            pod_peers.push(ps.clone());
                        }
                        (_, Some(ns)) if !at_least_one_key(Some(ns)) => errors.push(format!(
                            "{}: an empty namespaceSelector admits every namespace",
                            p.at()
                        )),
                        _ => {}
                    }
                }
            }
        }
        for d in l.of_kind("Deployment").into_iter().chain(l.of_kind("Job")) {
            let name = d.name();
            if name == "batch-state" {
                continue;
            }
            let admitted = pod_peers.iter().any(|ps| selects(Some(ps), &pod_labels(d)));
            let is_worker = worker_key(&name).is_some();
            if is_worker && !admitted {
                errors.push(format!(
                    "[{}] {}: workers cannot reach batch-state",
                    l.name,
                    d.at()
                ));
            }
            if !is_worker && admitted {
                errors.push(format!(
                    "[{}] {}: admitted to batch-state, which only workers need",
                    l.name,
                    d.at()
                ));
            }
        }
        if let Some(svc) = l.find("Service", "batch-state")
            && let Some(t) = text(&svc.doc, &["spec", "type"])
            && t != "ClusterIP"
        {
            errors.push(format!("{}: type {t} exposes batch-state", svc.at()));
        }
        // One token for batch-state and every worker.
        let token_of = |r: &Res| match r.env(0).get("VOLLEY_INTERNAL_TOKEN") {
            Some(EnvSrc::Secret { name, key }) => Some(format!("{name}/{key}")),
            _ => None,
        };
        let want = token_of(state);
        if want.is_none() {
            errors.push(format!(
                "{}: VOLLEY_INTERNAL_TOKEN must come from a Secret",
                state.at()
            ));
        }
        for w in workers() {
            if let Some(d) = l.find("Deployment", &w)
                && token_of(d) != want
            {
                errors.push(format!(
                    "{}: VOLLEY_INTERNAL_TOKEN must be batch-state's ({want:?})",
                    d.at()
                ));
            }
        }
    }
    // Compose: batch-state is reached on the project network only.
    let c = compose();
    if let Some(svc) = at(&c, &["services", "batch-state"])
        && !seq(svc.get("ports")).is_empty()
    {
        errors.push("docker-compose.yml: batch-state publishes ports to the host".into());
    }
    report("batch-state's network exposure", errors);
}

fn at_least_one_key(sel: Option<&Value>) -> bool {
    sel.is_some_and(|s| {
        s.get("matchLabels")
            .and_then(|m| m.as_mapping())
            .is_some_and(|m| !m.is_empty())
            || !seq(s.get("matchExpressions")).is_empty()
    })
}

#[test]
fn deploy_files_use_only_known_environment_variables() {
    let sim = sim_keys();
    let mut errors = Vec::new();
    let mut files = deploy_text_files();
    files.push(root().join("docs").join("deploy.md"));
    for f in files {
        let Ok(t) = fs::read_to_string(&f) else {
            errors.push(format!("{} is missing", rel(&f)));
            continue;
        };
        for tok in volley_tokens(&t) {
            if !known_env(&tok, &sim) {
                errors.push(format!(
                    "{}: {tok} is not read by Volley (not in volley_config::ENV_KEYS, nor a \
                     simulator variable)",
                    rel(&f)
                ));
            }
        }
    }
    report("environment variable names", errors);
}

#[test]
fn every_configuration_key_has_a_deploy_counterpart() {
    let docs_text = read(&root().join("docs").join("deploy.md"));
    let mut deploy_tokens = BTreeSet::new();
    let mut deploy_text = String::new();
    for f in deploy_text_files() {
        if let Ok(t) = fs::read_to_string(&f) {
            deploy_tokens.extend(volley_tokens(&t));
            deploy_text.push_str(&t);
        }
    }
    let mut errors = Vec::new();
    for (key, what) in ENV_KEYS {
        let found = docs_text.contains(key)
            || deploy_text.contains(key)
            || deploy_tokens.iter().any(|t| key_matches(key, t));
        if !found {
            errors.push(format!(
                "volley_config::ENV_KEYS has {key} ({what}), but neither docs/deploy.md nor any \
                 deploy file mentions it: add it to the table in docs/deploy.md and set it \
                 where a service needs it"
            ));
        }
    }
    report("configuration keys", errors);
}

#[test]
fn base_catalogue_is_a_copy_of_the_repository_config() {
    let repo = fs::read(root().join("config").join("volley.toml")).unwrap();
    let copy = fs::read(root().join("deploy").join("base").join("volley.toml")).expect(
        "deploy/base/volley.toml is missing: cp config/volley.toml deploy/base/volley.toml",
    );
    assert!(
        repo == copy,
        "deploy/base/volley.toml differs from config/volley.toml; kustomize cannot read outside \
         deploy/base, so keep a byte-for-byte copy: cp config/volley.toml deploy/base/volley.toml"
    );
}

#[test]
fn overlay_catalogues_are_valid_and_serve_every_endpoint() {
    let repo = Settings::from_file(&root().join("config").join("volley.toml")).unwrap();
    let endpoints: BTreeSet<String> = repo
        .models
        .iter()
        .flat_map(|m| m.endpoints.iter().cloned())
        .collect();
    let mut errors = Vec::new();
    for l in layers() {
        let Some(c) = l.catalogue() else { continue };
        match Settings::from_file(&c).and_then(|s| s.validate().map(|_| s)) {
            Err(e) => errors.push(format!("[{}] {}: {e}", l.name, rel(&c))),
            Ok(s) => {
                for e in &endpoints {
                    if !s.models.iter().any(|m| m.endpoints.contains(e)) {
                        errors.push(format!("[{}] {}: no model serves {e}", l.name, rel(&c)));
                    }
                }
            }
        }
    }
    report("catalogues", errors);
}

#[test]
fn rabbitmq_settings_agree() {
    let conf = read(&root().join("deploy").join("rabbitmq").join("rabbitmq.conf"));
    let timeout_of = |t: &str| -> Option<u64> {
        t.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix("consumer_timeout"))
            .and_then(|r| r.trim().strip_prefix('='))
            .and_then(|v| v.trim().parse().ok())
    };
    let mut errors = Vec::new();
    let file = timeout_of(&conf);
    match file {
        None => errors.push("deploy/rabbitmq/rabbitmq.conf: consumer_timeout is not set".into()),
        Some(ms) if ms < 1_800_000 => errors.push(format!(
            "deploy/rabbitmq/rabbitmq.conf: consumer_timeout {ms} is below RabbitMQ's 30 min default"
        )),
        _ => {}
    }
    let cluster_file = root()
        .join("deploy")
        .join("rabbitmq")
        .join("rabbitmq-cluster.yaml");
    let cluster = docs(&cluster_file)
        .into_iter()
        .find(|d| text(d, &["kind"]).as_deref() == Some("RabbitmqCluster"));
    match cluster {
        None => errors.push("deploy/rabbitmq/rabbitmq-cluster.yaml: no RabbitmqCluster".into()),
        Some(c) => {
            if int(&c, &["spec", "replicas"]) != Some(3) {
                errors.push("rabbitmq-cluster.yaml: spec.replicas must be 3".into());
            }
            let extra = text(&c, &["spec", "rabbitmq", "additionalConfig"]).unwrap_or_default();
            if timeout_of(&extra) != file {
                errors.push(format!(
                    "rabbitmq-cluster.yaml: additionalConfig consumer_timeout {:?} differs from \
                     rabbitmq.conf ({file:?})",
                    timeout_of(&extra)
                ));
            }
        }
    }
    report("RabbitMQ settings", errors);
}

#[test]
fn deploy_files_hold_no_machine_specific_paths() {
    let mut files = deploy_text_files();
    files.push(root().join("docs").join("deploy.md"));
    let here = root().to_string_lossy().into_owned();
    let mut errors = Vec::new();
    for f in files {
        let Ok(t) = fs::read_to_string(&f) else {
            continue;
        };
        for bad in [here.as_str(), "/home/", "/Users/", "/root/", "C:\\"] {
            if t.contains(bad) {
                errors.push(format!(
                    "{}: contains the machine-specific path {bad}",
                    rel(&f)
                ));
            }
        }
    }
    report("machine-specific paths", errors);
}

/// Where kubectl is installed, the overlays it renders hold the same resources as the in-repo
/// resolver finds, with the same environment variables in each workload's first container
/// (JSON patches applied). Without kubectl there is nothing to compare with: every other
/// check reads the resolver alone.
#[test]
fn the_resolver_agrees_with_kubectl_kustomize() {
    let mut errors = Vec::new();
    for l in layers() {
        let rendered = match kubectl_render(&l.dir) {
            None => {
                eprintln!("kubectl is not installed: the resolver is not compared with it");
                return;
            }
            Some(Err(e)) => {
                errors.push(e);
                continue;
            }
            Some(Ok(docs)) => docs,
        };
        let env_names = |containers: &[Value]| -> Vec<String> {
            containers
                .first()
                .map(|c| {
                    seq(c.get("env"))
                        .iter()
                        .filter_map(|e| text(e, &["name"]))
                        .collect()
                })
                .unwrap_or_default()
        };
        let theirs: BTreeSet<_> = rendered
            .iter()
            .filter_map(|d| {
                let kind = text(d, &["kind"]).unwrap_or_default();
                let containers = seq(at(d, &["spec", "template", "spec", "containers"]));
                comparable(
                    &kind,
                    &text(d, &["metadata", "name"]).unwrap_or_default(),
                    if kind == "Job" || kind == "Deployment" {
                        env_names(containers)
                    } else {
                        Vec::new()
                    },
                )
            })
            .collect();
        let ours: BTreeSet<_> = l
            .res
            .iter()
            .filter_map(|r| comparable(&r.kind(), &r.name(), r.env(0).into_keys().collect()))
            .collect();
        for missing in theirs.difference(&ours) {
            errors.push(format!(
                "{}: kubectl renders {missing:?}, the resolver does not",
                l.name
            ));
        }
        for extra in ours.difference(&theirs) {
            errors.push(format!(
                "{}: the resolver finds {extra:?}, kubectl does not render it",
                l.name
            ));
        }
        assert!(!theirs.is_empty(), "{}: kubectl rendered nothing", l.name);
    }
    report("the in-repo kustomize resolver against kubectl", errors);
}
