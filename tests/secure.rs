//! Kafka as plants run it (issue #20): a broker reachable only over TLS (stunnel from Debian in
//! front of tansu, with a CA this test makes) that requires SASL/SCRAM-SHA-512 (tansu's
//! `--authentication`). Kensa delivers every event with the password from the environment
//! (`${VAR}` in the config), `kensa tail --config` reads them back over TLS, and the password
//! never appears in Kensa's log. Wrong settings fail clearly: plaintext to the TLS port, an
//! unknown CA, a wrong password.

use kensa_tests::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const PASSWORD: &str = "s3cr3t-Kensa-pw";

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA and a server certificate for 127.0.0.1 signed by it, and a second CA that signed nothing.
fn make_certs(dir: &Path) {
    let ossl = |args: &[&str]| run(Command::new("openssl").current_dir(dir).args(args));
    for ca in ["ca", "other-ca"] {
        ossl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={ca}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.pem"),
        ]);
    }
    ossl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    ossl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tail(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(kensa_bin()).arg("tail").args(args).envs(env.iter().copied()).output().expect("kensa tail")
}

#[test]
fn events_cross_tls_with_sasl_scram_and_the_password_stays_secret() {
    for tool in ["openssl", "stunnel4"] {
        assert!(
            Command::new("sh").arg("-c").arg(format!("command -v {tool}")).status().unwrap().success(),
            "{tool} is missing: scripts/setup.sh installs it (Debian packages openssl, stunnel4)"
        );
    }
    let (dir, bank, topic, metrics) = rig("tls");
    let d = dir.path();
    make_certs(d);
    let (plain, tls) = (free_port(), free_port());
    let tansu = Broker::tansu();
    let broker = |auth: bool| {
        let mut c = Command::new(&tansu);
        c.current_dir(d)
            .args(["broker", "--listener-url", &format!("tcp://127.0.0.1:{plain}")])
            // Clients are told the TLS address: the broker is reachable only through stunnel.
            .args(["--advertised-listener-url", &format!("tcp://127.0.0.1:{tls}")])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if auth {
            c.arg("--authentication");
        }
        let child = c.spawn().expect("tansu");
        assert!(wait_for(Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", plain)).is_ok()));
        child
    };
    // The SCRAM user is made before authentication is switched on (tansu keeps it in sqlite).
    let mut setup = broker(false);
    run(Command::new(&tansu)
        .args(["user", "create", "kensa", PASSWORD, "--mechanism", "scram512"])
        .args(["--broker", &format!("tcp://127.0.0.1:{plain}")]));
    let _ = setup.kill();
    let _ = setup.wait();
    let tansu_child = broker(true);
    std::fs::write(
        d.join("stunnel.conf"),
        format!(
            "foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{tls}\nconnect = 127.0.0.1:{plain}\n\
             cert = {}\nkey = {}\n",
            d.join("server.pem").display(),
            d.join("server.key").display()
        ),
    )
    .unwrap();
    let stunnel = Command::new("stunnel4")
        .arg(d.join("stunnel.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("stunnel4");
    let _procs = Killed(vec![tansu_child, stunnel]);
    assert!(wait_for(Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", tls)).is_ok()));

    let mut c = base_config(&bank, &topic, &format!("127.0.0.1:{tls}"), &metrics);
    for (k, v) in [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanism", "SCRAM-SHA-512"),
        ("sasl.username", "kensa"),
        ("sasl.password", "${KENSA_TEST_KAFKA_PASSWORD}"),
        ("ssl.ca.location", "ca.pem"),
        // Compressed as plants often ask (librdkafka built with zstd); the broker stores the
        // batches as sent and the consumer decompresses them.
        ("compression.type", "zstd"),
    ] {
        c.kafka.properties.insert(k.into(), v.into());
    }
    c.cameras.push(synthetic_camera("cam", 11, 12, 0.0, 0.3));
    let cfg = write_config(d, &c);
    let env = [("KENSA_TEST_KAFKA_PASSWORD", PASSWORD)];

    // No password in the environment: a clear start-up error naming the variable.
    let mut d0 = Daemon::start(&cfg, &[], &metrics);
    assert_eq!(d0.wait(Duration::from_secs(30)), Some(1), "{}", d0.log_text());
    assert!(d0.log_text().contains("KENSA_TEST_KAFKA_PASSWORD is not set"), "{}", d0.log_text());

    let mut k = Daemon::start_with_env(&cfg, &[], &metrics, &env);
    let sent = wait_for(Duration::from_secs(120), || {
        metric(&k.scrape(), "kensa_events_published_total", &[("topic", &topic)]).unwrap_or(0.0) >= 12.0
    });
    assert!(sent, "{}\n{}", k.scrape(), k.log_text());
    let cfg_s = cfg.to_str().unwrap();
    let out = tail(&["--config", cfg_s, "--from-beginning", "--max", "12", "--idle-timeout-s", "60"], &env);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), k.log_text());
    let events: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let seqs: std::collections::BTreeSet<u64> = events.iter().map(|e| e["frame"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..12).collect(), "every event crossed TLS + SASL, zstd-compressed:\n{text}");
    assert_eq!(k.terminate(Duration::from_secs(60)), Some(0), "{}", k.log_text());
    let log = k.log_text();
    assert!(log.contains("security.protocol=SASL_SSL") && log.contains("sasl.password=<redacted>"), "{log}");
    assert!(log.contains("compression.type=zstd"), "the producer is configured for zstd: {log}");
    assert!(!log.contains(PASSWORD), "the password never appears in the log");

    // Wrong settings fail, each clearly, within the tail's metadata timeout.
    let brokers = format!("127.0.0.1:{tls}");
    let quick = ["--max", "1", "--idle-timeout-s", "3"];
    let plaintext = tail(&[&["--brokers", &brokers, "--topic", &topic][..], &quick].concat(), &[]);
    assert!(!plaintext.status.success(), "plaintext to the TLS port must fail");
    let other_ca = d.join("other-ca.pem");
    let ca_flag = format!("ssl.ca.location={}", other_ca.display());
    let unknown_ca = tail(&[&["--config", cfg_s, "-X", &ca_flag][..], &quick].concat(), &env);
    assert!(!unknown_ca.status.success(), "a server cert from another CA is refused");
    assert!(String::from_utf8_lossy(&unknown_ca.stderr).contains("certificate verify failed"), "{unknown_ca:?}");
    let wrong_pw = tail(&[&["--config", cfg_s, "-X", "sasl.password=nope"][..], &quick].concat(), &env);
    assert!(!wrong_pw.status.success(), "a wrong password is refused");
    assert!(String::from_utf8_lossy(&wrong_pw.stderr).contains("SASL"), "{wrong_pw:?}");
}
