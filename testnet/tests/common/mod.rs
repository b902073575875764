//! Running the demo binary from the tests, and reading what it wrote.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Runs `estuary-testnet demo` with `args`, its report in `report_dir` and `RUST_LOG` set to
/// `log_filter` (for the demo and its node processes): whether it passed, `report.json`,
/// and its output.
pub fn demo(args: &[&str], report_dir: &Path, log_filter: &str) -> (bool, Value, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_estuary-testnet"))
        .arg("demo")
        .args(args)
        .arg("--report-dir")
        .arg(report_dir)
        .env("RUST_LOG", log_filter)
        .output()
        .expect("the testnet binary runs");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report = std::fs::read(report_dir.join("report.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or(Value::Null);
    (output.status.success(), report, text)
}

/// The checker's verdict in a report: every run must have converged with nothing lost,
/// invented or invalid, and identical heads and quarantine on every node checked.
pub const CLEAN: [(&str, bool); 3] = [
    ("converged", true),
    ("identical_heads", true),
    ("quarantine_identical", true),
];

/// Asserts that each of `fields` of `value` is `true` (the `CLEAN` ones) or 0 (`zero`).
pub fn assert_fields(value: &Value, flags: &[(&str, bool)], zero: &[&str], text: &str) {
    for (field, expected) in flags {
        assert_eq!(value[*field], Value::Bool(*expected), "{field}: {text}");
    }
    for field in zero {
        assert_eq!(value[*field], Value::from(0), "{field}: {text}");
    }
}
