//! The simulation in the test command: determinism (one seed twice, same trace) and a
//! sweep of seeds, each checked by ferrite-check. A failure prints its seed and the
//! command that replays it.
//!
//! `FERRITE_SIM_SEEDS=N` changes the sweep's size (default 200), `FERRITE_SIM_START=S`
//! its first seed; `cargo run -p ferrite-sim -- --seed N` replays one seed.

use ferrite_check::AnomalyKind;
use ferrite_sim::{failure_text, run, PlantedBug, SimConfig};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn one_seed_twice_gives_the_same_trace() {
    for seed in [3, 1_000_003] {
        let mut c = SimConfig::new(seed);
        c.keep_history = true;
        let a = run(c.clone());
        let b = run(c);
        assert_eq!(a.trace_hash, b.trace_hash, "seed {seed}: traces differ");
        assert_eq!(a.history, b.history, "seed {seed}: histories differ");
        assert_eq!(a.stats, b.stats, "seed {seed}: stats differ");
        assert!(a.passed(), "{}", failure_text(&a));
        // The run did something: faults, acknowledged writes, reads of them.
        assert!(a.stats.faults.values().sum::<u64>() > 0);
        assert!(a.report.sends.ok > 0, "seed {seed}: no send acknowledged");
        assert!(a.report.values_read >= a.report.sends.ok);
    }
    // Another seed is another run.
    let x = run(SimConfig::new(4));
    let y = run(SimConfig::new(5));
    assert_ne!(x.trace_hash, y.trace_hash);
}

#[test]
fn sweep_of_seeds_finds_no_anomaly() {
    let count = env_u64("FERRITE_SIM_SEEDS").unwrap_or(200);
    let start = env_u64("FERRITE_SIM_START").unwrap_or(0);
    let mut failures = Vec::new();
    let mut acknowledged = 0;
    for seed in start..start + count {
        let r = run(SimConfig::new(seed));
        acknowledged += r.report.sends.ok;
        if !r.passed() {
            failures.push(failure_text(&r));
        }
    }
    assert!(acknowledged > 0);
    assert!(
        failures.is_empty(),
        "{} of {count} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The checks have teeth: each planted bug makes some of the first seeds fail, with
/// the anomaly it should cause.
#[test]
fn planted_bugs_are_caught() {
    for (bug, seeds) in [
        (PlantedBug::ReadPastHighWatermark, 40),
        (PlantedBug::FollowerAcksUnflushed, 300),
    ] {
        let mut caught = None;
        for seed in 0..seeds {
            let mut c = SimConfig::new(seed);
            c.planted_bug = Some(bug);
            let r = run(c);
            if !r.passed() {
                caught = Some(r);
                break;
            }
        }
        let r = caught.unwrap_or_else(|| panic!("{bug:?} not caught in {seeds} seeds"));
        let anomalies = |k: AnomalyKind| r.report.count(k);
        match bug {
            PlantedBug::ReadPastHighWatermark => assert!(
                anomalies(AnomalyKind::InconsistentOffsets) + anomalies(AnomalyKind::LostWrite) > 0,
                "{}",
                failure_text(&r)
            ),
            // Tested by the seed-7405 regression below.
            PlantedBug::ClearInFlightOnAnyError => {}
            PlantedBug::FollowerAcksUnflushed => assert!(
                anomalies(AnomalyKind::LostWrite) + anomalies(AnomalyKind::Unseen) > 0,
                "{}",
                failure_text(&r)
            ),
        }
    }
}

/// Regression of the long sweep's seed 7405: an AlterPartition expansion was applied, its
/// retry refused (INVALID_UPDATE_VERSION), and the refusal cleared the in-flight proposal,
/// so the leader's high watermark stopped waiting for the member the controller had just
/// added; that member, elected later, lacked an acknowledged record (offset 30 read with
/// two values). With the old rule planted the seed replays the failure; with Kafka's rule
/// (only INELIGIBLE_REPLICA clears the proposal) it passes.
#[test]
fn seed_7405_a_refused_alter_partition_retry_keeps_the_proposal_in_flight() {
    let mut c = SimConfig::new(7405);
    c.planted_bug = Some(PlantedBug::ClearInFlightOnAnyError);
    let r = run(c);
    assert!(
        r.report.count(AnomalyKind::InconsistentOffsets) > 0,
        "the old rule no longer reproduces seed 7405:\n{}",
        r.report.to_text()
    );
    let fixed = run(SimConfig::new(7405));
    assert!(fixed.passed(), "{}", failure_text(&fixed));
}
