//! Bulk load: a member joining the consortium brings its existing records, each resident
//! written as **one** signed change that creates their health file with every record in it
//! (`HealthFile::create_with_records`).
//!
//! Two shapes are read:
//! - NDJSON, one resident per line, in the shape of the consortium's data set
//!   ([`records::FileRecord`]);
//! - a FHIR R4 `transaction` Bundle of Patients and their AllergyIntolerances, Conditions,
//!   MedicationRequests, Encounters and Observations ([`fhir`]).
//!
//! A record that cannot be read is refused with its place (line or Bundle entry) and a reason
//! that names fields and rules, never the values; the other records are loaded. Parsing here
//! is pure: the node writes what it yields (`Writer::import_health_files`).

pub mod fhir;
pub mod records;

use crate::model::{Demographics, HealthFileOp, Timestamp};

/// Longest NDJSON line, one resident's record, in bytes. The data set's records are 1.6 to
/// 9 KB; a resident with twenty years of visits is a few hundred KB. It also bounds the one
/// change a resident becomes well within what sync carries (`SYNC_MESSAGE_BYTES_MAX`).
pub const RECORD_BYTES_MAX: usize = 1024 * 1024;

/// A resident as loaded: the demographics that create the file, when the file was first
/// opened where the records come from, and the records to write into it, each at its time.
#[derive(Clone, Debug, PartialEq)]
pub struct ResidentRecords {
    /// Who the resident is.
    pub demographics: Demographics,
    /// When the source system opened the file (the earliest the records know of).
    pub created_at: Timestamp,
    /// The records, in the order they are written, each with the time it was recorded.
    pub records: Vec<(Timestamp, HealthFileOp)>,
}

/// Why one record was not loaded. Reasons name fields and rules, never values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The text is not JSON of the expected shape.
    #[error("{0}")]
    Shape(String),
    /// A field's value breaks a rule.
    #[error("field `{field}`: {reason}")]
    Field {
        /// The field, as the input names it.
        field: &'static str,
        /// The rule it breaks.
        reason: String,
    },
    /// The record is longer than [`RECORD_BYTES_MAX`].
    #[error("longer than {RECORD_BYTES_MAX} bytes")]
    TooLong,
}

/// What is wrong with untrusted JSON, without what it holds: serde's own messages may quote
/// the offending value, so only the position and, for a missing field, the field's name
/// (from our schema) are passed on; so is a value refused by the model's own checks (a date,
/// a diagnosis code), whose `ValidationError` names the field and the rule, never the value.
/// `what` names the text ("the body", "the record").
pub fn json_reason(error: &serde_json::Error, what: &str) -> String {
    let at = format!("line {} column {}", error.line(), error.column());
    let text = error.to_string();
    match error.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            format!("{what} is not valid JSON (at {at})")
        }
        serde_json::error::Category::Data => match text
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
        {
            Some(field) => format!("required field `{field}` is missing (at {at})"),
            // `ValidationError::InvalidValue`'s words; serde's own never start so.
            None if text.starts_with("field `") && text.contains("` is invalid: ") => {
                let rule = text
                    .rsplit_once(" at line ")
                    .map_or(text.as_str(), |(rule, _)| rule);
                format!("{rule} (at {at})")
            }
            None => format!(
                "the JSON does not match the expected shape at {at}: check field names, types and allowed values"
            ),
        },
        serde_json::error::Category::Io => format!("{what} could not be read (at {at})"),
    }
}

/// Days from 1970-01-01 to a civil date (Howard Hinnant's algorithm), for the times records
/// carry.
pub(crate) fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

/// The civil date (year, month, day) `days` after 1970-01-01: the inverse of
/// [`days_from_civil`].
pub(crate) fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// One NDJSON line as a resident's records.
pub fn resident_from_line(line: &str) -> Result<ResidentRecords, RecordError> {
    if line.len() > RECORD_BYTES_MAX {
        return Err(RecordError::TooLong);
    }
    let record: records::FileRecord = serde_json::from_str(line)
        .map_err(|error| RecordError::Shape(json_reason(&error, "the record")))?;
    record.resident()
}

/// The residents of an NDJSON text, each with its line number (from 1); blank lines are
/// skipped.
pub fn residents_from_ndjson(
    text: &str,
) -> impl Iterator<Item = (usize, Result<ResidentRecords, RecordError>)> + '_ {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| (index + 1, resident_from_line(line)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_line_is_refused_with_its_number_and_no_value() {
        let good = include_str!("../../tests/data/resident.json").trim();
        let bad_date = good.replace("\"birthDate\":\"", "\"birthDate\":\"19x");
        let text = format!("{good}\n\n{{\"id\": \n{bad_date}\n");
        let read: Vec<_> = residents_from_ndjson(&text).collect();
        assert_eq!(read.len(), 3);
        assert_eq!(read[0].0, 1);
        let resident = read[0].1.as_ref().unwrap();
        assert_eq!(resident.demographics.name.family, "Lu");
        assert!(!resident.records.is_empty());
        assert_eq!(read[1].0, 3);
        assert!(
            matches!(&read[1].1, Err(RecordError::Shape(reason)) if reason.contains("not valid JSON"))
        );
        assert_eq!(read[2].0, 4);
        let refused = read[2].1.as_ref().unwrap_err().to_string();
        assert!(
            refused.starts_with("field `demographics.birthDate`"),
            "{refused}"
        );
        assert!(!refused.contains("19x"), "{refused}");
    }
}
