//! The writer the crash test and the store benchmark kill: it writes signed changes as fast as
//! it can and prints `ack DOC HASH` for each only after its durable acknowledgement.

use std::io::Write;

use crate::model::{
    Date, Demographics, Editor, HealthFileOp, InstitutionId, NewFollowUp, PersonName, Sex,
    Timestamp,
};
use crate::replica::{Node, NodeConfig, NodeError};

/// Opens the node, creates a health file, then adds follow-ups to it, `writes_max` at most,
/// printing each acknowledged change to `out`.
pub fn run(
    config: &NodeConfig,
    roster: &[u8],
    institution: InstitutionId,
    writes_max: u64,
    out: &mut impl Write,
) -> Result<(), Box<dyn std::error::Error>> {
    let node = Node::open(config, Some(roster))?;
    let editor = Editor {
        institution,
        at: Timestamp(0),
    };
    let demographics = Demographics {
        name: PersonName {
            family: "Test".into(),
            given: "Crash".into(),
            text: None,
        },
        sex: Sex::Unknown,
        birth_date: Date::new("1950-01-01")?,
        // Distinct per run, so each run creates its own file.
        phone: Some(format!("{}", std::process::id())),
        address: None,
        national_id: None,
        insurance: None,
    };
    let (document, creation) = node.create_health_file(&editor, &demographics)?;
    writeln!(out, "ack {document} {creation}")?;
    out.flush()?;
    for n in 0..writes_max {
        let op = HealthFileOp::AddFollowUp(NewFollowUp {
            time: Timestamp(i64::try_from(n).unwrap_or(i64::MAX)),
            systolic_mmhg: Some(120 + n % 40),
            diastolic_mmhg: Some(80),
            glucose_mmol_per_l: None,
        });
        let hash = node
            .apply_health_file(document, &editor, &op)
            .map_err(Box::<NodeError>::new)?;
        writeln!(out, "ack {document} {hash}")?;
        out.flush()?;
    }
    Ok(())
}
