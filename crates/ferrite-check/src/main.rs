//! `ferrite-check [--json] HISTORY.jsonl`: checks a workload history and prints the
//! report. Exit status 0 when valid, 1 when an anomaly that fails a run was found, 2
//! when the history cannot be read.

use std::io::{BufReader, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut json = false;
    let mut path = None;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--json" => json = true,
            "-h" | "--help" => {
                println!("usage: ferrite-check [--json] HISTORY.jsonl (docs/history-format.md); '-' reads stdin");
                return ExitCode::SUCCESS;
            }
            _ if path.is_none() => path = Some(arg),
            _ => {
                eprintln!("ferrite-check: unexpected argument {arg:?}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(path) = path else {
        eprintln!("usage: ferrite-check [--json] HISTORY.jsonl");
        return ExitCode::from(2);
    };
    let result = if path == "-" {
        ferrite_check::check_history(std::io::stdin().lock())
    } else {
        match std::fs::File::open(&path) {
            Ok(f) => ferrite_check::check_history(BufReader::new(f)),
            Err(e) => {
                eprintln!("ferrite-check: {path}: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferrite-check: {path}: {e}");
            return ExitCode::from(2);
        }
    };
    let out = if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => s + "\n",
            Err(e) => {
                eprintln!("ferrite-check: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        report.to_text()
    };
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    if report.is_valid() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
