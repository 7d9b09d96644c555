//! The README's first command, `./scripts/demo`, really brings a session online against the
//! bundled reference IM service with no other set-up.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_demo_script_comes_online() {
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_imlinkd"))
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(
        bin_dir.join("imlink-sandbox").exists(),
        "the workspace build has the sandbox binary"
    );
    let mut child = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo"))
        .env("IMLINKD_DEMO_BIN", &bin_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(600); // includes a first build
    let mut seen = Vec::new();
    let online = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let done = line.contains("following imlinkd's events");
                seen.push(line);
                if done {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    // Stop the whole demo (sandbox and daemon) the way Ctrl-C would.
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGINT);
    let _ = child.wait();
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    assert!(online, "the demo never came online:\n{}", seen.join("\n"));
    assert!(
        seen.iter().any(|l| l.starts_with("online as kiosk-0042")),
        "{}",
        seen.join("\n")
    );
    assert!(
        seen.iter()
            .any(|l| l.contains("/expire?user_id=kiosk-0042"))
    );
    // The two kiosks chatted: both messages are in kiosk-0042's history.
    for needle in [
        "→ kiosk-0043: hello from kiosk-0042",
        "← kiosk-0043: hello back from kiosk-0043",
    ] {
        assert!(
            seen.iter().any(|l| l.contains(needle)),
            "{needle:?} not in:\n{}",
            seen.join("\n")
        );
    }
}
