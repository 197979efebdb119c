//! `ferrite-sim`: run simulated seeds.
//!
//! ```text
//! cargo run -p ferrite-sim -- --seed N [--history FILE]   replay one seed
//! cargo run -p ferrite-sim -- --seeds COUNT [--start S]   sweep seeds S..S+COUNT
//! ```
//! Exit status 1 when any seed fails (each failure prints its seed and replay command).

use std::process::ExitCode;
use std::time::Instant;

use ferrite_sim::{failure_text, run, SimConfig};

fn usage() -> ExitCode {
    eprintln!("usage: ferrite-sim (--seed N [--history FILE] | --seeds COUNT [--start S]) [--faults-ms MS]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seed = None;
    let mut seeds = None;
    let mut start = 0u64;
    let mut history = None;
    let mut faults_ms = None;
    let mut plant = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = || it.next().and_then(|v| v.parse::<u64>().ok());
        match a.as_str() {
            "--seed" => seed = num(),
            "--seeds" => seeds = num(),
            "--start" => start = num().unwrap_or(0),
            "--faults-ms" => faults_ms = num(),
            "--history" => history = it.next().cloned(),
            "--plant-clear-in-flight" => plant = true,
            _ => return usage(),
        }
    }
    let config = |s: u64| {
        let mut c = SimConfig::new(s);
        if let Some(f) = faults_ms {
            c.faults_ms = f;
        }
        if plant {
            c.planted_bug = Some(ferrite_sim::PlantedBug::ClearInFlightOnAnyError);
        }
        c
    };
    if let Some(s) = seed {
        let mut c = config(s);
        c.keep_history = history.is_some();
        let t = Instant::now();
        let r = run(c);
        if let (Some(path), Some(h)) = (&history, &r.history) {
            if let Err(e) = std::fs::write(path, h) {
                eprintln!("cannot write {path}: {e}");
            }
        }
        println!(
            "seed {s}: trace {:016x}, {} events, {} ms simulated in {:.2?}; faults {:?}; \
             sends ok {} of {}; truncations {} (diverging epochs {}); crash-dropped records {}; \
             leader changes {}; controller elections {}; refused follower fetches {}",
            r.trace_hash,
            r.stats.events,
            r.stats.end_ms,
            t.elapsed(),
            r.stats.faults,
            r.report.sends.ok,
            r.report.sends.invoked,
            r.stats.truncations,
            r.stats.diverging_epochs,
            r.stats.crash_truncated_records,
            r.stats.leader_elections_seen,
            r.stats.controller_failovers,
            r.stats.follower_fetch_errors,
        );
        print!("{}", r.report.to_text());
        if r.passed() {
            return ExitCode::SUCCESS;
        }
        eprint!("{}", failure_text(&r));
        return ExitCode::from(1);
    }
    let Some(count) = seeds else { return usage() };
    let t = Instant::now();
    let mut failed = Vec::new();
    let mut by_kind = std::collections::BTreeMap::<String, u64>::new();
    let (mut faults, mut sends_ok, mut sends, mut events, mut dropped) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for s in start..start + count {
        let r = run(config(s));
        faults += r.stats.faults.values().sum::<u64>();
        for (k, n) in &r.stats.faults {
            *by_kind.entry(k.clone()).or_insert(0) += n;
        }
        sends_ok += r.report.sends.ok;
        sends += r.report.sends.invoked;
        events += r.stats.events;
        dropped += r.stats.crash_truncated_records;
        if !r.passed() {
            eprint!("{}", failure_text(&r));
            failed.push(s);
        }
        if (s - start + 1).is_multiple_of(100) {
            eprintln!(
                "{} seeds, {} failed, {:.0?}",
                s - start + 1,
                failed.len(),
                t.elapsed()
            );
        }
    }
    println!(
        "{count} seeds from {start}: {} failed {:?}; {faults} faults, {sends_ok} of {sends} sends \
         acknowledged, {dropped} unflushed records dropped by crashes, {events} events, in {:.1?}",
        failed.len(),
        failed,
        t.elapsed()
    );
    println!("faults by kind: {by_kind:?}");
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
