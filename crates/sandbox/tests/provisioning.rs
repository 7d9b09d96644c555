//! The provisioning endpoint issues real UserSigs and fails on purpose when told to.

mod common;

use std::time::Duration;

use common::*;
use imlink_sandbox::ProvisionFault;

fn token(sb: &imlink_sandbox::Sandbox) -> String {
    sb.endpoints().device_token.clone()
}

#[tokio::test]
async fn issues_a_real_usersig_with_a_date_header() {
    let sb = sandbox().await;
    let before = imlink_sandbox::state::unix_now();
    let r = provision_get(&sb, "/v1/usersig?user_id=alice", Some(&token(&sb))).await;
    assert_eq!(r.status, 200);
    let date = r.header("date").expect("Date header");
    let date = httpdate::parse_http_date(&date).expect("an HTTP date");
    let date = date
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(date >= before && date <= before + 5);
    let v = r.json();
    assert_eq!(v["user_id"], "alice");
    assert_eq!(v["sdk_app_id"], sb.sdk_app_id());
    let sig = v["user_sig"].as_str().unwrap();
    let d = imlink_usersig::verify(sig, sb.secret_key(), sb.sdk_app_id(), "alice", before)
        .expect("a sig the sandbox broker accepts");
    assert_eq!(v["expire_at"], d.expires_at());
    assert_eq!(d.expire, 24 * 3600);
    let u = sb.user("alice");
    assert_eq!((u.provision_requests, u.sigs_issued), (1, 1));

    sb.set_sig_lifetime(Duration::from_secs(30));
    let v = provision_get(&sb, "/v1/usersig?user_id=alice", Some(&token(&sb)))
        .await
        .json();
    let d = imlink_usersig::decode(v["user_sig"].as_str().unwrap()).unwrap();
    assert_eq!(d.expire, 30);
}

#[tokio::test]
async fn auth_path_method_and_user_id_are_checked() {
    let sb = sandbox().await;
    let r = provision_get(&sb, "/v1/usersig?user_id=alice", None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
    let r = provision_get(&sb, "/v1/usersig?user_id=alice", Some("wrong")).await;
    assert_eq!(r.status, 401);
    let r = provision_get(&sb, "/v1/other?user_id=alice", Some(&token(&sb))).await;
    assert_eq!(r.status, 404);
    let r = provision_get(&sb, "/v1/usersig?user_id=not%20valid", Some(&token(&sb))).await;
    assert_eq!(r.status, 400);
    let r = provision_get(
        &sb,
        &format!("/v1/usersig?user_id={}", "a".repeat(33)),
        Some(&token(&sb)),
    )
    .await;
    assert_eq!(r.status, 400);
    // Requests naming a valid user are counted even when refused.
    assert_eq!(sb.user("alice").provision_requests, 2);
    assert_eq!(sb.user("alice").sigs_issued, 0);
}

#[tokio::test]
async fn every_provisioning_fault_mode() {
    let sb = sandbox().await;
    let t = token(&sb);
    let get = || provision_get(&sb, "/v1/usersig?user_id=alice", Some(&t));

    sb.provision_fault(
        ProvisionFault::Status {
            status: 503,
            retry_after: Some(7),
        },
        Some(1),
        None,
    );
    let r = get().await;
    assert_eq!(
        (r.status, r.header("retry-after").as_deref()),
        (503, Some("7"))
    );
    assert_eq!(get().await.status, 200, "count 1 disarms after one use");

    for status in [500, 429, 401, 403, 404] {
        sb.provision_fault(
            ProvisionFault::Status {
                status,
                retry_after: None,
            },
            Some(1),
            None,
        );
        assert_eq!(get().await.status, status);
    }

    sb.provision_fault(ProvisionFault::Delay { ms: 300 }, Some(1), None);
    let started = std::time::Instant::now();
    assert_eq!(get().await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    sb.provision_fault(ProvisionFault::Malformed, Some(1), None);
    let r = get().await;
    assert_eq!(r.status, 200);
    assert!(serde_json::from_slice::<serde_json::Value>(&r.body).is_err());

    sb.provision_fault(ProvisionFault::Truncated, Some(1), None);
    let r = get().await;
    let promised: usize = r.header("content-length").unwrap().parse().unwrap();
    assert!(r.body.len() < promised, "{} of {promised}", r.body.len());

    sb.provision_fault(ProvisionFault::Oversized, Some(1), None);
    assert!(get().await.body.len() > 2 << 20);

    sb.provision_fault(ProvisionFault::Chunked, Some(1), None);
    let r = get().await;
    assert_eq!(r.header("transfer-encoding").as_deref(), Some("chunked"));
    assert!(r.header("content-length").is_none());

    let now = imlink_sandbox::state::unix_now();
    sb.provision_fault(ProvisionFault::ExpiredSig, Some(1), None);
    let v = get().await.json();
    let d = imlink_usersig::decode(v["user_sig"].as_str().unwrap()).unwrap();
    assert!(d.is_expired_at(now));

    sb.provision_fault(ProvisionFault::WrongUser, Some(1), None);
    let v = get().await.json();
    assert_eq!(v["user_id"], "alice");
    assert_ne!(
        imlink_usersig::decode(v["user_sig"].as_str().unwrap())
            .unwrap()
            .identifier,
        "alice"
    );

    sb.provision_fault(ProvisionFault::WrongApp, Some(1), None);
    let v = get().await.json();
    assert_ne!(
        imlink_usersig::decode(v["user_sig"].as_str().unwrap())
            .unwrap()
            .sdk_app_id,
        sb.sdk_app_id()
    );

    sb.provision_fault(ProvisionFault::WrongKey, Some(1), None);
    let v = get().await.json();
    let sig = v["user_sig"].as_str().unwrap();
    assert!(imlink_usersig::decode(sig).is_ok(), "well-formed");
    assert_eq!(
        imlink_usersig::verify(sig, sb.secret_key(), sb.sdk_app_id(), "alice", now),
        Err(imlink_usersig::VerifyError::BadSignature)
    );

    sb.provision_fault(ProvisionFault::GarbageSig, None, Some("alice"));
    for _ in 0..2 {
        let v = get().await.json();
        assert!(imlink_usersig::decode(v["user_sig"].as_str().unwrap()).is_err());
    }
    // Armed for alice only; bob is served normally. Clearing disarms.
    let r = provision_get(&sb, "/v1/usersig?user_id=bob", Some(&t)).await;
    assert!(imlink_usersig::decode(r.json()["user_sig"].as_str().unwrap()).is_ok());
    sb.clear_faults();
    assert!(imlink_usersig::decode(get().await.json()["user_sig"].as_str().unwrap()).is_ok());
}

#[tokio::test]
async fn clock_offset_skews_sig_time_and_date_header() {
    let sb = sandbox().await;
    sb.set_provision_clock_offset(-7200);
    let now = imlink_sandbox::state::unix_now();
    let r = provision_get(&sb, "/v1/usersig?user_id=alice", Some(&token(&sb))).await;
    let date = httpdate::parse_http_date(&r.header("date").unwrap()).unwrap();
    let date = date
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(date + 7200 >= now && date + 7200 <= now + 5);
    let d = imlink_usersig::decode(r.json()["user_sig"].as_str().unwrap()).unwrap();
    assert!(d.time + 7200 >= now && d.time + 7200 <= now + 5);
}

#[tokio::test]
async fn an_independent_client_curl_gets_a_sig() {
    let sb = sandbox().await;
    let dir = std::env::temp_dir().join(format!("imlink-curl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &sb.endpoints().ca_pem).unwrap();
    let url = sb
        .endpoints()
        .provisioning_url_template
        .replace("{user_id}", "alice");
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(&ca)
        .args(["-H", &format!("Authorization: Bearer {}", token(&sb)), &url])
        .output()
        .await
        .expect("curl is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(imlink_usersig::decode(v["user_sig"].as_str().unwrap()).is_ok());
    let _ = std::fs::remove_dir_all(dir);
}
