//! The island demo end to end, at a size CI runs: the binary, its exit code and its report.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn demo(args: &[&str], report_dir: &Path) -> (bool, Value, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_estuary-testnet"))
        .arg("demo")
        .args(args)
        .arg("--report-dir")
        .arg(report_dir)
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

fn assert_clean(report: &Value, text: &str) {
    for (field, expected) in [
        ("converged", Value::Bool(true)),
        ("identical_heads", Value::Bool(true)),
        ("quarantine_identical", Value::Bool(true)),
        ("lost", Value::from(0)),
        ("phantom", Value::from(0)),
        ("invariant_violations", Value::from(0)),
    ] {
        assert_eq!(report[field], expected, "{field}: {text}");
    }
    assert!(
        report["acknowledged_writes"].as_u64().unwrap() > 0,
        "{text}"
    );
    assert!(report["convergence_ms"].is_u64(), "{text}");
    assert!(report["wire_bytes"].as_u64().unwrap() > 0, "{text}");
    assert!(report["messages"].as_u64().unwrap() > 0, "{text}");
}

#[test]
fn seven_nodes_in_process_converge_through_partitions_loss_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (passed, report, text) = demo(
        &[
            "--nodes",
            "7",
            "--files",
            "40",
            "--duration",
            "20",
            "--preset",
            "island",
            "--loss",
            "20",
            "--seed",
            "7",
        ],
        dir.path(),
    );
    assert!(passed, "the checker failed: {text}");
    assert_clean(&report, &text);
    assert_eq!(report["restarts"], 2, "{text}");
    let faults = report["faults"].as_array().unwrap();
    let partitions = faults.iter().filter(|f| f["fault"] == "partition").count();
    assert_eq!(partitions, 2, "{text}");
    assert!(
        faults
            .iter()
            .any(|f| f["fault"] == "loss" && f["percent"] == 20)
    );
    assert!(dir.path().join("agreement.svg").exists());
}

/// The `estuary` binary, built beside this package's if a workspace build has not already.
fn estuary_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_estuary-testnet")).with_file_name("estuary");
    if !path.exists() {
        let cargo = option_env!("CARGO").unwrap_or("cargo");
        let status = Command::new(cargo)
            .args(["build", "-p", "estuary-cli"])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the estuary binary failed");
    }
    path
}

#[test]
fn three_node_processes_converge_after_sigkill_and_restart() {
    let estuary = estuary_binary();
    let dir = tempfile::tempdir().unwrap();
    let (passed, report, text) = demo(
        &[
            "--nodes",
            "3",
            "--files",
            "20",
            "--duration",
            "12",
            "--preset",
            "flaky",
            "--mode",
            "procs",
            "--seed",
            "3",
            "--estuary",
            estuary.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(passed, "the checker failed: {text}");
    assert_clean(&report, &text);
    assert_eq!(report["mode"], "procs");
    assert!(report["restarts"].as_u64().unwrap() >= 1, "{text}");
}
