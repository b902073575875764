//! The data-model demo: Jianshe community health centre and Xinhua hospital hold replicas of
//! one resident's health file and of a priority referral. The ferry-side link is down; both
//! edit; the link comes back; the replicas merge. Prints what every replica now shows,
//! including the conflicts a clinician must review.

use std::path::Path;

use anyhow::{Context, ensure};
use estuary_node::model::*;

use crate::sample::*;

pub fn run(json: bool, save_dir: Option<&Path>) -> anyhow::Result<()> {
    println!(
        "Estuary data-model demo (two replicas, no network: the island demo comes with the node)\n"
    );
    let centre_actor = Actor::from_bytes(vec![0xc1; 32]);
    let hospital_actor = Actor::from_bytes(vec![0x4b; 32]);
    let centre = |minute: i64| editor(CENTRE, MORNING_MS + minute * 60_000);
    let hospital = |minute: i64| editor(HOSPITAL, MORNING_MS + minute * 60_000);

    // Before the link drops: the centre registers the resident and refers them up.
    let mut file_c = HealthFile::create(&centre_actor, &centre(0), &demographics())?;
    for (by, op) in typical_file_ops().into_iter().take(4) {
        file_c.apply(&by, &op)?;
    }
    let mut referral_c =
        Referral::create(&centre_actor, &centre(5), &referral_request(file_c.id()))?;
    let mut file_h = HealthFile::load(&file_c.save(), &hospital_actor)?;
    let mut referral_h = Referral::load(&referral_c.save(), &hospital_actor)?;
    println!("08:05  both replicas hold the file and a priority referral (status: requested)");
    println!("08:10  the link between the centre and the hospital drops\n");

    // While cut off, each side edits.
    let iodine = NewAllergy {
        substance: "iodine contrast".into(),
        reaction: "angioedema".into(),
        severity: Severity::Severe,
    };
    file_c.apply(
        &centre(10),
        &HealthFileOp::SetDemographic(DemographicField::Phone("+86 13900001111".into())),
    )?;
    file_c.apply(
        &centre(12),
        &HealthFileOp::RemoveAllergy {
            substance: "iodine contrast".into(),
        },
    )?;
    file_c.apply(
        &centre(14),
        &HealthFileOp::AddFollowUp(NewFollowUp {
            time: Timestamp(MORNING_MS + 14 * 60_000),
            systolic_mmhg: Some(128),
            diastolic_mmhg: Some(80),
            glucose_mmol_per_l: Some(6.4),
        }),
    )?;
    referral_c.apply(&centre(20), &ReferralOp::Cancel)?;
    println!(
        "centre    sets a new phone number, removes the iodine-contrast allergy (thought to be an"
    );
    println!(
        "          error), records a follow-up, and cancels the referral: the pain has settled"
    );

    file_h.apply(
        &hospital(11),
        &HealthFileOp::SetDemographic(DemographicField::Phone("+86 13811112222".into())),
    )?;
    file_h.apply(&hospital(13), &HealthFileOp::AddAllergy(iodine))?;
    file_h.apply(
        &hospital(15),
        &HealthFileOp::AddExamResult(NewExamResult {
            kind: ExamKind::Lab,
            time: Timestamp(MORNING_MS + 15 * 60_000),
            name: "high-sensitivity troponin T".into(),
            measurements: vec![Measurement {
                name: "hs-TnT".into(),
                value: 9.0,
                unit: Some("ng/L".into()),
            }],
            report: None,
        }),
    )?;
    referral_h.apply(&hospital(16), &ReferralOp::Accept)?;
    referral_h.apply(
        &hospital(18),
        &ReferralOp::Schedule {
            appointment: Timestamp(MORNING_MS + 6 * 3_600_000),
            minutes: Some(40),
        },
    )?;
    println!("hospital  sets another phone number, records a severe iodine-contrast reaction,");
    println!("          adds a troponin result, accepts the referral and books 14:00\n");

    // The link comes back: merge both ways.
    file_c.merge(&mut file_h)?;
    file_h.merge(&mut file_c)?;
    referral_c.merge(&mut referral_h)?;
    referral_h.merge(&mut referral_c)?;
    println!("08:30  the link is back; the replicas exchange changes\n");

    ensure!(
        file_c.heads() == file_h.heads(),
        "health file replicas did not converge"
    );
    ensure!(
        referral_c.heads() == referral_h.heads(),
        "referral replicas did not converge"
    );
    let file = file_c.view();
    let referral = referral_c.view();
    ensure!(
        file == file_h.view() && referral == referral_h.view(),
        "replicas show different views"
    );
    validate(file_c.automerge()).context("merged health file")?;
    validate(referral_c.automerge()).context("merged referral")?;

    println!(
        "Merged health file (identical on both replicas, {} heads):",
        file_c.heads().len()
    );
    let phone = file.demographics.phone.as_ref().context("phone is set")?;
    println!(
        "  phone        {}   (conflict with {:?}: to review)",
        phone.value, phone.conflicts
    );
    println!(
        "  allergies    {}",
        file.allergies
            .iter()
            .map(|a| format!("{} ({}, {})", a.substance, a.reaction, a.severity))
            .collect::<Vec<_>>()
            .join("; ")
    );
    println!(
        "               the hospital's new iodine record survives the centre's concurrent removal (add-wins)"
    );
    println!(
        "  follow-ups   {}   exams {}   encounters {}",
        file.follow_ups.len(),
        file.exams.len(),
        file.encounters.len()
    );
    println!("  conflicts    {:?}\n", file.conflicts());

    println!("Merged referral:");
    println!(
        "  status       {}   (a cancel beats a concurrent accept/schedule; only arrival beats a cancel)",
        referral.status
    );
    for event in &referral.history {
        let mark = if referral.effective.contains(&event.entry) {
            "effective "
        } else {
            "superseded"
        };
        println!(
            "  {mark}   {} -> {} by {}",
            event.from, event.to, event.institution
        );
    }
    match referral.appointment {
        Some(at) => println!("  appointment  {} ms since the epoch", at.0),
        None => println!("  appointment  none: the booking lost to the cancel, the slot is free"),
    }

    if json {
        println!(
            "\n{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "health_file": file, "referral": referral })
            )?
        );
    }
    if let Some(dir) = save_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (name, bytes) in [
            ("health-file.automerge", file_c.save()),
            ("referral.automerge", referral_c.save()),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, bytes)
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    println!("\nconverged: yes; both documents validate on both replicas");
    Ok(())
}
