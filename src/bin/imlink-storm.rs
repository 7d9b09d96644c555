//! `imlink-storm` — a fleet reconnect storm, simulated with the real session engine
//! (`session::sim::storm`): 10,000 devices (by default) lose their broker for `--outage`
//! seconds (30 by default); then it accepts `--capacity` CONNECTs per second. imlinkd's policy
//! next to its plain doubling before the outage window, a naive immediate reconnect and a fixed
//! 1 s retry. Writes `storm-sim.csv` (per second and strategy) to `--out DIR` and prints a
//! Markdown table.
//!
//!   cargo run --release --features sim --bin imlink-storm -- [--devices N] [--capacity C] \
//!       [--outage SECONDS] [--seed S] [--out DIR]

use std::io::Write;

use imlinkd::session::sim::storm::{self, StormConfig, Strategy};

fn main() {
    let mut cfg = StormConfig::default();
    let mut out = std::path::PathBuf::from("target");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--devices" => cfg.devices = v.parse().unwrap_or(cfg.devices),
            "--capacity" => cfg.capacity = v.parse().unwrap_or(cfg.capacity),
            "--outage" => cfg.outage = v.parse::<u64>().map_or(cfg.outage, |s| s * 1000),
            "--seed" => cfg.seed = v.parse().unwrap_or(cfg.seed),
            "--out" => out = v.into(),
            other => {
                eprintln!("imlink-storm: unknown argument {other}");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    // Ten minutes, and at least 400 s after the broker's return.
    cfg.horizon = cfg.horizon.max(cfg.outage + 400_000);
    let _ = std::fs::create_dir_all(&out);
    let path = out.join("storm-sim.csv");
    let mut csv = match std::fs::File::create(&path) {
        Ok(f) => std::io::BufWriter::new(f),
        Err(e) => {
            eprintln!("imlink-storm: {}: {e}", path.display());
            std::process::exit(1);
        }
    };
    let _ = writeln!(
        csv,
        "strategy,second,accepted,refused,online_fraction,capacity,outage_s,devices"
    );
    let target = 2.0 * cfg.devices as f64 / f64::from(cfg.capacity.max(1)) + 10.0;
    println!(
        "{} devices, broker gone for {} s, then {} CONNECTs/s (target: 99 % back within \
         2 × N ÷ capacity + 10 s = {target:.0} s, CONNECTs after the return ≤ {}/s)\n",
        cfg.devices,
        cfg.outage / 1000,
        cfg.capacity,
        cfg.capacity
    );
    println!(
        "| strategy | peak CONNECTs/s (after the return) | total CONNECTs | 99 % online after the return | most refusals for one device |"
    );
    println!("|---|---|---|---|---|");
    for s in [
        Strategy::Imlinkd,
        Strategy::ImlinkdDoubling,
        Strategy::Naive,
        Strategy::Fixed1s,
    ] {
        let started = std::time::Instant::now();
        let r = storm::run(&cfg, s);
        for (i, sec) in r.seconds.iter().enumerate() {
            let _ = writeln!(
                csv,
                "{},{i},{},{},{:.4},{},{},{}",
                s.name(),
                sec.accepted,
                sec.refused,
                f64::from(sec.online) / cfg.devices as f64,
                cfg.capacity,
                cfg.outage / 1000,
                cfg.devices
            );
        }
        println!(
            "| {} | {} ({}) | {} | {} | {} |",
            s.name(),
            r.peak_attempts,
            r.peak_after_return,
            r.total_attempts,
            r.to_99_percent
                .map_or("not within the window".into(), |t| format!(
                    "{:.0} s",
                    t as f64 / 1000.0
                )),
            r.max_refused_per_device
        );
        eprintln!("({} simulated in {:?})", s.name(), started.elapsed());
    }
    let _ = csv.flush();
    eprintln!("wrote {}", path.display());
}
