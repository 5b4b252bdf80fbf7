//! `scripts/install.sh --prefix DIR` (issue #20): the installed binary runs for another user,
//! with a clean environment (no LD_LIBRARY_PATH, no access to the builder's cache), finding
//! libtorch beside it: it enrolls a bank with the installed backbone. The installed systemd
//! unit names the prefix everywhere, and the installed example config keeps its state (outbox,
//! banks) under the unit's StateDirectory, /var/lib/kensa.

use kensa_tests::*;
use std::process::Command;

#[test]
fn the_installed_binary_runs_as_another_user_with_its_own_libraries() {
    if unsafe_to_switch_user() {
        eprintln!("SKIP: not root here, so the installed binary cannot be run as another user");
        return;
    }
    let dir = TempDir::new("install");
    let root = dir.path();
    // Readable for the other user (TempDir is private to this one).
    let prefix = root.join("opt-kensa");
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let out = Command::new("scripts/install.sh")
        .args(["--prefix", prefix.to_str().unwrap(), "--link"])
        .env("KENSA_BIN", kensa_bin())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("installed kensa"), "{said}");
    for p in [
        "bin/kensa",
        "lib/torch/lib/libtorch_cpu.so",
        "share/kensa/models/efficientnet-lite0.pt",
        "share/kensa/kensa.service",
    ] {
        assert!(prefix.join(p).exists(), "{p} installed");
    }
    let unit = std::fs::read_to_string(prefix.join("share/kensa/kensa.service")).unwrap();
    assert!(unit.contains(&format!("ExecStart={}/bin/kensa run", prefix.display())), "{unit}");
    let backbone = format!("KENSA_BACKBONE={}/share/kensa/models/efficientnet-lite0.pt", prefix.display());
    assert!(unit.lines().any(|l| l == format!("Environment={backbone}")), "{unit}");
    assert!(!unit.contains("/opt/kensa/"), "a path of the unit still points at /opt/kensa: {unit}");
    assert!(unit.contains("StateDirectory=kensa") && unit.contains("ProtectSystem=strict"), "{unit}");
    // The example config, as installed, writes only under the unit's StateDirectory.
    let example = prefix.join("share/kensa/kensa.example.toml");
    let c = kensa_core::config::KensaConfig::from_toml_str(&std::fs::read_to_string(&example).unwrap()).unwrap();
    assert_eq!(c.outbox.dir, std::path::Path::new("/var/lib/kensa/outbox"));
    assert!(c.products.values().all(|p| p.bank.starts_with("/var/lib/kensa/")), "{:?}", c.products);
    assert!(said.contains("/var/lib/kensa/outbox"), "the next steps name the outbox: {said}");
    run_cmd(&["chmod", "-R", "a+rwX", work.to_str().unwrap()]);
    for d in [root.to_path_buf(), root.parent().unwrap().to_path_buf()] {
        run_cmd(&["chmod", "a+rx", d.to_str().unwrap()]);
    }

    // As `nobody`, with nothing of this session's environment.
    let as_nobody = |args: &[&str]| {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--", "env", "-i", "PATH=/usr/bin:/bin", "HOME=/nonexistent"])
            .arg(format!("KENSA_BACKBONE={}", prefix.join("share/kensa/models/efficientnet-lite0.pt").display()))
            .arg(prefix.join("bin/kensa"))
            .args(args)
            .current_dir(&work);
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{args:?} as nobody: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let version = as_nobody(&["--version"]);
    assert!(version.starts_with("kensa "), "{version}");
    as_nobody(&["synth", "--out", "refs", "--count", "2", "--train", "2", "--seed", "5"]);
    as_nobody(&[
        "enroll",
        "--product",
        "disc",
        "--images",
        "refs/train/good",
        "--out",
        "disc.kbank",
        "--device",
        "cpu",
    ]);
    assert!(work.join("disc.kbank").is_file(), "a bank enrolled with the installed libtorch and backbone");
    // Which libtorch it loaded: the installed one (the cache is not readable for nobody).
    let maps = Command::new("runuser")
        .args(["-u", "nobody", "--", "env", "-i", "LD_DEBUG=libs"])
        .arg(prefix.join("bin/kensa"))
        .arg("--version")
        .output()
        .unwrap();
    let debug = String::from_utf8_lossy(&maps.stderr);
    let torch =
        debug.lines().find(|l| l.contains("calling init:") && l.contains("libtorch_cpu.so")).unwrap_or_default();
    assert!(torch.contains(prefix.to_str().unwrap()), "libtorch_cpu.so from the prefix: {torch}");
}

fn run_cmd(args: &[&str]) {
    assert!(Command::new(args[0]).args(&args[1..]).status().unwrap().success(), "{args:?}");
}

/// Switching to another user needs root and runuser.
fn unsafe_to_switch_user() -> bool {
    let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    uid.map_or(true, |u| u != "0") || !std::path::Path::new("/usr/sbin/runuser").exists()
}
