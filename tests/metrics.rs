//! The `metrics` API method and `imlinkctl metrics` on a real daemon against the sandbox; the
//! text they give is checked by Prometheus' own `promtool check metrics` (Debian package
//! `prometheus`), which must pass with no lint at all.

mod common;

use std::process::Stdio;

use common::*;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// `promtool check metrics` on `text`: (success, what it said).
async fn promtool(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/setup installs it)");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imlinkctl_metrics_of_an_online_daemon_pass_promtool_without_lint() {
    let sb = sandbox().await;
    let d = Daemon::start(&sb, Opts::user("kiosk-m")).await;
    d.wait_phase("online").await;
    let out = Command::new(CTL)
        .arg("--socket")
        .arg(&d.socket)
        .arg("metrics")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (ok, said) = promtool(&text).await;
    assert!(ok && said.trim().is_empty(), "promtool: {said}\n{text}");
    for want in [
        "imlinkd_phase{phase=\"online\"} 1",
        "imlinkd_phase{phase=\"connecting\"} 0",
        "imlinkd_login_status 1",
        "imlinkd_logins_total 1",
        "imlinkd_connect_attempts_total 1",
        "imlinkd_inbox_subscribed 1",
        "imlinkd_messages_sent_total 0",
        "imlinkd_last_error_code{class=\"none\"} 0",
        "imlinkd_usersig_expiry_timestamp_seconds ",
        "imlinkd_store_bytes ",
        "imlinkd_info{version=\"0.1.0\",user_id=\"kiosk-m\"",
    ] {
        assert!(text.contains(want), "{want} in\n{text}");
    }
    assert!(text.ends_with("# EOF\n"));

    // The API method itself (reader role): the same text in {"text": …}.
    let r = d.rpc("metrics", json!({})).await;
    let via_api = r["result"]["text"].as_str().expect("a text");
    assert!(via_api.contains("imlinkd_phase{phase=\"online\"} 1"));

    // After a kick the figures move and still pass.
    sb.kick("kiosk-m");
    d.wait_phase("kicked").await;
    let r = d.rpc("metrics", json!({})).await;
    let text = r["result"]["text"].as_str().unwrap().to_string();
    let (ok, said) = promtool(&text).await;
    assert!(ok && said.trim().is_empty(), "promtool: {said}\n{text}");
    assert!(text.contains("imlinkd_phase{phase=\"kicked\"} 1"), "{text}");
    assert!(text.contains("imlinkd_kicks_total 1"), "{text}");
    assert!(
        text.contains("imlinkd_last_error_code{class=\"kicked\"} 6208"),
        "{text}"
    );
    d.finish().await;
}

/// The alert rules of docs/operations.md: valid for promtool, and they fire on the series the
/// daemon exports (a unit test of the rules with promtool's own evaluator).
#[tokio::test]
async fn the_documented_alert_rules_pass_promtool_and_fire() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    let block = doc
        .split("<!-- alert-rules")
        .nth(1)
        .and_then(|b| b.split("<!-- /alert-rules -->").next())
        .expect("the alert-rules block in docs/operations.md");
    let yaml = block
        .split("```yaml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a yaml fence");
    let dir = temp_dir("rules");
    let rules = dir.join("imlinkd.rules.yml");
    std::fs::write(&rules, yaml).unwrap();
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .await
        .expect("promtool (Debian package prometheus)");
    assert!(out.status.success(), "{out:?}");

    // Series as the daemon exports them; each alert fires when it should, and only then.
    let test = format!(
        r#"rule_files: ["{rules}"]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'imlinkd_usersig_renewal_failures{{instance="k1"}}'
        values: '0 1 2 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3'
      - series: 'imlinkd_phase{{instance="k2",phase="kicked"}}'
        values: '0 0 1 1 1'
      - series: 'imlinkd_phase{{instance="k3",phase="online"}}'
        values: '0x20'
      - series: 'imlinkd_phase_since_seconds{{instance="k3"}}'
        values: '0x20'
      - series: 'imlinkd_info{{instance="k3"}}'
        values: '1x20'
    alert_rule_test:
      - eval_time: 10m
        alertname: ImlinkdUserSigRenewalFailing
        exp_alerts: []
      - eval_time: 20m
        alertname: ImlinkdUserSigRenewalFailing
        exp_alerts:
          - exp_labels: {{instance: k1, severity: warning}}
            exp_annotations:
              summary: "k1: UserSig renewal failed 3 times in a row"
      - eval_time: 4m
        alertname: ImlinkdStoppedOrKicked
        exp_alerts:
          - exp_labels: {{instance: k2, phase: kicked, severity: critical}}
            exp_annotations:
              summary: "k2: imlinkd is kicked"
      - eval_time: 15m
        alertname: ImlinkdOffline
        exp_alerts:
          - exp_labels: {{instance: k3, phase: online, severity: warning}}
            exp_annotations:
              summary: "k3: imlinkd has not been online for 10 minutes"
      - eval_time: 15m
        alertname: ImlinkdAbsent
        exp_alerts: []
"#,
        rules = rules.display()
    );
    let t = dir.join("test.yml");
    std::fs::write(&t, test).unwrap();
    let out = Command::new("promtool")
        .arg("test")
        .arg("rules")
        .arg(&t)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The file `metrics.textfile` names holds the same metrics, is replaced atomically when
/// they change, and passes promtool too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_textfile_follows_the_daemon_and_passes_promtool() {
    let sb = sandbox().await;
    let dir = temp_dir("textfile");
    let prom = dir.join("imlinkd.prom");
    let mut o = Opts::user("kiosk-t");
    o.dir = Some(dir.clone());
    // `[metrics]` must come after the top-level keys: the last section of the file.
    o.api_extra = format!("\n[metrics]\ntextfile = \"{}\"", prom.display());
    let d = Daemon::start(&sb, o).await;
    d.wait_phase("online").await;
    // A file another process writes: polled, with a deadline.
    let read_until = |want: &'static str| {
        let prom = prom.clone();
        async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                if let Ok(t) = std::fs::read_to_string(&prom)
                    && t.contains(want)
                {
                    return t;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} never said {want:?}",
                    prom.display()
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    let text = read_until("imlinkd_phase{phase=\"online\"} 1").await;
    let (ok, said) = promtool(&text).await;
    assert!(ok && said.trim().is_empty(), "promtool: {said}\n{text}");
    assert!(text.ends_with("# EOF\n"));
    sb.kick("kiosk-t");
    read_until("imlinkd_phase{phase=\"kicked\"} 1").await;
    // Only ever whole files: no temporary file left behind.
    let stray: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    d.finish().await;
}
