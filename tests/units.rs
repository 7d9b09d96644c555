//! The systemd units and the sysusers files (imlinkd's and imlink-auth's):
//! `systemd-analyze verify` says nothing, `systemd-analyze security --offline=true` scores
//! ≤ 1.5, and the directives the brief asks for are there.

use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_imlinkd");

/// imlink-auth, built by the same workspace build (`cargo nextest run --workspace`).
fn auth_bin() -> std::path::PathBuf {
    let b = Path::new(BIN).parent().unwrap().join("imlink-auth");
    assert!(b.exists(), "the workspace build has the imlink-auth binary");
    b
}

fn unit(name: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join("systemd").join(name)).unwrap()
}

/// The units in a scratch directory, with ExecStart pointing at the binary just built (verify
/// checks that the command exists).
fn staged() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("imlinkd-units-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("imlinkd.service"),
        unit("imlinkd.service").replace("/usr/bin/imlinkd", BIN),
    )
    .unwrap();
    std::fs::write(dir.join("imlinkd.socket"), unit("imlinkd.socket")).unwrap();
    std::fs::write(
        dir.join("imlink-auth.service"),
        unit("imlink-auth.service").replace("/usr/bin/imlink-auth", &auth_bin().to_string_lossy()),
    )
    .unwrap();
    dir
}

#[test]
fn systemd_analyze_verify_is_silent() {
    let dir = staged();
    let out = Command::new("systemd-analyze")
        .current_dir(&dir)
        .args([
            "verify",
            "imlinkd.service",
            "imlinkd.socket",
            "imlink-auth.service",
        ])
        .output()
        .expect("systemd-analyze (Debian package systemd; .ci/run installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "verify said: {said}"
    );
}

#[test]
fn the_service_is_hardened_to_an_exposure_of_at_most_1_5() {
    exposure_at_most_1_5("imlinkd.service");
}

#[test]
fn the_auth_service_is_hardened_to_an_exposure_of_at_most_1_5() {
    exposure_at_most_1_5("imlink-auth.service");
}

fn exposure_at_most_1_5(name: &str) {
    let dir = staged();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(dir.join(name))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no score in: {text}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unparsable: {line}"));
    eprintln!("systemd-analyze security {name}: {score}");
    assert!(score <= 1.5, "{name}: exposure {score} > 1.5:\n{text}");
}

#[test]
fn the_service_has_the_directives_the_brief_asks_for() {
    let s = unit("imlinkd.service");
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=always",
        "RestartSec=",
        "RestartPreventExitStatus=78",
        "StartLimitIntervalSec=",
        "StartLimitBurst=",
        "User=imlinkd",
        "RuntimeDirectory=imlinkd",
        "StateDirectory=imlinkd",
        "ConfigurationDirectory=imlinkd",
        "After=network-online.target time-set.target",
        "ExecReload=/bin/kill -HUP $MAINPID",
        // No core dump can carry the secrets to disk; bounded memory, tasks; no IP listener.
        "LimitCORE=0",
        "MemoryMax=",
        "TasksMax=",
        "SocketBindDeny=any",
    ] {
        assert!(s.contains(line), "imlinkd.service lacks {line}");
    }
    // Not the ones that hurt: time-sync can block forever without an RTC; PrivateUsers
    // would turn every API client into uid 65534.
    assert!(!s.contains("Wants=time-sync.target"));
    assert!(!s.lines().any(|l| l.starts_with("PrivateUsers=")));
    let sock = unit("imlinkd.socket");
    assert!(sock.contains("SocketMode=0660") && sock.contains("SocketGroup=imlinkd-clients"));
}

#[test]
fn the_auth_service_has_its_directives() {
    let s = unit("imlink-auth.service");
    for line in [
        "Type=notify",
        "ExecStart=/usr/bin/imlink-auth --config /etc/imlink-auth/imlink-auth.toml",
        "Restart=always",
        "RestartPreventExitStatus=78",
        "User=imlink-auth",
        "ConfigurationDirectory=imlink-auth",
        "After=network-online.target time-set.target",
        // No core dump can carry the issuer seed or an app key to disk; no listener.
        "LimitCORE=0",
        "MemoryMax=",
        "TasksMax=",
        "SocketBindDeny=any",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    ] {
        assert!(s.contains(line), "imlink-auth.service lacks {line}");
    }
    // It never claims a watchdog it does not ping.
    assert!(!s.contains("WatchdogSec="));
    let users =
        std::fs::read_to_string(Path::new(ROOT).join("systemd/imlink-auth.sysusers")).unwrap();
    assert!(users.lines().any(|l| l.starts_with("u imlink-auth ")));
}

#[test]
fn sysusers_creates_the_user_and_the_clients_group() {
    let root = std::env::temp_dir().join(format!("imlinkd-sysusers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.display()))
        .arg("-")
        .stdin(std::fs::File::open(Path::new(ROOT).join("systemd/imlinkd.sysusers")).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("imlinkd:") && l.contains("/var/lib/imlinkd"))
    );
    assert!(
        group
            .lines()
            .any(|l| l.starts_with("imlinkd-clients:") && l.ends_with(":imlinkd"))
    );
}
