//! Every input in the committed fuzz corpora of imlink-auth's targets (`fuzz/corpus/auth_*`)
//! and every crash ever found (`fuzz/regressions/auth_*`), through the same function the fuzz
//! target runs, on stable, in CI.

use std::path::Path;

#[test]
fn every_corpus_entry_and_every_past_crash_replays_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut total = 0;
    for (name, run) in imlink_auth::fuzzing::TARGETS {
        let mut n = 0;
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for e in entries.flatten() {
                let data = std::fs::read(e.path()).unwrap();
                let r = std::panic::catch_unwind(|| run(&data));
                assert!(r.is_ok(), "{name}: {} fails", e.path().display());
                n += 1;
            }
        }
        assert!(n > 0, "no corpus for the fuzz target {name}");
        total += n;
    }
    eprintln!("replayed {total} fuzz inputs");
}
