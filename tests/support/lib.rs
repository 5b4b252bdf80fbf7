//! Helpers for Kensa's integration tests: the built binary, the test broker, daemon configs
//! built as [`KensaConfig`] values, a running daemon, a Kafka consumer, and a plain HTTP scrape
//! of `/metrics`.

use anyhow::{bail, Context, Result};
use kensa_core::config::{CameraConfig, Device, KensaConfig, ProductConfig, SourceConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use kensa_publish::InspectionEvent;

/// The `kensa` binary: `$KENSA_BIN`, else next to the test executable's target folder.
pub fn kensa_bin() -> PathBuf {
    if let Ok(p) = std::env::var("KENSA_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    dir.join("kensa")
}

/// Bootstrap servers of the test broker started by scripts/test.sh.
pub fn brokers() -> String {
    std::env::var("KENSA_TEST_BROKERS")
        .expect("KENSA_TEST_BROKERS is not set: run the tests with scripts/test.sh, which starts a tansu broker")
}

/// `../shared` (read-only test data), if present.
pub fn shared() -> Option<PathBuf> {
    let p = std::env::var("KENSA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    p.join("data").is_dir().then_some(p)
}

/// A fresh temporary folder, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("kensa-test-{name}-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var("KENSA_KEEP_TEST_FILES").is_err() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A process-unique number (for topic names and folders).
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    (t & 0xffff_ffff) * 1000 + N.fetch_add(1, Ordering::SeqCst)
}

/// Runs `kensa ARGS` to completion.
pub fn kensa(args: &[&str]) -> Output {
    Command::new(kensa_bin()).args(args).output().expect("run kensa")
}

/// Runs `kensa ARGS`, failing the test with its stderr if it does not succeed.
pub fn kensa_ok(args: &[&str]) -> Output {
    let out = kensa(args);
    assert!(out.status.success(), "kensa {args:?} failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}

/// `kensa synth --out OUT ARGS`: a synthetic data set in the MVTec layout.
pub fn synth(out: &Path, args: &[&str]) -> Output {
    let mut all = vec!["synth", "--out", out.to_str().unwrap()];
    all.extend_from_slice(args);
    kensa_ok(&all)
}

/// `kensa enroll --product PRODUCT --images IMAGES --out BANK ARGS`.
pub fn enroll(product: &str, images: &Path, bank: &Path, args: &[&str]) -> Output {
    let mut all =
        vec!["enroll", "--product", product, "--images", images.to_str().unwrap(), "--out", bank.to_str().unwrap()];
    all.extend_from_slice(args);
    kensa_ok(&all)
}

/// `kensa eval --data DATA ARGS --json JSON`: its output and the JSON it wrote.
pub fn kensa_eval(data: &Path, json: &Path, args: &[&str]) -> (Output, serde_json::Value) {
    let mut all = vec!["eval", "--data", data.to_str().unwrap()];
    all.extend_from_slice(args);
    all.extend(["--json", json.to_str().unwrap()]);
    let out = kensa_ok(&all);
    (out, read_json(json))
}

/// A JSON file, parsed.
pub fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// Writes synthetic references and enrolls them; returns the bank path.
pub fn synthetic_bank(dir: &Path, product: &str) -> PathBuf {
    synthetic_bank_of(dir, product, 4)
}

/// A bank enrolled from `refs` synthetic reference images (in `dir/refs/train/good`).
pub fn synthetic_bank_of(dir: &Path, product: &str, refs: usize) -> PathBuf {
    let line = dir.join("refs");
    synth(&line, &["--count", "0", "--train", &refs.to_string(), "--seed", "99"]);
    let bank = dir.join(format!("{product}.kbank"));
    enroll(product, &line.join("train/good"), &bank, &[]);
    bank
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A free local address (for a metrics listener).
pub fn local_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// A topic name of its own: `PREFIX-<unique>`.
pub fn unique_topic(prefix: &str) -> String {
    format!("{prefix}-{}", unique())
}

/// A running `kensa run`, killed when dropped. Its stderr goes to a file.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
    pub metrics: String,
}

impl Daemon {
    pub fn start(config: &Path, extra: &[&str], metrics: &str) -> Self {
        Self::start_with_env(config, extra, metrics, &[])
    }

    /// As [`Daemon::start`], with environment variables of its own (secrets, say).
    pub fn start_with_env(config: &Path, extra: &[&str], metrics: &str, env: &[(&str, &str)]) -> Self {
        let log = config.with_extension("log");
        let f = std::fs::File::create(&log).expect("log file");
        let child = Command::new(kensa_bin())
            .arg("run")
            .arg("--config")
            .arg(config)
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn kensa run");
        Self { child, log, metrics: metrics.to_string() }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit code (None if it had to be killed).
    pub fn terminate(&mut self, within: Duration) -> Option<i32> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        self.wait(within)
    }

    pub fn wait(&mut self, within: Duration) -> Option<i32> {
        let t0 = Instant::now();
        while t0.elapsed() < within {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }

    /// Scrapes `/metrics`, retrying until the listener answers.
    pub fn scrape(&self) -> String {
        let t0 = Instant::now();
        loop {
            match http_get(&self.metrics, "/metrics") {
                Ok((200, body)) => return body,
                other if t0.elapsed() > Duration::from_secs(30) => {
                    panic!("cannot scrape {}: {other:?}\nlog:\n{}", self.metrics, self.log_text())
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.0 GET; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    response(s)
}

/// Reads an HTTP/1.0 response to its end: (status, body). Bodies may be binary (evidence
/// PNGs): lossy, so their magic reads "\u{fffd}PNG".
fn response(mut s: TcpStream) -> Result<(u16, String)> {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let buf = String::from_utf8_lossy(&raw);
    let (head, body) = buf.split_once("\r\n\r\n").context("no HTTP header")?;
    let status: u16 = head.split_whitespace().nth(1).context("no status")?.parse()?;
    Ok((status, body.to_string()))
}

/// A plain HTTP/1.0 POST of a JSON body, with `Authorization: Bearer TOKEN` when given;
/// returns (status, body).
pub fn http_post(addr: &str, path: &str, body: &str, token: Option<&str>) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(90)))?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    response(s)
}

/// The value of a Prometheus sample `name{labels}` whose labels include every `(k, v)` given;
/// summed over matching series. None if no series matches.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (n, lab) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        if labels.iter().all(|(k, v)| lab.split(',').any(|kv| kv == format!("{k}=\"{v}\""))) {
            *total.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    total
}

/// One consumed record.
#[derive(Clone, Debug)]
pub struct Received {
    pub key: String,
    pub event: InspectionEvent,
    pub headers: std::collections::HashMap<String, String>,
}

/// Reads events from `topic` from the beginning until `expected` have arrived or `timeout`
/// passes; returns (key, event) pairs in arrival order.
pub fn consume(
    brokers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Result<Vec<(String, InspectionEvent)>> {
    let mut n = 0;
    let got = consume_until(brokers, topic, timeout, |r| {
        n = r.len();
        n >= expected
    })?;
    Ok(got.into_iter().map(|r| (r.key, r.event)).collect())
}

/// Reads `topic` from the beginning until `done(all so far)` is true or `timeout` passes, then
/// lingers 1.5 s more (anything extra would be a duplicate).
pub fn consume_until(
    brokers: &str,
    topic: &str,
    timeout: Duration,
    mut done: impl FnMut(&[Received]) -> bool,
) -> Result<Vec<Received>> {
    use rdkafka::message::Headers;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("kensa-test-{}", unique()))
        .set("enable.auto.commit", "false")
        .create()?;
    let t0 = Instant::now();
    // The topic exists once Kensa has created it.
    let parts = loop {
        let parts: Vec<i32> = match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            Ok(md) => md
                .topics()
                .iter()
                .filter(|t| t.name() == topic && t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect(),
            Err(_) => Vec::new(),
        };
        if !parts.is_empty() {
            break parts;
        }
        if t0.elapsed() > timeout {
            bail!("topic {topic} never appeared");
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut out: Vec<Received> = Vec::new();
    let mut finished = done(&out);
    let mut linger: Option<Instant> = None;
    loop {
        if finished && linger.is_none() {
            linger = Some(Instant::now());
        }
        if linger.is_some_and(|l| l.elapsed() > Duration::from_millis(1500))
            || (linger.is_none() && t0.elapsed() > timeout)
        {
            break;
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                let event = kensa_publish::decode_event(m.payload().unwrap_or_default())
                    .with_context(|| format!("undecodable event at offset {}", m.offset()))?;
                let mut headers = std::collections::HashMap::new();
                if let Some(h) = m.headers() {
                    for hd in h.iter() {
                        headers.insert(
                            hd.key.to_string(),
                            String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                out.push(Received { key, event, headers });
                if !finished {
                    finished = done(&out);
                }
            }
            Some(Err(e)) => eprintln!("consumer: {e}"),
            None => {}
        }
    }
    Ok(out)
}

/// A tansu broker of the test's own, with sqlite storage that survives a restart.
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    dir: TempDir,
}

impl Broker {
    /// The broker's process id (0 while it is down).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn start() -> Self {
        let dir = TempDir::new("broker");
        let mut b = Broker { child: None, port: free_port(), dir };
        b.up();
        b
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The tansu binary (`scripts/setup.sh` puts it in the cache).
    pub fn tansu() -> PathBuf {
        let cache = std::env::var("KENSA_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/kensa"));
        let p = cache.join("tansu/bin/tansu");
        if p.is_file() {
            p
        } else {
            PathBuf::from("tansu")
        }
    }

    /// Starts (or restarts) the broker on the same port and storage.
    pub fn up(&mut self) {
        assert!(self.child.is_none());
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("tansu.log")).unwrap();
        let child = Command::new(Self::tansu())
            .current_dir(self.dir.path())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tansu (scripts/setup.sh installs it)");
        self.child = Some(child);
        let t0 = Instant::now();
        while TcpStream::connect(self.addr()).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(20), "tansu did not come up on {}", self.addr());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the broker abruptly (SIGKILL), as a crash or a pulled cable would.
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Creates Kensa's results topic and its `.defects` companion.
    pub fn create_kensa_topics(&self, topic: &str) {
        self.create_topic(topic);
        self.create_topic(&format!("{topic}.defects"));
    }

    /// Creates a topic (sqlite storage does not create topics on first use).
    pub fn create_topic(&self, name: &str) {
        let st = Command::new(Self::tansu())
            .args(["topic", "create", name, "--partitions", "3", "--broker", &format!("tcp://{}", self.addr())])
            .status()
            .unwrap();
        assert!(st.success(), "tansu topic create {name}");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.down();
    }
}

/// Produces one record and waits for its acknowledgement.
pub fn produce(brokers: &str, topic: &str, key: &str, payload: &[u8]) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let p: BaseProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    p.send(BaseRecord::to(topic).key(key).payload(payload)).map_err(|(e, _)| e).unwrap();
    p.flush(Duration::from_secs(10)).unwrap();
}

/// Sends a signal to a process.
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap();
    assert!(st.success());
}

/// Polls `f` until it is true or `timeout` passes.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// For the shared test broker (`brokers()`): a temp folder with an enrolled synthetic bank of
/// product `disc`, a topic of its own and a free metrics address: `(dir, bank, topic, metrics)`.
pub fn rig(name: &str) -> (TempDir, PathBuf, String, String) {
    let dir = TempDir::new(name);
    let bank = synthetic_bank(dir.path(), "disc");
    (dir, bank, unique_topic(name), local_addr())
}

/// A test's own tansu broker (sqlite, restartable) with Kensa's topics created, a temp folder
/// with an enrolled synthetic bank, and a free metrics address:
/// `(broker, dir, bank, topic, metrics)`.
pub fn own_broker_rig(name: &str) -> (Broker, TempDir, PathBuf, String, String) {
    let broker = Broker::start();
    let topic = unique_topic(name);
    broker.create_kensa_topics(&topic);
    let dir = TempDir::new(name);
    let bank = synthetic_bank(dir.path(), "disc");
    (broker, dir, bank, topic, local_addr())
}

/// The daemon config the tests start from: the model on the CPU, batches of up to 4, product
/// `disc` with `bank`, events on `topic` (defects on `<topic>.defects`) at `brokers` (start-up
/// gives up after 10 s), metrics on `metrics`; no camera yet. Everything else is the default.
pub fn base_config(bank: &Path, topic: &str, brokers: &str, metrics: &str) -> KensaConfig {
    let mut cfg = KensaConfig::default();
    cfg.model.device = Device::Cpu;
    cfg.batch.max_size = 4;
    cfg.kafka.brokers = brokers.to_string();
    cfg.kafka.topic = topic.to_string();
    cfg.kafka.defects_topic = format!("{topic}.defects");
    cfg.kafka.connect_timeout_s = 10;
    cfg.telemetry.listen = metrics.to_string();
    cfg.products
        .insert("disc".into(), ProductConfig { bank: bank.to_path_buf(), judge: None, learn: Default::default() });
    cfg
}

/// A camera of product `disc` with `source`, every other field at its default.
pub fn camera(id: &str, source: SourceConfig) -> CameraConfig {
    CameraConfig { product: "disc".into(), source, ..CameraConfig::for_tests(id) }
}

/// A synthetic camera of product `disc` (`count` 0: endless; `fps` 0: as fast as it is taken).
pub fn synthetic_camera(id: &str, seed: u64, count: u64, fps: f64, defect_rate: f64) -> CameraConfig {
    camera(id, SourceConfig::Synthetic { seed, count, fps, defect_rate, phase: 0.0 })
}

/// A camera of product `disc` reading every image in `path`, as fast as it is taken.
pub fn folder_camera(id: &str, path: &Path) -> CameraConfig {
    camera(id, SourceConfig::ImageFolder { path: path.to_path_buf(), fps: 0.0 })
}

/// A camera of product `disc` reading a video file.
pub fn video_camera(id: &str, path: &Path) -> CameraConfig {
    camera(id, SourceConfig::VideoFile { path: path.to_path_buf() })
}

/// An RTSP camera of product `disc`.
pub fn rtsp_camera(id: &str, url: &str, latency_ms: u32) -> CameraConfig {
    camera(id, SourceConfig::Rtsp { url: url.to_string(), latency_ms, codec: Default::default() })
}

/// A GigE Vision camera of product `disc`.
pub fn gige_camera(id: &str, camera_name: &str) -> CameraConfig {
    camera(id, SourceConfig::Gige { camera: camera_name.to_string(), settings: Default::default() })
}

/// Writes `cfg` as TOML to `dir/kensa.toml` and returns the path. The text is parsed back
/// first, so a value that does not survive the trip fails here, with the text.
pub fn write_config(dir: &Path, cfg: &KensaConfig) -> PathBuf {
    let text = toml::to_string(cfg).expect("config serializes to TOML");
    if let Err(e) = KensaConfig::from_toml_str(&text) {
        panic!("the written config does not parse back: {e}\n{text}");
    }
    let p = dir.join("kensa.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// (upper bound, cumulative count) of a Prometheus histogram's buckets in a scrape, summed over
/// labels, by bound. For the benchmarks' latency percentiles.
pub fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let mut v: Vec<(f64, f64)> = Vec::new();
    for line in text.lines().filter(|l| l.starts_with(&format!("{name}_bucket"))) {
        let le = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("+Inf");
        let le: f64 = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
        let c: f64 = line.rsplit(' ').next().and_then(|x| x.parse().ok()).unwrap_or(0.0);
        match v.iter_mut().find(|(b, _)| *b == le) {
            Some(e) => e.1 += c,
            None => v.push((le, c)),
        }
    }
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`, ...); 0 when unreadable.
pub fn proc_status_kib(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

/// Creates a topic of `partitions` partitions on a broker (the shared test broker does not
/// create topics on first use for the tests that need one before Kensa runs).
pub fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let r = rt.block_on(admin.create_topics([&new], &AdminOptions::new())).unwrap();
    assert!(r.iter().all(Result::is_ok), "{r:?}");
}

/// A tansu broker of this test's own on the memory engine (its state survives SIGSTOP/SIGCONT).
pub struct MemoryBroker {
    pub child: std::process::Child,
    /// Where clients reach it (its advertised address).
    pub addr: String,
    /// Where it listens.
    pub listen: String,
}

impl MemoryBroker {
    pub fn start() -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        Self::spawn(addr.clone(), addr)
    }

    /// Listens on a port of its own but advertises `port` (where a [`Forwarder`] to it
    /// listens), so every client connection goes through the forwarder.
    pub fn start_advertising(port: u16) -> Self {
        Self::spawn(format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{port}"))
    }

    fn spawn(listen: String, addr: String) -> Self {
        let child = std::process::Command::new(Broker::tansu())
            .args(["broker", "--listener-url", &format!("tcp://{listen}")])
            .args(["--advertised-listener-url", &format!("tcp://{addr}")])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start tansu");
        assert!(wait_for(Duration::from_secs(20), || std::net::TcpStream::connect(&listen).is_ok()));
        Self { child, addr, listen }
    }
}

/// A TCP forwarder (`socat`, in a process group of its own) from a local port to a broker:
/// [`Forwarder::cut`] kills the group (every open connection is reset, new ones are refused:
/// the network is cut), [`Forwarder::restore`] starts it again on the same port.
pub struct Forwarder {
    child: Option<Child>,
    port: u16,
    to: String,
}

impl Forwarder {
    pub fn start(port: u16, to: &str) -> Self {
        let mut f = Self { child: None, port, to: to.to_string() };
        f.restore();
        f
    }

    pub fn restore(&mut self) {
        use std::os::unix::process::CommandExt;
        let child = Command::new("socat")
            .arg(format!("TCP-LISTEN:{},bind=127.0.0.1,fork,reuseaddr", self.port))
            .arg(format!("TCP:{}", self.to))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (Debian package socat)");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        assert!(wait_for(Duration::from_secs(20), || std::net::TcpStream::connect(&addr).is_ok()), "socat listens");
        // Still running: a socat that could not bind (the port taken meanwhile) has exited.
        let running = self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none());
        assert!(running, "socat on port {} exited (port taken?)", self.port);
    }

    pub fn cut(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", c.id())]).status();
            let _ = c.wait();
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.cut();
    }
}

impl Drop for MemoryBroker {
    fn drop(&mut self) {
        signal(self.child.id(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// tools/rtsp_server.py (GStreamer RTSP server, H.264) on a port, serving `/line`.
pub struct RtspServer(Child, Option<std::process::ChildStdout>);

impl RtspServer {
    pub fn start(port: u16) -> Option<Self> {
        Self::start_with(port, "h264")
    }

    /// With `codec` "h264" or "h265".
    pub fn start_with(port: u16, codec: &str) -> Option<Self> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/rtsp_server.py");
        let child = Command::new("/usr/bin/python3")
            .args([script, "--port", &port.to_string(), "--path", "/line", "--codec", codec])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut s = RtspServer(child, None);
        // It prints its URL once listening. The pipe stays open while it runs.
        let mut out = s.0.stdout.take()?;
        let mut buf = [0u8; 64];
        let n = std::io::Read::read(&mut out, &mut buf).ok()?;
        s.1 = Some(out);
        (n > 0 && buf.starts_with(b"rtsp://")).then_some(s)
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether the RTSP test server can run here (python3-gi, the RTSP server typelib, x264enc).
pub fn rtsp_server_available() -> bool {
    Command::new("/usr/bin/python3")
        .args(["-c", "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"])
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("gst-inspect-1.0").arg("x264enc").stdout(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Aravis' simulated GigE Vision camera on 127.0.0.1 (open it by that address), stopped when
/// dropped. None when aravis-tools or the aravissrc plugin is missing.
pub struct FakeGigeCamera(Child);

impl FakeGigeCamera {
    pub fn start() -> Option<Self> {
        let quiet = |c: &mut Command| c.stdout(Stdio::null()).stderr(Stdio::null()).status();
        let has_fake = quiet(Command::new("arv-fake-gv-camera-0.8").arg("--help")).is_ok();
        let has_src = quiet(Command::new("gst-inspect-1.0").arg("aravissrc")).is_ok_and(|s| s.success());
        if !has_fake || !has_src {
            return None;
        }
        let child = Command::new("arv-fake-gv-camera-0.8")
            .args(["-i", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        std::thread::sleep(Duration::from_secs(1));
        Some(Self(child))
    }
}

impl Drop for FakeGigeCamera {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A headless Chromium driven through chromedriver (WebDriver over HTTP): pages are loaded,
/// read, clicked and photographed as a person would. Both come from Debian's `chromium` and
/// `chromium-driver` (`scripts/setup.sh` installs them).
pub struct Browser {
    driver: Child,
    addr: String,
    session: String,
}

/// A child process killed when dropped.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// WebDriver's key for an element reference in its answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    /// Starts chromedriver on a free port and opens a session (a window of `w × h`).
    pub fn start(w: u32, h: u32) -> Self {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian chromium-driver) is not installed: run scripts/setup.sh");
        // Killed whatever happens next (a failed start must not leave it running).
        let mut guard = KillOnDrop(Some(driver));
        let addr = format!("127.0.0.1:{port}");
        let ready = || webdriver(&addr, "GET", "/status", None).is_ok_and(|(c, _)| c == 200);
        assert!(wait_for(Duration::from_secs(20), ready), "chromedriver did not start");
        // As root, offline: no sandbox, and none of Chromium's background connections.
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            &format!("--window-size={w},{h}"),
        ];
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}}}});
        let (code, body) = webdriver(&addr, "POST", "/session", Some(&caps.to_string())).expect("new session");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let session =
            v["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session ({code}): {body}")).to_string();
        Self { driver: guard.0.take().expect("chromedriver"), addr, session }
    }

    fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> serde_json::Value {
        let path = format!("/session/{}{path}", self.session);
        let body = (method != "GET").then(|| body.unwrap_or_else(|| serde_json::json!({})).to_string());
        let (code, text) = webdriver(&self.addr, method, &path, body.as_deref())
            .unwrap_or_else(|e| panic!("chromedriver {path}: {e}"));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(code, 200, "chromedriver {method} {path}: {text}");
        v["value"].clone()
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(serde_json::json!({ "url": url })));
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub fn script(&self, script: &str) -> serde_json::Value {
        self.call("POST", "/execute/sync", Some(serde_json::json!({ "script": script, "args": [] })))
    }

    /// Waits until `script` returns true in the page.
    pub fn wait_until(&self, within: Duration, script: &str) -> bool {
        wait_for(within, || self.script(script) == serde_json::Value::Bool(true))
    }

    /// The first element matching a CSS selector.
    pub fn find(&self, css: &str) -> String {
        let v = self.call("POST", "/element", Some(serde_json::json!({ "using": "css selector", "value": css })));
        v[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {v}")).to_string()
    }

    pub fn click(&self, css: &str) {
        let el = self.find(css);
        self.call("POST", &format!("/element/{el}/click"), None);
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css);
        self.call("POST", &format!("/element/{el}/value"), Some(serde_json::json!({ "text": text })));
    }

    /// The page's DOM as it is now (after its scripts ran).
    pub fn source(&self) -> String {
        self.call("GET", "/source", None).as_str().unwrap_or_default().to_string()
    }

    /// A PNG of the window, written to `path`.
    pub fn screenshot(&self, path: &Path) {
        use base64::Engine as _;
        let b64 = self.call("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap_or_default()).expect("base64");
        assert_eq!(&png[1..4], b"PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closing the session closes Chromium; then chromedriver goes.
        let _ = webdriver(&self.addr, "DELETE", &format!("/session/{}", self.session), None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// One HTTP/1.1 request to chromedriver (which answers only HTTP/1.1 and keeps the connection
/// open: the body is read by its Content-Length); returns (status, body).
fn webdriver(addr: &str, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let n = s.read(&mut buf)?;
        anyhow::ensure!(n > 0, "chromedriver closed the connection early");
        raw.extend_from_slice(&buf[..n]);
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if raw.len() >= end + 4 + len {
            let status: u16 = head.split_whitespace().nth(1).context("no status")?.parse()?;
            return Ok((status, String::from_utf8_lossy(&raw[end + 4..end + 4 + len]).into_owned()));
        }
    }
}

/// Copies an outbox folder's files (not its `.lock`) into `to`, emptied first: the spool can
/// then be read as Kensa reads it while the real folder stays exactly as a crash left it.
pub fn copy_spool(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().filter_map(std::result::Result::ok) {
        if e.path().is_file() && e.file_name() != ".lock" {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
