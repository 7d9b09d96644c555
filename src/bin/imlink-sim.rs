//! `imlink-sim`: the deterministic simulator of the engine (login and messaging together:
//! `imlinkd::session::sim` driving `imlinkd::engine::Engine`), for long runs and replays.
//!
//!   cargo run --release --features sim --bin imlink-sim -- --hours 4          # random seeds, all cores
//!   cargo run --release --features sim --bin imlink-sim -- --seeds 100000     # seeds 0..100000
//!   cargo run --release --features sim --bin imlink-sim -- --seed 60 --trace  # replay one seed
//!
//! A failing seed is shrunk and printed with its trace; the exit status is 1.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imlinkd::session::sim::{self, SimConfig};

const USAGE: &str = "\
imlink-sim — the deterministic simulator of imlinkd's engine (login and messaging)

USAGE:
  imlink-sim --hours H [--threads N]      random seeds until H hours have passed
  imlink-sim --seeds N [--from S]          seeds S..S+N (default S = 0)
  imlink-sim --seed S [--trace]            one seed; --trace prints every step
Options:
  --chaos-hours H     virtual hours of faults per seed (default 6)
  --fixed-policy      the default policy for every seed (no per-seed variation)
";

struct Args {
    hours: Option<f64>,
    seeds: Option<u64>,
    from: u64,
    seed: Option<u64>,
    trace: bool,
    threads: usize,
    cfg: SimConfig,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        hours: None,
        seeds: None,
        from: 0,
        seed: None,
        trace: false,
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        cfg: SimConfig::default(),
    };
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, what: &str| -> Result<f64, String> {
        v.as_deref()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|x| *x >= 0.0)
            .ok_or_else(|| format!("{what} needs a number"))
    };
    // Seeds are exact 64-bit integers (an f64 would round those beyond 2^53: a failing
    // seed printed by a long run would replay as another one).
    let int = |v: Option<String>, what: &str| -> Result<u64, String> {
        v.as_deref()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| format!("{what} needs a whole number (0 to 2^64-1)"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--hours" => a.hours = Some(num(it.next(), "--hours")?),
            "--seeds" => a.seeds = Some(int(it.next(), "--seeds")?),
            "--from" => a.from = int(it.next(), "--from")?,
            "--seed" => a.seed = Some(int(it.next(), "--seed")?),
            "--threads" => a.threads = (num(it.next(), "--threads")? as usize).max(1),
            "--chaos-hours" => {
                a.cfg.chaos = (num(it.next(), "--chaos-hours")? * 3_600_000.0) as u64
            }
            "--fixed-policy" => a.cfg.vary_policy = false,
            "--trace" => a.trace = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.hours.is_none() && a.seeds.is_none() && a.seed.is_none() {
        return Err("say --hours, --seeds or --seed".into());
    }
    Ok(a)
}

/// The messaging figures of a report, in one line.
fn messaging(r: &sim::Report) -> String {
    let m = &r.messages;
    format!(
        "messages: {} published by peers, {} committed, {} acknowledged, {} sends, {} accepted \
         by the broker, {} store failures, {} SUBSCRIBE faults; delivery judged at {} ends \
         ({} not online long enough to judge)",
        m.peer_messages,
        m.committed,
        m.acked,
        m.device_sends,
        m.accepted,
        m.store_failures,
        r.subscribe_faults,
        r.delivery_checked,
        r.delivery_unchecked
    )
}

fn seed_from_os() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    u64::from_le_bytes(b)
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("imlink-sim: {e}\n");
            }
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Some(seed) = a.seed {
        let mut cfg = a.cfg.clone();
        cfg.full_trace = true;
        let (s, _) = sim::Sim::new(seed, cfg.clone(), None);
        return match s.run_traced(a.trace) {
            Ok(r) => {
                println!(
                    "seed {seed}: all invariants held ({} steps, {} CONNECTs, {} fetches; {})",
                    r.steps,
                    r.connects,
                    r.fetches,
                    messaging(&r)
                );
                ExitCode::SUCCESS
            }
            Err(_) => {
                println!("{}", sim::shrink(seed, &cfg, 1_000));
                ExitCode::from(1)
            }
        };
    }
    let start = Instant::now();
    let deadline = a.hours.map(|h| start + Duration::from_secs_f64(h * 3600.0));
    let next = Arc::new(AtomicU64::new(a.from));
    let base = if a.hours.is_some() && a.seeds.is_none() {
        seed_from_os()
    } else {
        0
    };
    let limit = a.seeds.map(|n| a.from.saturating_add(n));
    let stop = Arc::new(AtomicBool::new(false));
    let failure = Arc::new(Mutex::new(None));
    let totals = Arc::new(Mutex::new((0u64, sim::Report::default())));
    let threads: Vec<_> = (0..a.threads)
        .map(|_| {
            let (next, stop, failure, totals, cfg) = (
                next.clone(),
                stop.clone(),
                failure.clone(),
                totals.clone(),
                a.cfg.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if limit.is_some_and(|l| i >= l) {
                        break;
                    }
                    let seed = base.wrapping_add(i);
                    match sim::run_seed(seed, &cfg) {
                        Ok(r) => {
                            let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
                            t.0 += 1;
                            t.1.add(&r);
                        }
                        Err(_) => {
                            stop.store(true, Ordering::Relaxed);
                            let f = sim::shrink(seed, &cfg, 1_000);
                            *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let (seeds, r) = totals.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let last = next.load(Ordering::Relaxed).min(limit.unwrap_or(u64::MAX));
    println!(
        "imlink-sim: {seeds} seeds ({}..{}), {} steps, {:.0} virtual hours, {:.0} s wall \
         clock; {} CONNECTs, {} fetches, {} restarts; {}",
        base.wrapping_add(a.from),
        base.wrapping_add(last),
        r.steps,
        r.virtual_ms as f64 / 3_600_000.0,
        start.elapsed().as_secs_f64(),
        r.connects,
        r.fetches,
        r.restarts,
        messaging(&r)
    );
    match failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
        Some(f) => {
            println!("{f}");
            ExitCode::from(1)
        }
        None => ExitCode::SUCCESS,
    }
}
