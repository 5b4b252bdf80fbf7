//! The deployment files under deploy/, checked structurally (no Docker, no cluster, no network):
//! the compose file comes up on fresh volumes (an init service enrolls the bank the config names,
//! Kensa waits for it and for a healthy broker, long-running services restart, Kafka keeps its
//! data on its volume, the broker is reachable from the host), the Kubernetes objects provision
//! their bank and fail loudly without a GPU, the StatefulSet gives each replica its own cameras,
//! and the Grafana dashboard filters by instance, camera and product, has a unit on every panel
//! and queries heatmaps, tables and counters the way Grafana and Prometheus need.

use kensa_core::config::{Device, KensaConfig};
use serde::Deserialize as _;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A single-document YAML file.
fn yaml(path: &str) -> Value {
    serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every document of a multi-document YAML file; each must parse.
fn yaml_docs(path: &str) -> Vec<Value> {
    let text = read(path);
    let docs: Vec<Value> = serde_norway::Deserializer::from_str(&text)
        .enumerate()
        .map(|(i, doc)| Value::deserialize(doc).unwrap_or_else(|e| panic!("{path}, document {i}: {e}")))
        .collect();
    assert!(!docs.is_empty(), "{path}: no YAML document");
    docs
}

fn config(text: &str, what: &str) -> KensaConfig {
    KensaConfig::from_toml_str(text).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A config is valid apart from bank files that only exist once the init step has run.
fn assert_valid(c: &KensaConfig, what: &str) {
    let problems: Vec<String> = c.problems();
    assert!(problems.is_empty(), "{what}: {problems:?}");
}

/// A command (string, or list of strings) as shell words, without the shell's punctuation.
fn words(v: &Value) -> Vec<String> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(|x| x.as_str().unwrap_or_default()).collect::<Vec<_>>().join(" "),
        Value::Null => String::new(),
        other => panic!("not a command: {other}"),
    };
    text.split_whitespace()
        .map(|w| w.trim_matches(|c: char| matches!(c, ';' | '(' | ')' | '{' | '}' | '"' | '\'')))
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

fn has_seq(words: &[String], seq: &[&str]) -> bool {
    words.windows(seq.len()).any(|w| w.iter().zip(seq).all(|(a, b)| a == b))
}

/// The value after `flag` in the first `kensa <sub>` command of `words`.
fn arg_of(words: &[String], sub: &str, flag: &str) -> Option<String> {
    let start = words.windows(2).position(|w| w[0] == "kensa" && w[1] == sub)?;
    let rest = &words[start + 2..];
    let end = rest.iter().position(|w| w == "kensa" || w == "&&" || w == "||").unwrap_or(rest.len());
    let rest = &rest[..end];
    rest.iter().position(|w| w == flag).and_then(|i| rest.get(i + 1)).cloned()
}

/// Checks that a shell command provisions `bank` idempotently: it does nothing when the bank
/// exists (`test -f BANK`), and otherwise writes it (`kensa enroll ... --out BANK`) from
/// reference images that the same command wrote (`kensa synth --out DIR`, `--images DIR/...`).
fn assert_provisions(cmd: &[String], bank: &str, what: &str) {
    assert!(has_seq(cmd, &["test", "-f", bank]), "{what}: no `test -f {bank}` (not idempotent) in {cmd:?}");
    assert_eq!(arg_of(cmd, "enroll", "--out").as_deref(), Some(bank), "{what}: does not enroll into {bank}: {cmd:?}");
    let refs = arg_of(cmd, "synth", "--out").unwrap_or_else(|| panic!("{what}: no `kensa synth --out`: {cmd:?}"));
    let images = arg_of(cmd, "enroll", "--images").unwrap_or_else(|| panic!("{what}: no --images: {cmd:?}"));
    assert!(Path::new(&images).starts_with(&refs), "{what}: enrolls {images}, but synth wrote {refs}");
    let synth = cmd.windows(2).position(|w| w[0] == "kensa" && w[1] == "synth").unwrap();
    let enroll = cmd.windows(2).position(|w| w[0] == "kensa" && w[1] == "enroll").unwrap();
    assert!(synth < enroll, "{what}: enroll runs before synth: {cmd:?}");
}

// ---------------------------------------------------------------------------------------------
// compose

fn compose() -> Value {
    yaml("deploy/compose.yaml")
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    let s = &compose["services"][name];
    assert!(s.is_object(), "compose has no service {name}");
    s
}

/// A service's environment, from either the map or the list form.
fn environment(svc: &Value) -> BTreeMap<String, String> {
    match &svc["environment"] {
        Value::Object(m) => {
            m.iter().map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_string))).collect()
        }
        Value::Array(a) => {
            a.iter().filter_map(|x| x.as_str()?.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
        }
        _ => BTreeMap::new(),
    }
}

/// A service's mounts as (source, target), from either the short or the long form.
fn mounts(svc: &Value) -> Vec<(String, String)> {
    let Some(list) = svc["volumes"].as_array() else { return Vec::new() };
    list.iter()
        .map(|m| match m {
            Value::String(s) => {
                let parts: Vec<&str> = s.split(':').collect();
                assert!(parts.len() >= 2, "mount without a target: {s}");
                (parts[0].to_string(), parts[1].to_string())
            }
            Value::Object(o) => (
                o.get("source").and_then(Value::as_str).unwrap_or_default().to_string(),
                o["target"].as_str().unwrap().to_string(),
            ),
            other => panic!("not a mount: {other}"),
        })
        .collect()
}

/// Named volumes (declared at the top level) a service mounts, as (volume, target).
fn named_mounts(compose: &Value, svc: &Value) -> Vec<(String, String)> {
    let declared = compose["volumes"].as_object().cloned().unwrap_or_default();
    mounts(svc).into_iter().filter(|(src, _)| declared.contains_key(src)).collect()
}

/// Services others wait on with `service_completed_successfully`: one-shot init services.
fn init_services(compose: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for svc in compose["services"].as_object().unwrap().values() {
        if let Some(deps) = svc["depends_on"].as_object() {
            for (name, dep) in deps {
                if dep["condition"] == "service_completed_successfully" {
                    out.insert(name.clone());
                }
            }
        }
    }
    out
}

/// The init service kensa waits for.
fn kensa_init(compose: &Value) -> (String, &Value) {
    let kensa = service(compose, "kensa");
    let deps = kensa["depends_on"].as_object().unwrap_or_else(|| panic!("kensa depends on nothing (map form)"));
    let (name, _) = deps
        .iter()
        .find(|(_, d)| d["condition"] == "service_completed_successfully")
        .unwrap_or_else(|| panic!("kensa waits for no init service to complete: {deps:?}"));
    (name.clone(), service(compose, name))
}

fn compose_config() -> KensaConfig {
    let c = config(&read("deploy/config/kensa.toml"), "deploy/config/kensa.toml");
    assert_valid(&c, "deploy/config/kensa.toml");
    c
}

#[test]
fn compose_long_running_services_restart_and_the_init_service_runs_once() {
    let compose = compose();
    let inits = init_services(&compose);
    assert!(!inits.is_empty(), "no init service (service_completed_successfully)");
    for (name, svc) in compose["services"].as_object().unwrap() {
        let restart = svc["restart"].as_str().unwrap_or("no");
        if inits.contains(name) {
            // A one-shot restarted after it completes would never count as completed.
            assert!(!["always", "unless-stopped"].contains(&restart), "init service {name} has restart: {restart}");
        } else {
            assert!(["always", "unless-stopped"].contains(&restart), "{name} has restart: {restart}");
        }
    }
}

#[test]
fn compose_kensa_waits_for_its_bank_and_a_healthy_broker() {
    let compose = compose();
    let kensa = service(&compose, "kensa");
    assert_eq!(kensa["depends_on"]["kafka"]["condition"], "service_healthy", "{}", kensa["depends_on"]);
    assert!(service(&compose, "kafka")["healthcheck"]["test"].is_array(), "kafka has no healthcheck");
    let (name, init) = kensa_init(&compose);
    // Same image as kensa (it runs `kensa synth` and `kensa enroll`).
    assert!(init["image"].is_string() || init["build"].is_object(), "{name}: no image");
    assert_eq!(init["image"], kensa["image"], "{name} and kensa use different images");
    assert_eq!(init["build"], kensa["build"], "{name} and kensa are built differently");
}

#[test]
fn compose_init_service_writes_the_bank_the_config_names() {
    let compose = compose();
    let c = compose_config();
    let kensa = service(&compose, "kensa");
    assert!(
        mounts(kensa).contains(&("./config/kensa.toml".into(), "/etc/kensa/kensa.toml".into())),
        "kensa does not mount deploy/config/kensa.toml at /etc/kensa/kensa.toml"
    );
    assert_eq!(c.kafka.brokers, "kafka:9092");
    let (name, init) = kensa_init(&compose);
    let entry = words(&init["entrypoint"]);
    let mut cmd = entry.clone();
    cmd.extend(words(&init["command"]));
    assert!(has_seq(&cmd, &["/bin/sh", "-c"]), "{name} does not run its command with /bin/sh -c: {cmd:?}");
    let kensa_volumes = named_mounts(&compose, kensa);
    let init_volumes = named_mounts(&compose, init);
    assert!(!c.products.is_empty());
    for (product, p) in &c.products {
        let bank = p.bank.to_str().unwrap();
        assert_provisions(&cmd, bank, &format!("{name} for product {product}"));
        assert_eq!(arg_of(&cmd, "enroll", "--product").as_deref(), Some(product.as_str()));
        // On a volume both services mount at the same place.
        let shared = init_volumes.iter().find(|(_, target)| p.bank.starts_with(target));
        let (vol, target) = shared.unwrap_or_else(|| panic!("{bank} is on no named volume of {name}"));
        assert!(
            kensa_volumes.contains(&(vol.clone(), target.clone())),
            "{name} writes {bank} on {vol}:{target}, which kensa does not mount there ({kensa_volumes:?})"
        );
    }
    // The outbox survives restarts too.
    assert!(kensa_volumes.iter().any(|(_, t)| c.outbox.dir.starts_with(t)), "outbox {:?} on no volume", c.outbox.dir);
}

#[test]
fn compose_kafka_keeps_its_data_on_its_volume() {
    let compose = compose();
    let kafka = service(&compose, "kafka");
    let env = environment(kafka);
    let dirs = env.get("KAFKA_LOG_DIRS").expect("KAFKA_LOG_DIRS unset: the image writes under /tmp");
    let targets: Vec<String> = named_mounts(&compose, kafka).into_iter().map(|(_, t)| t).collect();
    assert!(!targets.is_empty(), "kafka mounts no named volume");
    for dir in dirs.split(',') {
        assert!(targets.iter().any(|t| t == dir.trim()), "KAFKA_LOG_DIRS {dir} is not a volume mount ({targets:?})");
    }
}

#[test]
fn compose_publishes_and_advertises_the_broker_for_the_host() {
    let compose = compose();
    let kafka = service(&compose, "kafka");
    let env = environment(kafka);
    // Published on the host's loopback: "127.0.0.1:29092:<container port>".
    let ports: Vec<String> = kafka["ports"]
        .as_array()
        .expect("kafka publishes no port")
        .iter()
        .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_string))
        .collect();
    let container_port = ports
        .iter()
        .find_map(|p| p.strip_prefix("127.0.0.1:29092:"))
        .unwrap_or_else(|| panic!("127.0.0.1:29092 not published: {ports:?}"))
        .to_string();
    let listeners = |key: &str| -> BTreeMap<String, String> {
        env.get(key)
            .unwrap_or_else(|| panic!("{key} unset"))
            .split(',')
            .filter_map(|l| l.trim().split_once("://"))
            .map(|(n, a)| (n.to_string(), a.to_string()))
            .collect()
    };
    let advertised = listeners("KAFKA_ADVERTISED_LISTENERS");
    let (external, _) = advertised
        .iter()
        .find(|(_, addr)| *addr == "127.0.0.1:29092")
        .unwrap_or_else(|| panic!("127.0.0.1:29092 is not advertised: {advertised:?}"));
    let bound = listeners("KAFKA_LISTENERS");
    let addr = bound.get(external).unwrap_or_else(|| panic!("listener {external} not in KAFKA_LISTENERS: {bound:?}"));
    assert!(addr.ends_with(&format!(":{container_port}")), "{external} listens on {addr}, published {container_port}");
    let map = env.get("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP").expect("no listener security protocol map");
    for name in bound.keys() {
        assert!(map.split(',').any(|m| m.trim().starts_with(&format!("{name}:"))), "{name} not in {map}");
    }
    // The containers still reach the broker as the config says.
    let brokers = compose_config().kafka.brokers;
    assert!(advertised.values().any(|a| *a == brokers), "{brokers} not advertised: {advertised:?}");
}

#[test]
fn compose_and_image_healthchecks_use_kensa_healthcheck() {
    let compose = compose();
    let test = words(&service(&compose, "kensa")["healthcheck"]["test"]);
    assert!(has_seq(&test, &["kensa", "healthcheck"]), "kensa's healthcheck: {test:?}");
    let dockerfile = read("deploy/Dockerfile");
    let line = dockerfile
        .lines()
        .find(|l| l.trim_start().starts_with("HEALTHCHECK"))
        .expect("the Dockerfile has no HEALTHCHECK");
    let w: Vec<String> =
        line.split(|c: char| c.is_whitespace() || matches!(c, '[' | ']' | ',' | '"')).map(str::to_string).collect();
    let w: Vec<String> = w.into_iter().filter(|x| !x.is_empty()).collect();
    assert!(has_seq(&w, &["kensa", "healthcheck"]), "{line}");
}

#[test]
fn the_image_runtime_has_the_kerberos_plugin_for_sasl_gssapi() {
    let dockerfile = read("deploy/Dockerfile");
    let runtime = dockerfile.rsplit_once("FROM runtime-").expect("no final runtime stage").1;
    assert!(runtime.contains("libsasl2-modules-gssapi-mit"), "GSSAPI needs cyrus-sasl's Kerberos plugin at run time");
}

#[test]
fn prometheus_scrapes_kensa_and_loads_the_mounted_rules() {
    let compose = compose();
    let prom = yaml("deploy/prometheus/prometheus.yml");
    let rule_files: Vec<&str> = prom["rule_files"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(rule_files.contains(&"/etc/prometheus/alerts.yml"), "{rule_files:?}");
    let mounted = mounts(service(&compose, "prometheus"));
    assert!(
        mounted.contains(&("./prometheus/alerts.yml".into(), "/etc/prometheus/alerts.yml".into())),
        "the alert rules are not mounted: {mounted:?}"
    );
    assert!(prom.to_string().contains("kensa:9898"), "prometheus does not scrape kensa:9898");
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    of_kind(docs, kind)
        .into_iter()
        .find(|d| d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} named {name}"))
}

fn array(v: &Value) -> &Vec<Value> {
    static EMPTY: Vec<Value> = Vec::new();
    v.as_array().unwrap_or(&EMPTY)
}

/// (volume name, mount path) of a container.
fn container_mounts(c: &Value) -> Vec<(String, String)> {
    array(&c["volumeMounts"])
        .iter()
        .map(|m| (m["name"].as_str().unwrap().to_string(), m["mountPath"].as_str().unwrap().to_string()))
        .collect()
}

/// The ConfigMap mounted at `path` in `container` of `pod`.
fn configmap_at<'a>(docs: &'a [Value], pod: &Value, container: &Value, path: &str) -> &'a Value {
    let (vol, _) = container_mounts(container)
        .into_iter()
        .find(|(_, p)| p == path)
        .unwrap_or_else(|| panic!("nothing mounted at {path}"));
    let v = array(&pod["volumes"]).iter().find(|v| v["name"] == vol.as_str()).expect("mounted volume not declared");
    named(docs, "ConfigMap", v["configMap"]["name"].as_str().expect("not a ConfigMap volume"))
}

/// The pod provisions every bank of `c` in an init container, on a volume the main container
/// mounts at the same place; the main container has the liveness and readiness probes.
fn assert_pod_provisions_banks(pod: &Value, c: &KensaConfig, what: &str) {
    let main = &pod["containers"][0];
    assert_eq!(main["livenessProbe"]["httpGet"]["path"], "/livez", "{what}");
    assert_eq!(main["readinessProbe"]["httpGet"]["path"], "/readyz", "{what}");
    let inits = array(&pod["initContainers"]);
    assert!(!inits.is_empty(), "{what}: no init container: kensa crash-loops on a fresh volume (no bank)");
    let main_mounts = container_mounts(main);
    assert!(!c.products.is_empty());
    for (product, p) in &c.products {
        let bank = p.bank.to_str().unwrap();
        let init = inits
            .iter()
            .find(|i| {
                let mut cmd = words(&i["command"]);
                cmd.extend(words(&i["args"]));
                arg_of(&cmd, "enroll", "--out").as_deref() == Some(bank)
            })
            .unwrap_or_else(|| panic!("{what}: no init container enrolls {product} into {bank}"));
        let mut cmd = words(&init["command"]);
        cmd.extend(words(&init["args"]));
        assert_provisions(&cmd, bank, &format!("{what}, init container {}", init["name"]));
        let (vol, path) = container_mounts(init)
            .into_iter()
            .find(|(_, path)| p.bank.starts_with(path))
            .unwrap_or_else(|| panic!("{what}: the init container writes {bank} on no volume"));
        assert!(main_mounts.contains(&(vol.clone(), path.clone())), "{what}: kensa does not mount {vol} at {path}");
    }
    assert!(
        main_mounts.iter().any(|(_, path)| c.outbox.dir.starts_with(path)),
        "{what}: outbox {:?} is on no volume",
        c.outbox.dir
    );
}

#[test]
fn k8s_manifests_parse_and_name_their_objects() {
    for path in ["deploy/k8s/kensa.yaml", "deploy/k8s/kensa-statefulset.yaml"] {
        for d in yaml_docs(path) {
            assert!(d["apiVersion"].is_string() && d["kind"].is_string(), "{path}: {d}");
            assert!(d["metadata"]["name"].is_string(), "{path}: {d}");
        }
    }
}

#[test]
fn k8s_deployment_provisions_its_bank_and_requires_a_gpu() {
    let docs = yaml_docs("deploy/k8s/kensa.yaml");
    let deployments = of_kind(&docs, "Deployment");
    assert_eq!(deployments.len(), 1);
    let pod = &deployments[0]["spec"]["template"]["spec"];
    let main = &pod["containers"][0];
    assert_eq!(main["resources"]["limits"]["nvidia.com/gpu"], 1);
    let args = words(&main["args"]);
    let file = arg_of(&["kensa".to_string()].into_iter().chain(args).collect::<Vec<_>>(), "run", "--config")
        .expect("kensa run without --config");
    let (dir, key) = file.rsplit_once('/').unwrap();
    let cm = configmap_at(&docs, pod, main, dir);
    let text = cm["data"][key].as_str().unwrap_or_else(|| panic!("ConfigMap has no {key}"));
    let c = config(text, key);
    assert_valid(&c, key);
    assert_eq!(c.model.device, Device::Cuda, "the GPU variant must not fall back to the CPU silently");
    assert_pod_provisions_banks(pod, &c, "Deployment");
}

#[test]
fn k8s_statefulset_gives_each_replica_its_own_config_and_cameras() {
    let docs = yaml_docs("deploy/k8s/kensa-statefulset.yaml");
    let sets = of_kind(&docs, "StatefulSet");
    assert_eq!(sets.len(), 1);
    let set = sets[0];
    let name = set["metadata"]["name"].as_str().unwrap();
    let replicas = set["spec"]["replicas"].as_u64().expect("replicas");
    assert!(replicas >= 2, "a sharded example needs at least two replicas");
    // A headless Service for the replicas' stable names.
    let svc = named(&docs, "Service", set["spec"]["serviceName"].as_str().expect("serviceName"));
    assert_eq!(svc["spec"]["clusterIP"], "None", "the StatefulSet's Service is not headless");
    let pod = &set["spec"]["template"]["spec"];
    let main = &pod["containers"][0];
    assert_eq!(main["resources"]["limits"]["nvidia.com/gpu"], 1);
    // Each pod loads the file named after its hostname (the pod name, `<set>-<ordinal>`).
    let cmd = words(&main["command"]);
    assert!(has_seq(&cmd, &["/bin/sh", "-c", "exec", "kensa", "run"]), "{cmd:?}");
    let file = arg_of(&cmd, "run", "--config").expect("kensa run without --config");
    let (dir, pattern) = file.rsplit_once('/').unwrap();
    assert_eq!(pattern, "${HOSTNAME}.toml");
    let cm = configmap_at(&docs, pod, main, dir);
    let files = cm["data"].as_object().expect("ConfigMap without data");
    let want: BTreeSet<String> = (0..replicas).map(|i| format!("{name}-{i}.toml")).collect();
    let have: BTreeSet<String> = files.keys().cloned().collect();
    assert_eq!(have, want, "one config per replica");
    // Each replica's data volume is its own.
    let templates: Vec<&str> =
        array(&set["spec"]["volumeClaimTemplates"]).iter().filter_map(|t| t["metadata"]["name"].as_str()).collect();
    assert!(!templates.is_empty(), "no volumeClaimTemplates: replicas would share (or lack) an outbox");
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    for key in &want {
        let c = config(files[key].as_str().unwrap(), key);
        assert_valid(&c, key);
        assert_eq!(c.model.device, Device::Cuda, "{key}");
        assert_eq!(c.telemetry.listen, "0.0.0.0:9898", "{key}: /metrics must be reachable for the scrape");
        assert!(!c.cameras.is_empty(), "{key}: no camera");
        for cam in &c.cameras {
            if let Some(other) = owner.insert(cam.id.clone(), key.clone()) {
                panic!("camera {} is in both {other} and {key}", cam.id);
            }
        }
        assert_pod_provisions_banks(pod, &c, key);
        for (vol, path) in container_mounts(main) {
            if c.outbox.dir.starts_with(&path) {
                assert!(templates.contains(&vol.as_str()), "{key}: outbox on {vol}, not a per-replica volume");
            }
        }
    }
}

/// The `job` label prometheus-operator gives the targets of `monitor` found through `service`:
/// the value of the Service's label named by `jobLabel`, or else the Service's name.
fn operator_job(monitor: &Value, service: &Value) -> String {
    let from_label = monitor["spec"]["jobLabel"]
        .as_str()
        .and_then(|l| service["metadata"]["labels"][l].as_str())
        .filter(|v| !v.is_empty());
    from_label.or(service["metadata"]["name"].as_str()).unwrap().to_string()
}

#[test]
fn every_service_monitor_yields_job_kensa_as_the_alert_rules_expect() {
    let rules = read("deploy/prometheus/alerts.yml");
    assert!(rules.contains(r#"up{job="kensa"}"#), "KensaDown no longer looks for job=\"kensa\"");
    for path in ["deploy/k8s/kensa.yaml", "deploy/k8s/kensa-statefulset.yaml"] {
        let docs = yaml_docs(path);
        let monitors = of_kind(&docs, "ServiceMonitor");
        assert!(!monitors.is_empty(), "{path}: no ServiceMonitor");
        for m in monitors {
            let wanted = m["spec"]["selector"]["matchLabels"].as_object().expect("matchLabels");
            let selected: Vec<&Value> = of_kind(&docs, "Service")
                .into_iter()
                .filter(|s| wanted.iter().all(|(k, v)| &s["metadata"]["labels"][k] == v))
                .collect();
            assert!(!selected.is_empty(), "{path}: the ServiceMonitor selects no Service");
            for svc in selected {
                let job = operator_job(m, svc);
                assert_eq!(job, "kensa", "{path}: Service {} is scraped as job={job:?}", svc["metadata"]["name"]);
                let ports: Vec<&Value> = array(&svc["spec"]["ports"]).iter().map(|p| &p["name"]).collect();
                for e in array(&m["spec"]["endpoints"]) {
                    assert!(ports.contains(&&e["port"]), "{path}: endpoint port {} not on the Service", e["port"]);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Grafana

fn dashboard() -> Value {
    serde_json::from_str(&read("deploy/grafana/kensa.json")).expect("deploy/grafana/kensa.json is not JSON")
}

/// Every panel, including those nested in rows (rows themselves excluded).
fn panels(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in array(list) {
            if p["type"] != "row" {
                out.push(p);
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    assert!(!out.is_empty(), "no panels");
    out
}

fn title(p: &Value) -> String {
    p["title"].as_str().unwrap_or("?").to_string()
}

/// (panel title, target) of every query.
fn targets(dash: &Value) -> Vec<(String, &Value)> {
    panels(dash).into_iter().flat_map(|p| array(&p["targets"]).iter().map(move |t| (title(p), t))).collect()
}

/// Kensa metric selectors in an expression: (name, text before it, label matchers).
fn selectors(expr: &str) -> Vec<(String, String, String)> {
    let b = expr.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("kensa_") {
        let start = i + pos;
        let mut end = start;
        while end < b.len() && word(b[end]) {
            end += 1;
        }
        i = end;
        if start > 0 && word(b[start - 1]) {
            continue;
        }
        let labels = if b.get(end) == Some(&b'{') {
            let close = expr[end..].find('}').map_or(expr.len(), |c| end + c);
            expr[end + 1..close].to_string()
        } else {
            String::new()
        };
        out.push((expr[start..end].to_string(), expr[..start].to_string(), labels));
    }
    out
}

fn provisioned_datasource() -> (String, String) {
    let ds = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    let d = &ds["datasources"][0];
    (d["type"].as_str().unwrap().to_string(), d["uid"].as_str().unwrap().to_string())
}

#[test]
fn dashboard_has_instance_camera_and_product_variables() {
    let dash = dashboard();
    let (ds_type, ds_uid) = provisioned_datasource();
    let vars = array(&dash["templating"]["list"]);
    for name in ["instance", "camera", "product"] {
        let v = vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no template variable {name}"));
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["datasource"]["uid"], ds_uid.as_str(), "{name}");
        assert_eq!(v["datasource"]["type"], ds_type.as_str(), "{name}");
        assert_eq!(v["multi"], true, "{name}");
        assert_eq!(v["includeAll"], true, "{name}");
        let q = v["query"]["query"].as_str().or_else(|| v["query"].as_str()).unwrap_or_default();
        assert!(q.starts_with("label_values(") && q.contains(&format!(", {name})")), "{name}: {q}");
    }
    assert!(dash["schemaVersion"].is_u64());
}

#[test]
fn every_panel_has_a_unit_and_the_provisioned_datasource() {
    let dash = dashboard();
    let (ds_type, ds_uid) = provisioned_datasource();
    for p in panels(&dash) {
        let unit = p["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or_default();
        assert!(!unit.trim().is_empty(), "panel `{}` has no unit", title(p));
        for ds in std::iter::once(&p["datasource"]).chain(array(&p["targets"]).iter().map(|t| &t["datasource"])) {
            assert_eq!(ds["uid"], ds_uid.as_str(), "panel `{}`", title(p));
            assert_eq!(ds["type"], ds_type.as_str(), "panel `{}`", title(p));
        }
        assert!(!array(&p["targets"]).is_empty(), "panel `{}` has no query", title(p));
    }
}

#[test]
fn no_panel_plots_a_raw_counter() {
    let dash = dashboard();
    for (panel, t) in targets(&dash) {
        let expr = t["expr"].as_str().unwrap_or_else(|| panic!("panel `{panel}`: a target without expr"));
        if expr.contains("_total") {
            assert!(expr.contains("rate(") || expr.contains("increase("), "panel `{panel}`: raw counter in {expr}");
        }
        // Each counter, not just one of them, sits directly in a rate() or increase().
        for (name, before, _) in selectors(expr) {
            if name.ends_with("_total") {
                let before = before.trim_end();
                assert!(
                    before.ends_with("rate(") || before.ends_with("increase("),
                    "panel `{panel}`: {name} is not in rate() or increase(): {expr}"
                );
            }
        }
    }
}

#[test]
fn panel_queries_filter_by_the_variables() {
    let dash = dashboard();
    let base = |n: &str| {
        ["_bucket", "_sum", "_count"].iter().fold(n.to_string(), |n, s| n.strip_suffix(s).unwrap_or(&n).into())
    };
    let with_camera = [
        "kensa_frames_captured_total",
        "kensa_frames_scored_total",
        "kensa_frames_dropped_total",
        "kensa_anomalies_total",
        "kensa_end_to_end_latency_seconds",
        "kensa_camera_up",
        "kensa_camera_state",
    ];
    let with_product = ["kensa_frames_scored_total", "kensa_anomalies_total", "kensa_image_score", "kensa_bank_info"];
    let mut used = BTreeSet::new();
    for (panel, t) in targets(&dash) {
        let expr = t["expr"].as_str().unwrap();
        let sel = selectors(expr);
        assert!(!sel.is_empty(), "panel `{panel}` queries no Kensa metric: {expr}");
        for (name, _, labels) in sel {
            let name = base(&name);
            let mut want = vec!["instance"];
            if with_camera.contains(&name.as_str()) {
                want.push("camera");
            }
            if with_product.contains(&name.as_str()) {
                want.push("product");
            }
            for var in want {
                assert!(
                    labels.contains(&format!("{var}=~\"${var}\"")),
                    "panel `{panel}`: {name} is not filtered by ${var}: {expr}"
                );
                used.insert(var);
            }
        }
    }
    assert_eq!(used.len(), 3, "{used:?}");
}

#[test]
fn heatmaps_tables_and_backlog_panels_query_the_right_shape() {
    let dash = dashboard();
    let all = panels(&dash);
    let of = |ty: &str| all.iter().filter(|p| p["type"] == ty).copied().collect::<Vec<_>>();
    let heatmaps = of("heatmap");
    assert!(!heatmaps.is_empty(), "no heatmap panel");
    for p in heatmaps {
        for t in array(&p["targets"]) {
            let expr = t["expr"].as_str().unwrap();
            assert_eq!(t["format"], "heatmap", "heatmap `{}`", title(p));
            assert!(expr.contains("_bucket") && expr.contains("by (le)"), "heatmap `{}`: {expr}", title(p));
            assert!(expr.contains("increase(") || expr.contains("rate("), "heatmap `{}`: {expr}", title(p));
        }
    }
    let tables = of("table");
    assert!(!tables.is_empty(), "no table panel");
    for p in tables {
        for t in array(&p["targets"]) {
            assert_eq!(t["instant"], true, "table `{}` is not instant", title(p));
            assert_eq!(t["range"], false, "table `{}` is a range query", title(p));
            assert_eq!(t["format"], "table", "table `{}`", title(p));
        }
    }
    let exprs: Vec<&str> = targets(&dash).into_iter().filter_map(|(_, t)| t["expr"].as_str()).collect();
    for metric in [
        "kensa_outbox_events",
        "kensa_outbox_oldest_event_seconds",
        "kensa_outbox_dropped_total",
        "kensa_events_rejected_total",
        "kensa_anomalies_total",
    ] {
        assert!(exprs.iter().any(|e| selectors(e).iter().any(|(n, _, _)| n == metric)), "no panel shows {metric}");
    }
}
