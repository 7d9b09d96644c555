//! The client libraries and the kiosk board, in the suite: each runs its own test runner
//! (Python's unittest, Node's `node --test`) against real `imlinkd` daemons and the real
//! `imlink-sandbox`, all started by those tests from this build's binaries (their harnesses:
//! `clients/python/tests/harness.py`, `clients/node/test/harness.mjs`). One test per
//! language, each sharing its daemons between its cases, so the suite pays for one sandbox
//! per language.
//!
//! What they need beyond the Rust build, installed by `scripts/setup`: the Python tools
//! (mypy and setuptools, hash-pinned, in `/opt/imlinkd-test/python-tools`), the Node
//! packages (`npm ci` in `clients/node` and `examples/kiosk-board`, from their lockfiles) and
//! Debian's `chromium`. The role tests switch uids: run as root (CI does).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PY_TOOLS: &str = "/opt/imlinkd-test/python-tools";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The directory of this build's binaries, with the sandbox's (the workspace build makes it;
/// `cargo build --workspace --bins` when running this test alone).
fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_imlinkd"))
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(
        dir.join("imlink-sandbox").exists(),
        "{} has no imlink-sandbox: build the workspace's binaries first (cargo build --workspace --bins)",
        dir.display()
    );
    dir
}

fn need(path: &Path, fix: &str) {
    assert!(
        path.exists(),
        "{} is missing: {fix} (scripts/setup does)",
        path.display()
    );
}

/// Run `cmd`; on failure, panic with everything it printed. Returns stdout + stderr and
/// prints how long it took (for the suite's timing).
fn run(what: &str, cmd: &mut Command) -> String {
    let started = Instant::now();
    cmd.env("IMLINKD_BIN_DIR", bin_dir())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("IMLINKD_SOCKET");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    eprintln!("{what}: {:.1} s", started.elapsed().as_secs_f64());
    text
}

fn assert_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the clients' role tests run a client as another uid: run the suite as root (CI does)"
    );
}

#[test]
fn python_client_type_checks_and_passes_its_tests_against_real_daemons() {
    assert_root();
    let py = repo().join("clients/python");
    need(
        &Path::new(PY_TOOLS).join("mypy"),
        "the hash-pinned Python tools (scripts/python-tools-requirements.txt)",
    );
    // mypy --strict on the package, its tests and the example app (pyproject.toml: strict,
    // checked for Python 3.9).
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mypy-cache");
    run(
        "mypy --strict",
        Command::new("python3")
            .args(["-m", "mypy", "--strict", "--cache-dir"])
            .arg(&cache)
            .args(["imlinkd_client", "tests"])
            .current_dir(&py)
            .env("PYTHONPATH", PY_TOOLS),
    );
    let out = run(
        "python3 -m unittest",
        Command::new("python3")
            .args(["-m", "unittest", "discover", "-v", "-s"])
            .arg(py.join("tests"))
            .current_dir(&py)
            .env("IMLINKD_PY_TOOLS", PY_TOOLS),
    );
    assert!(out.contains("\nOK"), "unittest did not end with OK:\n{out}");
    assert!(
        !out.contains("Ran 0 tests"),
        "unittest found no tests:\n{out}"
    );
}

#[test]
fn node_client_is_built_from_its_source_and_passes_its_tests_against_real_daemons() {
    assert_root();
    let node = repo().join("clients/node");
    let tsc = node.join("node_modules/typescript/bin/tsc");
    need(&tsc, "clients/node's dev packages (npm ci in clients/node)");
    // The committed dist/ (what `npm install ./clients/node` uses, with no build step) is
    // what tsc makes of src/ now.
    let built =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("node-dist-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&built);
    run(
        "tsc",
        Command::new("node")
            .arg(&tsc)
            .args(["-p", ".", "--outDir"])
            .arg(&built)
            .current_dir(&node),
    );
    for f in ["index.js", "index.d.ts"] {
        let fresh = std::fs::read(built.join(f)).unwrap();
        let committed = std::fs::read(node.join("dist").join(f)).unwrap();
        assert!(
            fresh == committed,
            "clients/node/dist/{f} is not what src/ builds to: run `npm run build` in clients/node and commit dist/"
        );
    }
    let _ = std::fs::remove_dir_all(&built);
    let out = run(
        "node --test (clients/node)",
        Command::new("node")
            .args(["--test", "test/client.test.mjs"])
            .current_dir(&node),
    );
    node_tests_passed(&out, 12);
}

/// `node --test`'s summary: at least `min` tests passed, none failed.
fn node_tests_passed(out: &str, min: usize) {
    let count = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|n| n.trim().parse::<usize>().ok())
            .unwrap_or_else(|| panic!("no {key:?} line in node's output:\n{out}"))
    };
    assert_eq!(count("# fail "), 0, "{out}");
    assert!(
        count("# pass ") >= min,
        "fewer tests ran than written:\n{out}"
    );
}

#[test]
fn kiosk_board_works_in_headless_chromium() {
    assert_root();
    let board = repo().join("examples/kiosk-board");
    need(
        &board.join("node_modules/playwright-core"),
        "the kiosk board's dev packages (npm ci in examples/kiosk-board)",
    );
    need(Path::new("/usr/bin/chromium"), "Debian's chromium");
    let out = run(
        "node --test (kiosk board, headless Chromium)",
        Command::new("node")
            .args(["--test", "test/kiosk.test.mjs"])
            .current_dir(&board),
    );
    node_tests_passed(&out, 2);
}
