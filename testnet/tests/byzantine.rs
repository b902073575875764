//! The Byzantine presets at a size CI runs: a rogue member (forged signatures, garbage, mute
//! answers), a stranger, a member revoked mid-partition, a flooding member. Each runs the
//! demo binary and reads its report: the honest nodes converge with the checker clean, no bad
//! change is accepted anywhere, and the bad peer is dealt with as the rules say.

mod common;

use serde_json::Value;

/// Runs the demo with a Byzantine preset on 7 nodes for 16 s; the report and the output.
fn byzantine(preset: &str, seed: &str) -> (bool, Value, String) {
    byzantine_for(preset, seed, "16")
}

fn byzantine_for(preset: &str, seed: &str, seconds: &str) -> (bool, Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--nodes",
        "7",
        "--files",
        "40",
        "--duration",
        seconds,
        "--preset",
        preset,
        "--seed",
        seed,
    ];
    common::demo(&args, dir.path(), "warn")
}

/// What every preset must show: the checker clean on the honest nodes, nothing bad accepted,
/// the bad node's valid changes everywhere, the rules enforced.
fn assert_honest_nodes_clean(report: &Value, text: &str) -> Value {
    common::assert_fields(
        report,
        &common::CLEAN,
        &[
            "lost",
            "phantom",
            "invariant_violations",
            "refused_but_held",
        ],
        text,
    );
    let byzantine = report["byzantine"].clone();
    common::assert_fields(
        &byzantine,
        &[("passed", true)],
        &[
            "bad_changes_accepted",
            "bad_changes_misfiled",
            "valid_changes_missing",
            "rules_unenforced",
        ],
        text,
    );
    byzantine
}

#[test]
fn forged_signatures_are_quarantined_on_every_honest_node_and_the_forger_banned() {
    let (passed, report, text) = byzantine("forged", "11");
    assert!(passed, "{text}");
    let b = assert_honest_nodes_clean(&report, &text);
    let sent = b["bad_changes_sent"].as_u64().unwrap();
    assert!(sent >= 8, "{text}");
    // The first burst went out to every honest node before any scored the forger: each
    // holds forgeries in quarantine, with the signature as the reason (a node that scored
    // the forger early ignores the rest of the burst).
    for reached in b["bad_changes_reached"].as_array().unwrap() {
        assert!(reached.as_u64().unwrap() >= 1, "{text}");
    }
    let reasons = b["quarantine_reasons"].as_object().unwrap();
    assert!(
        reasons.keys().all(|r| r.contains("signature")),
        "{reasons:?}"
    );
    assert!(b["score_min"].as_f64().unwrap() < -500.0, "{text}");
    assert!(b["disconnected_by"].as_u64().unwrap() >= 1, "{text}");
}

#[test]
fn a_stranger_is_denied_everywhere_and_none_of_its_changes_lands() {
    let (passed, report, text) = byzantine("stranger", "12");
    assert!(passed, "{text}");
    let b = assert_honest_nodes_clean(&report, &text);
    assert!(b["denied"].as_u64().unwrap() >= 6, "{text}");
    assert_eq!(b["bad_changes_quarantined"], 0, "{text}");
    assert!(b["publish_failed"].as_u64().unwrap() > 0, "{text}");
}

#[test]
fn a_member_revoked_during_a_partition_is_cut_off_at_the_same_line_everywhere() {
    let (passed, report, text) = byzantine("revoked", "13");
    assert!(passed, "{text}");
    let b = assert_honest_nodes_clean(&report, &text);
    let revocation = &b["revocation"];
    assert_eq!(revocation["same_cutoff_everywhere"], true, "{text}");
    assert!(revocation["cutoff_heads"].as_u64().unwrap() > 0, "{text}");
    // It kept writing on its side: those writes are refused everywhere, not lost.
    assert!(revocation["refused_writes"].as_u64().unwrap() > 0, "{text}");
    assert!(b["denied"].as_u64().unwrap() > 0, "{text}");
}

#[test]
fn garbage_from_a_member_is_refused_and_its_valid_changes_still_arrive() {
    let (passed, report, text) = byzantine("garbage", "14");
    assert!(passed, "{text}");
    let b = assert_honest_nodes_clean(&report, &text);
    let kinds = b["bad_changes_by_kind"].as_object().unwrap();
    for kind in ["invalid_content", "invented_dependency"] {
        assert!(kinds.contains_key(kind), "{kind}: {text}");
    }
    // The chain sent out of order (and the file carrying the invalid change) arrived whole.
    assert!(b["valid_changes_sent"].as_u64().unwrap() >= 4, "{text}");
    // An invented dependency is held, never applied or passed on.
    assert!(b["bad_changes_pending"].as_u64().unwrap() >= 1, "{text}");
    assert!(b["garbage_messages"].as_u64().unwrap() > 0, "{text}");
    assert!(b["disconnected_by"].as_u64().unwrap() >= 1, "{text}");
}

#[test]
fn a_flooding_member_costs_the_others_no_correctness() {
    let (passed, report, text) = byzantine("flood", "15");
    assert!(passed, "{text}");
    let b = assert_honest_nodes_clean(&report, &text);
    // Every flooded change is on every node (they are valid: the checker counts them as
    // acknowledged writes, none lost).
    assert!(b["flood_writes"].as_u64().unwrap() > 0, "{text}");
    assert!(report["propagation"]["p99_ms"].is_u64(), "{text}");
}

#[test]
fn a_mute_member_is_struck_off_and_the_others_converge_without_it() {
    // Honest nodes ask a random peer each second, so the mute rogue is given time to be asked
    // often enough to earn its strikes.
    let (passed, report, text) = byzantine_for("mute", "16", "24");
    assert!(passed, "{text}");
    let b = assert_honest_nodes_clean(&report, &text);
    assert!(b["answers_garbage"].as_u64().unwrap() > 0, "{text}");
    assert!(b["strikes_max"].as_u64().unwrap() >= 4, "{text}");
    assert!(b["disconnected_by"].as_u64().unwrap() >= 1, "{text}");
}
