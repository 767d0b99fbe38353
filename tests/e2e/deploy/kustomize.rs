//! Kubernetes: kustomize layers (resources, plus environment added by JSON patches).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

#[derive(Clone, Debug)]
pub(crate) enum EnvSrc {
    Lit(String),
    Secret { name: String, key: String },
    ConfigMap { name: String, key: String },
    Other,
}

pub(crate) fn env_entry(e: &Value) -> Option<(String, EnvSrc)> {
    let name = text(e, &["name"])?;
    let src = if let Some(v) = e.get("value") {
        EnvSrc::Lit(scalar(v).unwrap_or_default())
    } else if let Some(r) = at(e, &["valueFrom", "secretKeyRef"]) {
        EnvSrc::Secret {
            name: text(r, &["name"]).unwrap_or_default(),
            key: text(r, &["key"]).unwrap_or_default(),
        }
    } else if let Some(r) = at(e, &["valueFrom", "configMapKeyRef"]) {
        EnvSrc::ConfigMap {
            name: text(r, &["name"]).unwrap_or_default(),
            key: text(r, &["key"]).unwrap_or_default(),
        }
    } else {
        EnvSrc::Other
    };
    Some((name, src))
}

#[derive(Clone, Debug)]
pub(crate) struct Res {
    pub(crate) file: PathBuf,
    pub(crate) doc: Value,
    /// Env entries that the layers' JSON patches append to the first container.
    pub(crate) added_env: Vec<(String, EnvSrc)>,
}

impl Res {
    pub(crate) fn kind(&self) -> String {
        text(&self.doc, &["kind"]).unwrap_or_default()
    }
    pub(crate) fn name(&self) -> String {
        text(&self.doc, &["metadata", "name"]).unwrap_or_default()
    }
    pub(crate) fn at(&self) -> String {
        format!("{} {} ({})", self.kind(), self.name(), rel(&self.file))
    }
    pub(crate) fn containers(&self) -> &[Value] {
        let spec = if self.kind() == "Job" || self.kind() == "Deployment" {
            at(&self.doc, &["spec", "template", "spec", "containers"])
        } else {
            None
        };
        seq(spec)
    }
    pub(crate) fn pod_spec(&self) -> Option<&Value> {
        at(&self.doc, &["spec", "template", "spec"])
    }
    pub(crate) fn env(&self, container_index: usize) -> BTreeMap<String, EnvSrc> {
        let mut env: BTreeMap<String, EnvSrc> = self
            .containers()
            .get(container_index)
            .map(|c| seq(c.get("env")).iter().filter_map(env_entry).collect())
            .unwrap_or_default();
        if container_index == 0 {
            env.extend(self.added_env.iter().cloned());
        }
        env
    }
}

pub(crate) fn kustomization(dir: &Path) -> Value {
    let docs = docs(&dir.join("kustomization.yaml"));
    docs.into_iter().next().unwrap_or(Value::Null)
}

pub(crate) fn list_strings(v: Option<&Value>) -> Vec<String> {
    seq(v).iter().filter_map(scalar).collect()
}

pub(crate) fn selector_matches(selector: &str, l: &BTreeMap<String, String>) -> bool {
    selector.split(',').all(|kv| match kv.split_once('=') {
        Some((k, v)) => l.get(k.trim()).map(String::as_str) == Some(v.trim()),
        None => false,
    })
}

/// Builds a kustomize directory: its resources (recursively) with the environment entries
/// that its JSON6902 patches append. Problems (missing files, patches matching nothing) are
/// collected into `problems`.
pub(crate) fn build(dir: &Path, problems: &mut Vec<String>) -> Vec<Res> {
    let k = kustomization(dir);
    let kfile = rel(&dir.join("kustomization.yaml"));
    let mut out = Vec::new();
    for r in list_strings(k.get("resources")) {
        let p = dir.join(&r);
        if p.is_dir() {
            out.extend(build(&p, problems));
        } else if p.is_file() {
            for d in docs(&p) {
                out.push(Res {
                    file: p.clone(),
                    doc: d,
                    added_env: vec![],
                });
            }
        } else {
            problems.push(format!("{kfile}: resource {r} does not exist"));
        }
    }
    for patch in seq(k.get("patches")) {
        let Some(path) = text(patch, &["path"]) else {
            continue;
        };
        let p = dir.join(&path);
        if !p.is_file() {
            problems.push(format!("{kfile}: patch {path} does not exist"));
            continue;
        }
        let pdocs = docs(&p);
        let target = patch.get("target");
        let matches = |r: &Res, smp: Option<&Value>| -> bool {
            if let Some(t) = target {
                text(t, &["kind"]).is_none_or(|k| k == r.kind())
                    && text(t, &["name"]).is_none_or(|n| n == r.name())
                    && text(t, &["labelSelector"]).is_none_or(|s| {
                        selector_matches(&s, &labels(at(&r.doc, &["metadata", "labels"])))
                    })
            } else if let Some(smp) = smp {
                text(smp, &["kind"]) == Some(r.kind())
                    && text(smp, &["metadata", "name"]) == Some(r.name())
            } else {
                false
            }
        };
        let smp = pdocs.first().filter(|d| d.is_mapping());
        let mut hit = 0;
        for r in out.iter_mut() {
            if !matches(r, smp) {
                continue;
            }
            hit += 1;
            for op in pdocs.iter().flat_map(|d| seq(Some(d))) {
                let is_env_add = text(op, &["op"]).as_deref() == Some("add")
                    && text(op, &["path"]).is_some_and(|p| p.ends_with("/containers/0/env/-"));
                if is_env_add && let Some(e) = op.get("value").and_then(env_entry) {
                    r.added_env.push(e);
                }
            }
        }
        if hit == 0 {
            problems.push(format!(
                "{kfile}: patch {path} matches no resource of this layer"
            ));
        }
    }
    out
}

pub(crate) struct Layer {
    pub(crate) name: String,
    pub(crate) dir: PathBuf,
    pub(crate) res: Vec<Res>,
    pub(crate) problems: Vec<String>,
}

impl Layer {
    pub(crate) fn of_kind(&self, kind: &str) -> Vec<&Res> {
        self.res.iter().filter(|r| r.kind() == kind).collect()
    }
    pub(crate) fn find(&self, kind: &str, name: &str) -> Option<&Res> {
        self.res
            .iter()
            .find(|r| r.kind() == kind && r.name() == name)
    }
    /// The catalogue file the layer's `volley-config` ConfigMap is generated from.
    pub(crate) fn catalogue(&self) -> Option<PathBuf> {
        catalogue_of(&self.dir)
    }
}

pub(crate) fn catalogue_of(dir: &Path) -> Option<PathBuf> {
    let k = kustomization(dir);
    for g in seq(k.get("configMapGenerator")) {
        if text(g, &["name"]).as_deref() == Some("volley-config") {
            let f = list_strings(g.get("files")).into_iter().next()?;
            let f = f.rsplit('=').next().unwrap().to_owned();
            return Some(dir.join(f));
        }
    }
    for r in list_strings(k.get("resources")) {
        let p = dir.join(r);
        if p.is_dir()
            && let Some(c) = catalogue_of(&p)
        {
            return Some(c);
        }
    }
    None
}

/// Keys of the ConfigMaps a kustomize directory generates (overlays merge into their bases).
pub(crate) fn generated_configmaps(dir: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let k = kustomization(dir);
    let mut out = BTreeMap::new();
    for r in list_strings(k.get("resources")) {
        let p = dir.join(r);
        if p.is_dir() {
            out.extend(generated_configmaps(&p));
        }
    }
    for g in seq(k.get("configMapGenerator")) {
        let Some(name) = text(g, &["name"]) else {
            continue;
        };
        let mut keys: BTreeSet<String> = list_strings(g.get("literals"))
            .iter()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_owned()))
            .collect();
        keys.extend(list_strings(g.get("files")).iter().map(|f| {
            match f.split_once('=') {
                Some((k, _)) => k.to_owned(),
                None => Path::new(f)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            }
        }));
        let entry = out.entry(name).or_insert_with(BTreeSet::new);
        if text(g, &["behavior"]).as_deref() == Some("replace") {
            entry.clear();
        }
        entry.extend(keys);
    }
    out
}

/// Secret name -> keys, from deploy/base/secrets.example.yaml (the documented Secret).
pub(crate) fn example_secrets() -> BTreeMap<String, BTreeSet<String>> {
    docs(
        &root()
            .join("deploy")
            .join("base")
            .join("secrets.example.yaml"),
    )
    .iter()
    .filter(|d| text(d, &["kind"]).as_deref() == Some("Secret"))
    .map(|d| {
        let keys = ["stringData", "data"]
            .iter()
            .filter_map(|f| d.get(*f).and_then(|m| m.as_mapping()))
            .flat_map(|m| m.keys().filter_map(scalar))
            .collect();
        (text(d, &["metadata", "name"]).unwrap_or_default(), keys)
    })
    .collect()
}

pub(crate) fn layers() -> Vec<Layer> {
    let mut dirs = vec![("base".to_owned(), root().join("deploy").join("base"))];
    let overlays = root().join("deploy").join("overlays");
    let mut names: Vec<_> = fs::read_dir(&overlays)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_else(|_| Vec::new());
    names.sort();
    for p in names {
        if p.join("kustomization.yaml").is_file() {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            dirs.push((n, p));
        }
    }
    dirs.into_iter()
        .map(|(name, dir)| {
            let mut problems = Vec::new();
            let res = build(&dir, &mut problems);
            Layer {
                name,
                dir,
                res,
                problems,
            }
        })
        .collect()
}

pub(crate) fn layer<'a>(ls: &'a [Layer], name: &str) -> &'a Layer {
    ls.iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("deploy/overlays/{name}/kustomization.yaml is missing"))
}

/// `volley/<bin>` from `volley/<bin>:tag` (or a registry path ending in it).
pub(crate) fn image_repo(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    let name = last.split(':').next().unwrap_or(last);
    let parent = image.rsplit('/').nth(1).unwrap_or("");
    format!("{parent}/{name}")
}

pub(crate) fn container_port(c: &Value, port: &Value) -> Option<i64> {
    if let Some(n) = port.as_i64() {
        return Some(n);
    }
    let name = port.as_str()?;
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    seq(c.get("ports"))
        .iter()
        .find(|p| text(p, &["name"]).as_deref() == Some(name))
        .and_then(|p| int(p, &["containerPort"]))
}

/// Runs the literal environment of a service through Volley's own settings loader.
pub(crate) fn settings_accept(
    catalogue: &Path,
    env: &BTreeMap<String, EnvSrc>,
    sim: &BTreeSet<String>,
) -> Result<Settings, String> {
    let mut map: HashMap<String, String> = HashMap::new();
    for (k, v) in env {
        if !k.starts_with("VOLLEY_") || sim.contains(k) || k == "VOLLEY_CONFIG" {
            continue;
        }
        let value = match v {
            EnvSrc::Lit(s) => s.clone(),
            // Secret/ConfigMap values are not known here; a placeholder still lets the loader
            // check the name (e.g. that VOLLEY_PROVIDER_<NAME>_API_KEY names a provider).
            _ if k.ends_with("_URL") => "http://placeholder".to_owned(),
            _ => "placeholder".to_owned(),
        };
        map.insert(k.clone(), value);
    }
    map.insert(
        "VOLLEY_CONFIG".to_owned(),
        catalogue.to_string_lossy().into_owned(),
    );
    Settings::load_from(&map).map_err(|e| e.to_string())
}

/// What `kubectl kustomize DIR` renders (the documents a cluster would receive), or `None`
/// when kubectl is not installed. The in-repo resolver above stays the one every check reads:
/// kubectl is not in Debian's packages at a version that has `kustomize` v5 (scripts/setup.sh
/// cannot install it), so the checks must run without it; where it is there, the resolver is
/// checked against it (`the_resolver_agrees_with_kubectl_kustomize`).
pub(crate) fn kubectl_render(dir: &Path) -> Option<Result<Vec<Value>, String>> {
    let out = match std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Err(format!("kubectl: {e}"))),
    };
    if !out.status.success() {
        return Some(Err(format!(
            "kubectl kustomize {}: {}",
            rel(dir),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut docs = Vec::new();
    // kubectl separates documents with a `---` line.
    for d in text.split("\n---\n") {
        match serde_yaml::from_str::<Value>(d) {
            Ok(Value::Null) => {}
            Ok(v) => docs.push(v),
            Err(e) => return Some(Err(format!("kubectl kustomize {}: {e}", rel(dir)))),
        }
    }
    Some(Ok(docs))
}

/// What the resolver and kubectl are compared on: every resource but the generated ones
/// (kubectl names ConfigMaps and Secrets with a content hash), and the names of the first
/// container's environment variables of each workload.
pub(crate) fn comparable(
    kind: &str,
    name: &str,
    env_names: Vec<String>,
) -> Option<(String, String, BTreeSet<String>)> {
    (kind != "ConfigMap" && kind != "Secret").then(|| {
        (
            kind.to_owned(),
            name.to_owned(),
            env_names.into_iter().collect(),
        )
    })
}
