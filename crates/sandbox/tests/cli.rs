//! The `imlink-sandbox` binary: `--issue-sig` matches the public generators, and serving
//! prints and writes its endpoints.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_imlink-sandbox");

#[test]
fn issue_sig_reproduces_the_reference_vectors() {
    let vectors: serde_json::Value =
        serde_json::from_str(include_str!("../../usersig/tests/data/usersig-v2.json")).unwrap();
    for case in vectors["cases"].as_array().unwrap() {
        if !case["userbuf"].is_null() {
            continue; // the CLI issues login sigs, which carry no userbuf
        }
        let out = Command::new(BIN)
            .args([
                "--issue-sig",
                "--user",
                case["identifier"].as_str().unwrap(),
            ])
            .args(["--sdk-app-id", &vectors["sdkappid"].to_string()])
            .args(["--key", vectors["key"].as_str().unwrap()])
            .args(["--expire", &vectors["expire"].to_string()])
            .args(["--time", &vectors["time"].to_string()])
            .output()
            .unwrap();
        assert!(out.status.success());
        let sig = String::from_utf8(out.stdout).unwrap();
        let ours = imlink_usersig::decode(sig.trim()).unwrap();
        let theirs = imlink_usersig::decode(case["usersig"].as_str().unwrap()).unwrap();
        assert_eq!(ours, theirs, "same fields and HMAC as {}", case["layout"]);
        assert_eq!(ours.hmac_base64(), case["sig_hmac_b64"].as_str().unwrap());
    }
}

#[test]
fn issue_sig_without_its_inputs_is_a_usage_error() {
    let out = Command::new(BIN)
        .args(["--issue-sig", "--user", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--issue-sig needs"));
    let out = Command::new(BIN).arg("--bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown argument --bogus"));
}

#[test]
fn serving_prints_and_writes_the_endpoints() {
    let dir = std::env::temp_dir().join(format!("imlink-sandbox-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut child = Command::new(BIN)
        .arg("--state-dir")
        .arg(&dir)
        .args(["--operator", "ops"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The JSON document ends with a line holding only "}".
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "stdout ended early: {printed}"
        );
        printed.push_str(&line);
        if line == "}\n" {
            break;
        }
    }
    let shown: serde_json::Value = serde_json::from_str(&printed).unwrap();
    assert!(
        shown["mqtt_url"]
            .as_str()
            .unwrap()
            .starts_with("mqtts://127.0.0.1:")
    );
    assert!(
        shown["provisioning_url_template"]
            .as_str()
            .unwrap()
            .contains("{user_id}")
    );
    assert!(
        shown.get("ca_pem").is_none(),
        "the CA goes to a file, not the terminal"
    );
    let mut written = String::new();
    std::fs::File::open(dir.join("endpoints.json"))
        .unwrap()
        .read_to_string(&mut written)
        .unwrap();
    let written: serde_json::Value = serde_json::from_str(&written).unwrap();
    assert_eq!(written["device_token"], shown["device_token"]);
    let mode = |f: &str| std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("endpoints.json"), 0o600, "it holds the tokens");
    assert_eq!(mode("client.key"), 0o600);
    assert_eq!(mode("device-token"), 0o600);
    assert_eq!(mode("endpoints.env"), 0o600);
    // The operator identity's token: in endpoints.json and its own 0600 file.
    assert_eq!(mode("operator-ops.token"), 0o600);
    let token = std::fs::read_to_string(dir.join("operator-ops.token")).unwrap();
    assert_eq!(written["operators"]["ops"].as_str(), Some(token.trim()));
    assert_eq!(token.trim().len(), 32);
    let env = std::fs::read_to_string(dir.join("endpoints.env")).unwrap();
    assert!(
        env.contains(&format!(
            "MQTT_URL='{}'",
            shown["mqtt_url"].as_str().unwrap()
        )),
        "{env}"
    );
    assert!(env.contains("ADMIN_TOKEN='") && env.contains("PROVISIONING_URL_TEMPLATE='https://"));
    assert!(
        std::fs::read_to_string(dir.join("ca.pem"))
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM is a clean stop: {status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
