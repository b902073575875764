//! The island demo end to end, at a size CI runs: the binary, its exit code and its report.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn demo(args: &[&str], report_dir: &Path) -> (bool, Value, String) {
    common::demo(args, report_dir, "warn")
}

fn assert_clean(report: &Value, text: &str) {
    common::assert_fields(
        report,
        &common::CLEAN,
        &["lost", "phantom", "invariant_violations"],
        text,
    );
    assert!(
        report["acknowledged_writes"].as_u64().unwrap() > 0,
        "{text}"
    );
    assert!(report["convergence_ms"].is_u64(), "{text}");
    assert!(report["urgent_convergence_ms"].is_u64(), "{text}");
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
    // A joining member's records, a quarter of the files, loaded in bulk and converged.
    assert_eq!(report["loaded"], 10, "{text}");
    // Residents registered twice, the duplicates linked: every node reads each as one record.
    let links = &report["links"];
    assert!(links["linked"].as_u64().unwrap() > 0, "{text}");
    assert_eq!(links["as_one"], links["reads"], "{text}");
    let faults = report["faults"].as_array().unwrap();
    let partitions = faults.iter().filter(|f| f["fault"] == "partition").count();
    assert_eq!(partitions, 2, "{text}");
    assert!(
        faults
            .iter()
            .any(|f| f["fault"] == "loss" && f["percent"] == 20)
    );
    // The schedule ran on the plan's clock: every window in force near its planned start,
    // lifted near its planned end (or when the faults stop), whatever the writes did.
    assert_eq!(report["faults_applied"], true, "{text}");
    for fault in faults {
        let ms = |field: &str| {
            fault[field]
                .as_u64()
                .unwrap_or_else(|| panic!("{field}: {text}"))
        };
        assert!(
            ms("applied_ms") >= ms("start_ms") && ms("applied_ms") < ms("start_ms") + 3_000,
            "{fault}: {text}"
        );
        assert!(ms("lifted_ms") >= ms("end_ms"), "{fault}: {text}");
    }
    let writes = &report["writes"];
    assert!(writes["planned"].as_u64().unwrap() > 0, "{text}");
    assert_eq!(writes["issued"], writes["planned"], "{text}");
    // Clinical reads were made on the nodes during the run and their slowest is named.
    assert!(report["reads"]["reads"].as_u64().unwrap() > 0, "{text}");
    assert!(report["reads"]["max_ms"].as_f64().is_some(), "{text}");
    assert!(text.contains("slowest part"), "{text}");
    assert!(text.contains("writes on the clock"), "{text}");
    assert!(dir.path().join("agreement.svg").exists());
    assert_dashboard_copy(&report, dir.path());
}

/// The report links a static copy of the core hospital's dashboard with its figures in it.
fn assert_dashboard_copy(report: &Value, dir: &Path) {
    assert_eq!(report["dashboard"], "dashboard.html");
    let page = std::fs::read_to_string(dir.join("dashboard.html")).unwrap();
    assert!(
        page.contains(r#""institution":"xinhua""#),
        "the copy carries no figures"
    );
    assert!(page.contains(r#""state":"this_node""#));
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

/// Real processes get real faults: five `estuary node run` processes dial each other through
/// the fault proxy, which partitions them (twice), loses 20% (late writes, cut connections),
/// while two are killed with SIGKILL and restarted; the checker passes.
#[test]
fn five_node_processes_converge_through_proxy_partitions_loss_and_sigkill() {
    let estuary = estuary_binary();
    let dir = tempfile::tempdir().unwrap();
    let (passed, report, text) = demo(
        &[
            "--nodes",
            "5",
            "--files",
            "30",
            "--duration",
            "20",
            "--preset",
            "island",
            "--loss",
            "20",
            "--mode",
            "procs",
            "--seed",
            "5",
            "--estuary",
            estuary.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(passed, "the checker failed: {text}");
    assert_clean(&report, &text);
    assert_eq!(report["mode"], "procs");
    assert_eq!(report["loaded"], 7, "{text}");
    let links = &report["links"];
    assert!(links["linked"].as_u64().unwrap() > 0, "{text}");
    assert_eq!(links["as_one"], links["reads"], "{text}");
    assert_eq!(report["faults_applied"], true, "{text}");
    let faults = report["faults"].as_array().unwrap();
    assert_eq!(
        faults.iter().filter(|f| f["fault"] == "partition").count(),
        2,
        "{text}"
    );
    assert!(faults.iter().any(|f| f["fault"] == "loss"), "{text}");
    assert_eq!(report["restarts"], 2, "{text}");
    assert_dashboard_copy(&report, dir.path());
    // The proxy did cut connections and hold writes back.
    assert!(report["connections_cut"].as_u64().unwrap() > 0, "{text}");
    assert!(report["writes_delayed"].as_u64().unwrap() > 0, "{text}");
}

/// Every way a canary could be written down: as text (any case), as hex, as a list of byte
/// values (a `Debug` of bytes).
fn canary_forms() -> Vec<(String, String)> {
    const CANARIES: [&str; 5] = [
        "QXNAMECANARY",
        "QXPHONECANARY",
        "QXNATIDCANARY",
        "QXNOTECANARY",
        "QXREASONCANARY",
    ];
    let mut forms = Vec::new();
    for canary in CANARIES {
        forms.push((canary.to_owned(), canary.to_lowercase()));
        let hex: String = canary.bytes().map(|b| format!("{b:02x}")).collect();
        forms.push((canary.to_owned(), hex));
        let listed: Vec<String> = canary.bytes().map(|b| b.to_string()).collect();
        forms.push((canary.to_owned(), listed.join(", ")));
    }
    forms
}

/// Fails if any canary, in any form, is in `text` (`what` names where it was found).
fn assert_no_canary(what: &str, text: &str) {
    let text = text.to_lowercase();
    for (canary, form) in canary_forms() {
        if let Some(at) = text.find(&form) {
            let from = text[..at]
                .char_indices()
                .rev()
                .nth(200)
                .map_or(0, |(i, _)| i);
            panic!(
                "canary {canary} found in {what}: …{}…",
                &text[from..(at + form.len()).min(text.len())]
            );
        }
    }
}

/// Every file under `dir`, read as text.
fn files_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
            found.push((path, text));
        }
    }
    found
}

/// The demo with canary values in names, phone numbers, national ids, notes and referral
/// reasons, logging everything: no canary in the output, the logs, the metrics or the report.
fn assert_canaries_stay_in(args: &[&str]) -> (Value, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = args.to_vec();
    args.push("--canary");
    let (passed, report, text) = common::demo(&args, dir.path(), "trace");
    assert!(
        passed,
        "the checker failed: {}",
        &text[text.len().saturating_sub(4_000)..]
    );
    assert_clean(&report, &text);
    // The probes wrote canaries past their limits; each was refused with an error.
    let probes = text.matches("canary probe (").count();
    assert_eq!(probes, 3, "the canary probes did not run");
    assert_no_canary("the demo's output and logs", &text);
    let files = files_under(dir.path());
    assert!(files.iter().any(|(p, _)| p.ends_with("report.json")));
    for (path, contents) in &files {
        assert_no_canary(&path.display().to_string(), contents);
    }
    eprintln!(
        "searched {} bytes of output and {} files ({} bytes)",
        text.len(),
        files.len(),
        files.iter().map(|(_, t)| t.len()).sum::<usize>()
    );
    (report, files.into_iter().map(|(path, _)| path).collect())
}

#[test]
fn canaries_written_through_the_api_appear_in_no_log_error_metric_or_report() {
    let estuary = estuary_binary();
    let args = [
        "--nodes",
        "3",
        "--files",
        "20",
        "--duration",
        "10",
        "--preset",
        "calm",
        "--mode",
        "procs",
        "--seed",
        "21",
        "--estuary",
        estuary.to_str().unwrap(),
    ];
    let (_, files) = assert_canaries_stay_in(&args);
    // The nodes' own logs (at trace) and metrics were searched too.
    for (folder, extension) in [("logs", "log"), ("metrics", "prom")] {
        let kept = files
            .iter()
            .filter(|p| {
                p.extension().is_some_and(|e| e == extension)
                    && p.parent().is_some_and(|d| d.ends_with(folder))
            })
            .count();
        assert_eq!(kept, 3, "{folder}: {files:?}");
    }
}

#[test]
fn canaries_through_a_rogues_garbage_and_rejections_appear_in_no_log_or_report() {
    let (report, _) = assert_canaries_stay_in(&[
        "--nodes",
        "5",
        "--files",
        "20",
        "--duration",
        "12",
        "--preset",
        "garbage",
        "--seed",
        "22",
    ]);
    assert!(
        report["byzantine"]["bad_changes_quarantined"]
            .as_u64()
            .unwrap()
            > 0,
        "nothing was rejected"
    );
}
