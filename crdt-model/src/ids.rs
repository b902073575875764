//! Identifiers and small value types shared by every document.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::limits::INSTITUTION_ID_BYTES_MAX;

/// The id of one document: 128 random bits chosen by the node that creates it.
///
/// A resident's national id is never a document id; it is indexed by a salted hash in `node`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocumentId([u8; 16]);

impl DocumentId {
    /// Wraps 16 bytes, normally drawn from a cryptographic random source by the caller.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The 16 bytes of the id.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Parses the 32-character lowercase hex form.
    pub fn parse(text: &str) -> Result<Self, ValidationError> {
        let invalid = ValidationError::InvalidValue {
            field: "id",
            reason: "a document id is 32 lowercase hex characters",
        };
        decode_hex(text).map(Self).ok_or(invalid)
    }
}

impl fmt::Display for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocumentId({self})")
    }
}

impl Serialize for DocumentId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DocumentId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Decodes exactly `2 * N` lowercase hex characters. Every byte is checked before any is
/// decoded, so text with multi-byte characters from a peer is refused, never sliced.
pub(crate) fn decode_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let hex = text.as_bytes();
    let lowercase_hex = |c: &u8| c.is_ascii_digit() || (b'a'..=b'f').contains(c);
    if hex.len() != 2 * N || !hex.iter().all(lowercase_hex) {
        return None;
    }
    let nibble = |c: u8| {
        if c.is_ascii_digit() {
            c - b'0'
        } else {
            c - b'a' + 10
        }
    };
    let mut bytes = [0u8; N];
    for (byte, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = (nibble(pair[0]) << 4) | nibble(pair[1]);
    }
    Some(bytes)
}

/// An opaque institution id from the roster, such as `xinhua` or `chc-jianshe`.
///
/// `node` binds institutions to node keys; here it is only a validated name: 1 to 64 bytes of
/// lowercase ASCII letters, digits and `-`, so it is safe in logs, keys and paths.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct InstitutionId(String);

impl InstitutionId {
    /// Validates and wraps an institution id.
    pub fn new(text: impl Into<String>) -> Result<Self, ValidationError> {
        let text = text.into();
        Self::check(&text, "institution")?;
        Ok(Self(text))
    }

    pub(crate) fn check(text: &str, field: &'static str) -> Result<(), ValidationError> {
        let well_formed = !text.is_empty()
            && text.len() <= INSTITUTION_ID_BYTES_MAX
            && text
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
        if well_formed {
            Ok(())
        } else {
            Err(ValidationError::InvalidValue {
                field,
                reason: "an institution id is 1-64 bytes of a-z, 0-9 and '-'",
            })
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstitutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for InstitutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstitutionId({})", self.0)
    }
}

impl<'de> Deserialize<'de> for InstitutionId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::new(String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// The automerge actor of a replica: opaque bytes here, the node's public key in `node`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Actor(Vec<u8>);

impl Actor {
    /// Wraps the actor's bytes.
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// The actor's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub(crate) fn to_automerge(&self) -> automerge::ActorId {
        automerge::ActorId::from(self.0.as_slice())
    }
}

impl fmt::Debug for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Actor({})", self.to_automerge())
    }
}

/// Names one entry of a clinical list (an allergy, an encounter, a referral event…).
///
/// It is the automerge id of the entry's object, `counter@actor`: unique across replicas,
/// the same on every replica, and larger than every entry the writer had seen.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize)]
#[serde(transparent)]
pub struct EntryId(pub(crate) String);

/// Longest actor part of an entry id, in hex characters (a 64-byte actor).
const ENTRY_ACTOR_HEX_MAX: usize = 128;
/// Longest counter part of an entry id, in decimal digits (a `u64`).
const ENTRY_COUNTER_DIGITS_MAX: usize = 20;

impl EntryId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses the `counter@actor` form shown in views: decimal digits, `@`, lowercase hex.
    /// Anything else is refused, so an id from an app or a peer is safe to echo in errors.
    pub fn parse(text: &str) -> Result<Self, ValidationError> {
        let well_formed = text.split_once('@').is_some_and(|(counter, actor)| {
            (1..=ENTRY_COUNTER_DIGITS_MAX).contains(&counter.len())
                && counter.bytes().all(|c| c.is_ascii_digit())
                && (1..=ENTRY_ACTOR_HEX_MAX).contains(&actor.len())
                && actor
                    .bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        });
        if well_formed {
            Ok(Self(text.to_string()))
        } else {
            Err(ValidationError::InvalidValue {
                field: "entry",
                reason: "an entry id is counter@actor: decimal digits, '@', lowercase hex",
            })
        }
    }
}

impl<'de> Deserialize<'de> for EntryId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A moment, in milliseconds since the Unix epoch (UTC). Stored as an automerge timestamp.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

/// The institution making an edit and when. Every typed operation takes one.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Editor {
    /// The institution whose node writes the change.
    pub institution: InstitutionId,
    /// When the edit was made (the writer's clock; informative, never used to order merges).
    pub at: Timestamp,
}

/// A calendar date, `YYYY-MM-DD` (a birth date, an onset, the start of a prescription).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize)]
#[serde(transparent)]
pub struct Date(String);

impl Date {
    /// Validates a `YYYY-MM-DD` date, including month lengths and leap years.
    pub fn new(text: impl Into<String>) -> Result<Self, ValidationError> {
        let text = text.into();
        Self::check(&text, "date")?;
        Ok(Self(text))
    }

    pub(crate) fn check(text: &str, field: &'static str) -> Result<(), ValidationError> {
        let invalid = ValidationError::InvalidValue {
            field,
            reason: "a date is YYYY-MM-DD with a real month and day",
        };
        let bytes = text.as_bytes();
        if !text.is_ascii() || bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
            return Err(invalid);
        }
        let number = |range: std::ops::Range<usize>| -> Option<u32> {
            let part = &text[range];
            part.bytes()
                .all(|c| c.is_ascii_digit())
                .then(|| part.parse().ok())?
        };
        let (Some(year), Some(month), Some(day)) = (number(0..4), number(5..7), number(8..10))
        else {
            return Err(invalid);
        };
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        let days_in_month = match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => return Err(invalid),
        };
        if year < 1850 || day == 0 || day > days_in_month {
            return Err(invalid);
        }
        Ok(())
    }

    /// The date as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Date {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::new(String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// An ICD-10 code such as `I10`, `E11.9` or `K21.9`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize)]
#[serde(transparent)]
pub struct Icd10(String);

impl Icd10 {
    /// Validates the shape of an ICD-10 code: a capital letter, two digits, then optionally
    /// a dot and one to four letters or digits.
    pub fn new(text: impl Into<String>) -> Result<Self, ValidationError> {
        let text = text.into();
        Self::check(&text, "icd10")?;
        Ok(Self(text))
    }

    pub(crate) fn check(text: &str, field: &'static str) -> Result<(), ValidationError> {
        let bytes = text.as_bytes();
        let head_ok = bytes.len() >= 3
            && bytes[0].is_ascii_uppercase()
            && bytes[1].is_ascii_digit()
            && (bytes[2].is_ascii_digit() || bytes[2].is_ascii_uppercase());
        let tail_ok = match &bytes[bytes.len().min(3)..] {
            [] => true,
            [b'.', rest @ ..] => {
                (1..=4).contains(&rest.len())
                    && rest
                        .iter()
                        .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
            }
            _ => false,
        };
        if head_ok && tail_ok {
            Ok(())
        } else {
            Err(ValidationError::InvalidValue {
                field,
                reason: "an ICD-10 code is a letter, two digits, then optionally '.' and 1-4 more",
            })
        }
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Icd10 {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::new(String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_id_round_trips_through_hex() {
        let id = DocumentId::from_bytes([0xab; 16]);
        assert_eq!(DocumentId::parse(&id.to_string()), Ok(id));
        assert!(DocumentId::parse("AB").is_err());
        assert!(DocumentId::parse(&"g".repeat(32)).is_err());
        assert!(DocumentId::parse(&"AB".repeat(16)).is_err());
        // 32 bytes, but multi-byte characters straddle the pairs: refused, not a panic.
        assert!(DocumentId::parse(&"é".repeat(16)).is_err());
        assert!(DocumentId::parse(&format!("a{}", "é".repeat(15))).is_err());
    }

    #[test]
    fn institution_ids_are_log_safe() {
        assert!(InstitutionId::new("chc-jianshe").is_ok());
        assert!(InstitutionId::new("").is_err());
        assert!(InstitutionId::new("Xinhua Hospital").is_err());
        assert!(InstitutionId::new("a".repeat(65)).is_err());
    }

    #[test]
    fn entry_ids_have_their_shape() {
        assert!(EntryId::parse("12@0a1b").is_ok());
        for bad in ["", "12", "@ab", "12@", "x@ab", "12@AB", "12@ab@cd", "1é@ab"] {
            assert!(EntryId::parse(bad).is_err(), "{bad}");
        }
        assert!(EntryId::parse(&format!("1@{}", "a".repeat(129))).is_err());
    }

    #[test]
    fn dates_check_calendar() {
        assert!(Date::new("2024-02-29").is_ok());
        assert!(Date::new("2023-02-29").is_err());
        assert!(Date::new("2023-13-01").is_err());
        assert!(Date::new("2023-1-01").is_err());
        assert!(Date::new("1954-10-17").is_ok());
        assert!(Date::new("+123-10-17").is_err());
        assert!(Date::new("2é4-01-01").is_err());
    }

    #[test]
    fn icd10_codes_have_their_shape() {
        for good in ["I10", "E11.9", "K21.9", "M17.9", "C34.1", "E78.5"] {
            assert!(Icd10::new(good).is_ok(), "{good}");
        }
        for bad in ["", "i10", "I1", "E11.", "E11.12345", "E11-9", "11.9"] {
            assert!(Icd10::new(bad).is_err(), "{bad}");
        }
    }
}
