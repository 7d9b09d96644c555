//! `imlinkd --check-config` and config errors: exit 78, and every message names the file, the
//! key and what is wrong.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{BIN, temp_dir};

/// The example config with its paths pointed at real files in `dir`.
fn example_in(dir: &Path) -> String {
    let pki = imlink_sandbox::pki::Pki::generate(false).unwrap();
    std::fs::write(dir.join("ca.pem"), &pki.ca_pem).unwrap();
    std::fs::write(dir.join("device.pem"), &pki.client_cert_pem).unwrap();
    std::fs::write(dir.join("device.key"), &pki.client_key_pem).unwrap();
    std::fs::write(dir.join("device-token"), "token\n").unwrap();
    for f in ["device.key", "device-token"] {
        std::fs::set_permissions(
            dir.join(f),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
    }
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/imlinkd.toml"))
            .unwrap();
    example
        .replace("/etc/imlinkd/", &format!("{}/", dir.display()))
        .replace("/var/lib/imlinkd", &dir.join("state").display().to_string())
}

fn check(path: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("--check-config").arg("--config").arg(path);
    for (k, _) in std::env::vars() {
        if k.starts_with("IMLINKD__") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("imlinkd.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn the_example_config_is_complete_and_valid() {
    let dir = temp_dir("example");
    let path = write(&dir, &example_in(&dir));
    let (code, out, err) = check(&path, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("configuration is valid"));
    assert!(err.is_empty(), "no warnings for the example: {err}");

    // Complete: every key the loader knows (it lists them when it meets an unknown one)
    // appears in the example.
    let example = example_in(&dir);
    for (section, marker) in [
        ("", "log_level = \"info\""),
        ("broker", "keepalive = \"60s\""),
        ("provisioning", "max_response_bytes = 65536"),
        ("session", "clock_retry = \"30s\""),
        ("store", "max_bytes = \"128MiB\""),
        ("api", "idle_timeout = \"5m\""),
    ] {
        let text = example.replace(marker, &format!("{marker}\nzz_unknown = 1"));
        let (_, _, err) = check(&write(&dir, &text), &[]);
        let listed = err
            .split("expected ")
            .nth(1)
            .unwrap_or_else(|| panic!("{section}: {err}"));
        let listed = listed.trim_start_matches("one of ");
        for key in listed.split(", ").map(|k| k.split('`').nth(1).unwrap()) {
            // A key that excludes another (broker.url / broker.urls) may be shown commented out.
            let present = example.contains(&format!("\n{key} ="))
                || example.contains(&format!("\n# {key} ="))
                || example.contains(&format!("\n[{key}]"));
            assert!(present, "[{section}] {key} is not in config/imlinkd.toml");
        }
    }
}

/// Each mistake, and the words the error must contain (file name, key, what is wrong).
#[test]
fn mistakes_exit_78_and_name_the_file_the_key_and_the_fix() {
    let dir = temp_dir("mistakes");
    let good = example_in(&dir);
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "bad user id",
            good.replace("user_id = \"kiosk-0042\"", "user_id = \"kiosk 42\""),
            vec!["user_id", "7003", "kiosk 42"],
        ),
        (
            "unknown top-level key",
            good.replace(
                "log_level = \"info\"",
                "log_level = \"info\"\nlog_levle = \"x\"",
            ),
            vec!["unknown field `log_levle`", "top level"],
        ),
        (
            "unknown key in a section",
            good.replace("keepalive = \"60s\"", "keepalive = \"60s\"\nkeep_alive = 5"),
            vec!["unknown field `keep_alive`", "broker"],
        ),
        (
            "wrong type",
            good.replace("sdk_app_id = 1400000000", "sdk_app_id = \"x\""),
            vec!["sdk_app_id", "integer"],
        ),
        (
            "plaintext mqtt",
            good.replace("mqtts://im.example.com:8883", "mqtt://im.example.com:1883"),
            vec!["broker.url", "in the clear", "mqtts://"],
        ),
        (
            "url and urls both",
            good.replace(
                "url = \"mqtts://im.example.com:8883\"",
                "url = \"mqtts://im.example.com:8883\"\nurls = [\"mqtts://a:8883\"]",
            ),
            vec!["broker.urls", "not both"],
        ),
        (
            "a bad node in the failover list",
            good.replace(
                "url = \"mqtts://im.example.com:8883\"",
                "urls = [\"mqtts://a:8883\", \"mqtt://b:1883\"]",
            ),
            vec!["broker.urls[1]", "in the clear"],
        ),
        (
            "a node listed twice",
            good.replace(
                "url = \"mqtts://im.example.com:8883\"",
                "urls = [\"mqtts://a:8883\", \"mqtts://a:8883\"]",
            ),
            vec!["broker.urls[1]", "twice"],
        ),
        (
            "an unknown protocol",
            good.replace("protocol = \"v5\"", "protocol = \"v4\""),
            vec!["broker.protocol", "\"v4\"", "v3.1.1", "auto"],
        ),
        (
            "a store cap too small",
            good.replace("max_bytes = \"128MiB\"", "max_bytes = \"100KiB\""),
            vec!["store.max_bytes", "at least 1MiB"],
        ),
        (
            "missing CA file",
            good.replacen(
                &format!("{}/ca.pem", dir.display()),
                "/nonexistent/ca.pem",
                1,
            ),
            vec!["broker.ca_file", "/nonexistent/ca.pem", "No such file"],
        ),
        (
            "keepalive too short",
            good.replace("keepalive = \"60s\"", "keepalive = \"2s\""),
            vec!["broker.keepalive", "between 5s and 65535s"],
        ),
        (
            "not a duration",
            good.replace("backoff_cap = \"5m\"", "backoff_cap = \"5 minutes\""),
            vec!["\"5 minutes\" is not a duration", "15m"],
        ),
        (
            "bad on_kick",
            good.replace("on_kick = \"stay_offline\"", "on_kick = \"fight\""),
            vec!["session.on_kick", "relogin_after"],
        ),
        (
            "a relogin cool-down that would be a fight",
            good.replace(
                "on_kick = \"stay_offline\"",
                "on_kick = { relogin_after = \"1s\" }",
            ),
            vec!["session.on_kick.relogin_after", "at least \"1m\""],
        ),
        (
            "a takeover cool-down that would be a fight",
            good.replace("takeover_cooldown = \"10m\"", "takeover_cooldown = \"5s\""),
            vec!["session.takeover_cooldown", "1m"],
        ),
        (
            "missing token file",
            good.replace("device-token\"", "no-such-token\""),
            vec!["provisioning.token_file", "no-such-token"],
        ),
        (
            "client cert without key",
            good.replacen(
                &format!("client_key = \"{}/device.key\"", dir.display()),
                "",
                1,
            ),
            vec!["broker.client_cert", "both or neither"],
        ),
        (
            "provisioning over plain http",
            good.replace(
                "https://provisioning.example.com",
                "http://provisioning.example.com",
            ),
            vec!["provisioning.url", "loopback"],
        ),
        (
            "client id without the user",
            good.replace(
                "client_id = \"{sdk_app_id}:{user_id}:{platform}:{instance}\"",
                "client_id = \"fixed\"",
            ),
            vec!["broker.client_id", "{user_id}"],
        ),
        (
            "TOML syntax",
            good.replace("[session]", "[session"),
            vec!["TOML parse error", "line"],
        ),
    ];
    for (what, text, words) in cases {
        let path = write(&dir, &text);
        let (code, _, err) = check(&path, &[]);
        assert_eq!(code, 78, "{what}: {err}");
        assert!(
            err.contains(&path.display().to_string()),
            "{what}: the file is named: {err}"
        );
        for w in words {
            assert!(err.contains(w), "{what}: {w:?} missing from: {err}");
        }
    }
    let (code, _, err) = check(&dir.join("missing.toml"), &[]);
    assert_eq!(code, 78);
    assert!(
        err.contains("no such file") && err.contains("--config"),
        "{err}"
    );
}

#[test]
fn environment_overrides_apply_and_are_named_in_errors() {
    let dir = temp_dir("env");
    let path = write(&dir, &example_in(&dir));
    let (code, _, err) = check(&path, &[("IMLINKD__SESSION__BACKOFF_CAP", "2m")]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = check(&path, &[("IMLINKD__BROKER__URL", "mqtt://x:1")]);
    assert_eq!(code, 78);
    assert!(
        err.contains("broker.url") && err.contains("IMLINKD__BROKER__URL"),
        "{err}"
    );
    let (code, _, err) = check(&path, &[("IMLINKD__BROKER__NOPE", "1")]);
    assert_eq!(code, 78);
    assert!(
        err.contains("unknown field `nope`") && err.contains("IMLINKD__BROKER__NOPE"),
        "{err}"
    );
    let (code, _, err) = check(&path, &[("IMLINKD__USER_ID", "has space")]);
    assert_eq!(code, 78);
    assert!(err.contains("7003"), "{err}");
}

#[test]
fn secret_files_readable_by_others_are_warned_about() {
    let dir = temp_dir("perm");
    let path = write(&dir, &example_in(&dir));
    for f in ["device-token", "device.key"] {
        std::fs::set_permissions(
            dir.join(f),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
    }
    let (code, _, err) = check(&path, &[]);
    assert_eq!(code, 0);
    assert!(
        err.contains("provisioning.token_file") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(err.contains("broker.client_key"), "{err}");
}

#[test]
fn a_dot_in_the_instance_is_valid_but_warned_about_for_nats() {
    let dir = temp_dir("dot-instance");
    let text = example_in(&dir).replace("instance = \"", "instance = \"kiosk.");
    assert!(
        text.contains("instance = \"kiosk."),
        "the example sets instance"
    );
    let (code, _, err) = check(&write(&dir, &text), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("instance") && err.contains("NATS refuses"),
        "{err}"
    );
}
