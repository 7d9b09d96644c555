//! The `imlink-auth` binary's command line: `keygen`, `--check-config` (0 or 78, the error
//! naming the file, the key and the fix), serving with a bad config (78, as systemd's
//! `RestartPreventExitStatus=78` expects), `--version`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_imlink-auth");

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("imlink-auth-cli-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn secret(path: &Path, content: &str) {
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// keygen's files, an app key and a config using them.
fn configured(tag: &str) -> (PathBuf, PathBuf) {
    let d = dir(tag);
    let out = run(&["keygen", "--out", d.join("keys").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    secret(&d.join("app.key"), "the-app-key\n");
    let cfg = d.join("imlink-auth.toml");
    std::fs::write(
        &cfg,
        r#"[nats]
urls = ["nats://127.0.0.1:4222"]
user = "auth"
password_file = "keys/nats-password"

[callout]
issuer_seed_file = "keys/issuer.nk"

[apps.1400000000]
key_files = ["app.key"]
"#,
    )
    .unwrap();
    (d, cfg)
}

#[test]
fn keygen_writes_private_keys_and_prints_only_public_material() {
    let d = dir("keygen");
    let keys = d.join("keys");
    let out = run(&[
        "keygen",
        "--out",
        keys.to_str().unwrap(),
        "--account",
        "APP",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let printed = text(&out);
    for f in ["issuer.nk", "nats-password", "nats-auth.conf"] {
        let mode = std::fs::metadata(keys.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let seed = std::fs::read_to_string(keys.join("issuer.nk")).unwrap();
    let pw = std::fs::read_to_string(keys.join("nats-password")).unwrap();
    assert!(seed.starts_with("SA"));
    assert!(!printed.contains(seed.trim()) && !printed.contains(pw.trim()));
    assert!(
        printed.contains("auth_callout") && printed.contains("issuer (auth_callout.issuer): A")
    );
    // Never silently replaced.
    let again = run(&["keygen", "--out", keys.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again).contains("--force"));
    assert_eq!(
        std::fs::read_to_string(keys.join("issuer.nk")).unwrap(),
        seed
    );
}

#[test]
fn check_config_accepts_a_good_config_and_exits_78_naming_file_key_and_fix() {
    let (d, cfg) = configured("check");
    let cfg_s = cfg.to_str().unwrap();
    let ok = run(&["--check-config", "--config", cfg_s]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(text(&ok).contains("valid"));

    // A secret file others can read.
    std::fs::set_permissions(d.join("app.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let bad = run(&["--check-config", "--config", cfg_s]);
    assert_eq!(bad.status.code(), Some(78));
    let e = text(&bad);
    assert!(
        e.contains(cfg_s) && e.contains("apps.1400000000.key_files[0]") && e.contains("chmod 600"),
        "{e}"
    );
    assert!(
        !e.contains("the-app-key"),
        "the key itself is never printed"
    );
    // Serving with it: 78 too, before anything else happens.
    let serve = run(&["--config", cfg_s]);
    assert_eq!(serve.status.code(), Some(78), "{}", text(&serve));
    std::fs::set_permissions(d.join("app.key"), std::fs::Permissions::from_mode(0o600)).unwrap();

    // An unknown key.
    let text_cfg = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text_cfg.replace("user = \"auth\"", "user = \"auth\"\nusername = \"x\""),
    )
    .unwrap();
    let bad = run(&["--check-config", "--config", cfg_s]);
    assert_eq!(bad.status.code(), Some(78));
    let e = text(&bad);
    assert!(e.contains("line 4") && e.contains("username"), "{e}");

    // No config at all.
    let missing = run(&[
        "--check-config",
        "--config",
        d.join("nope.toml").to_str().unwrap(),
    ]);
    assert_eq!(missing.status.code(), Some(78));
    assert!(text(&missing).contains("--config"));
}

#[test]
fn version_and_usage() {
    let v = run(&["--version"]);
    assert!(v.status.success());
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("imlink-auth "));
    let u = run(&["--bogus"]);
    assert_eq!(u.status.code(), Some(2));
    assert!(text(&u).contains("USAGE"));
}
