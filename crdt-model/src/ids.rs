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
        // Written once, not a byte at a time: ids are formatted for every key, audit record
        // and log line that names a document.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = [0u8; 32];
        for (pair, byte) in text.chunks_exact_mut(2).zip(self.0) {
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 0x0f)];
        }
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
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

/// The ICD-10 a diagnosis code is written in. The writer says which: the national editions'
/// codes share one shape, and a WHO code can look like a national one, so it is never
/// inferred from the code.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub enum Icd10System {
    /// WHO ICD-10: `I10`, `E11.9`.
    #[default]
    Who,
    /// China's national clinical edition (version 2.0), which hospital EMRs code in:
    /// `I10.x00x002`, `E11.900`.
    CnClinical,
    /// China's national healthcare security (insurance) edition (version 2.0), which
    /// insurance claims are coded in; the same shape as the clinical edition.
    CnInsurance,
}

/// Prefix of the national editions' URIs in FHIR: no registry (HL7's or a national one)
/// publishes a URI for them, so they are named in the consortium's own `urn:estuary:`
/// namespace, as its identifiers and extensions are. A code is stored with its system's
/// name, never its URI, so only FHIR output changes if a registered URI appears.
const CN_CODE_SYSTEM_PREFIX: &str = "urn:estuary:code-system:";

impl Icd10System {
    /// Every system, for documentation and tests.
    pub const ALL: [Icd10System; 3] = [Self::Who, Self::CnClinical, Self::CnInsurance];

    /// The system's name, as written in documents and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Who => "icd-10",
            Self::CnClinical => "icd-10-cn-clinical",
            Self::CnInsurance => "icd-10-cn-insurance",
        }
    }

    /// The system named `text`.
    pub fn parse(text: &str, field: &'static str) -> Result<Self, ValidationError> {
        Self::ALL
            .into_iter()
            .find(|system| system.as_str() == text)
            .ok_or(ValidationError::InvalidValue {
                field,
                reason: "the code system is one of icd-10, icd-10-cn-clinical, icd-10-cn-insurance",
            })
    }

    /// The system's URI in FHIR `Coding.system`.
    pub fn fhir_uri(self) -> String {
        match self {
            Self::Who => "http://hl7.org/fhir/sid/icd-10".to_string(),
            national => format!("{CN_CODE_SYSTEM_PREFIX}{}", national.as_str()),
        }
    }

    /// Checks that `code` has this system's shape.
    fn check(self, code: &str, field: &'static str) -> Result<(), ValidationError> {
        let (ok, reason) = match self {
            Self::Who => (
                who_shape(code.as_bytes()),
                "a WHO ICD-10 code is a capital letter, two digits, then optionally '.' and 1-4 \
                 capital letters or digits (a national edition's code needs its system)",
            ),
            Self::CnClinical | Self::CnInsurance => (
                national_shape(code.as_bytes()),
                "a national-edition ICD-10 code is a capital letter, two digits, '.', a digit or \
                 'x', two digits, then optionally 'x' and three digits (I10.x00x002)",
            ),
        };
        if ok {
            Ok(())
        } else {
            Err(ValidationError::InvalidValue { field, reason })
        }
    }
}

/// The category every edition shares: a capital letter, then two digits (WHO also allows a
/// capital letter third, as in `C4A`).
fn category(bytes: &[u8]) -> bool {
    bytes.len() >= 3 && bytes[0].is_ascii_uppercase() && bytes[1].is_ascii_digit()
}

fn who_shape(bytes: &[u8]) -> bool {
    category(bytes)
        && (bytes[2].is_ascii_digit() || bytes[2].is_ascii_uppercase())
        && match &bytes[3..] {
            [] => true,
            [b'.', rest @ ..] => {
                (1..=4).contains(&rest.len())
                    && rest
                        .iter()
                        .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
            }
            _ => false,
        }
}

fn national_shape(bytes: &[u8]) -> bool {
    let digits = |part: &[u8]| part.iter().all(u8::is_ascii_digit);
    category(bytes)
        && bytes[2].is_ascii_digit()
        && match &bytes[3..] {
            [b'.', sub, extension @ ..] => {
                (sub.is_ascii_digit() || *sub == b'x')
                    && match extension {
                        [a, b] => digits(&[*a, *b]),
                        [a, b, b'x', more @ ..] => {
                            digits(&[*a, *b]) && more.len() == 3 && digits(more)
                        }
                        _ => false,
                    }
            }
            _ => false,
        }
}

/// A diagnosis code in one of the ICD-10 systems accepted, kept exactly as written: `I10`
/// in WHO ICD-10, `I10.x00x002` in the national clinical edition.
///
/// In JSON a WHO code is its text alone (`"I10"`), as it always was; a national edition's
/// is `{"system": "icd-10-cn-clinical", "code": "I10.x00x002"}` (either form takes a system).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Icd10 {
    system: Icd10System,
    code: String,
}

impl Icd10 {
    /// A WHO ICD-10 code, checked for its shape.
    pub fn new(code: impl Into<String>) -> Result<Self, ValidationError> {
        Self::in_system(Icd10System::Who, code)
    }

    /// A code of `system`, checked for that system's shape.
    pub fn in_system(
        system: Icd10System,
        code: impl Into<String>,
    ) -> Result<Self, ValidationError> {
        let code = code.into();
        system.check(&code, "icd10")?;
        Ok(Self { system, code })
    }

    /// The code of `system` read from a document's `field`.
    pub(crate) fn read(
        system: Icd10System,
        code: &str,
        field: &'static str,
    ) -> Result<Self, ValidationError> {
        system.check(code, field)?;
        Ok(Self {
            system,
            code: code.to_string(),
        })
    }

    /// The code as written.
    pub fn as_str(&self) -> &str {
        &self.code
    }

    /// The system it is written in.
    pub fn system(&self) -> Icd10System {
        self.system
    }
}

impl Serialize for Icd10 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        if self.system == Icd10System::Who {
            return serializer.serialize_str(&self.code);
        }
        let mut coded = serializer.serialize_struct("Icd10", 2)?;
        coded.serialize_field("system", self.system.as_str())?;
        coded.serialize_field("code", &self.code)?;
        coded.end()
    }
}

impl<'de> Deserialize<'de> for Icd10 {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Icd10;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a WHO ICD-10 code as text, or {\"system\": …, \"code\": …}")
            }

            fn visit_str<E: serde::de::Error>(self, code: &str) -> Result<Icd10, E> {
                Icd10::new(code).map_err(E::custom)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Icd10, A::Error> {
                use serde::de::Error;
                let (mut system, mut code) = (None, None);
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match &*key {
                        "system" if system.is_none() => {
                            let name = map.next_value::<std::borrow::Cow<'de, str>>()?;
                            system = Some(
                                Icd10System::parse(&name, "icd10.system")
                                    .map_err(A::Error::custom)?,
                            );
                        }
                        "code" if code.is_none() => code = Some(map.next_value::<String>()?),
                        _ => {
                            return Err(A::Error::custom(ValidationError::InvalidValue {
                                field: "icd10",
                                reason: "an ICD-10 code has the fields system and code, once each",
                            }));
                        }
                    }
                }
                let system = system.ok_or_else(|| A::Error::missing_field("system"))?;
                let code = code.ok_or_else(|| A::Error::missing_field("code"))?;
                Icd10::in_system(system, code).map_err(A::Error::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_id_round_trips_through_hex() {
        let id = DocumentId::from_bytes([0xab; 16]);
        assert_eq!(DocumentId::parse(&id.to_string()), Ok(id));
        let mut bytes = [0u8; 16];
        for (n, byte) in bytes.iter_mut().enumerate() {
            *byte = (n as u8) * 0x11;
        }
        let id = DocumentId::from_bytes(bytes);
        assert_eq!(id.to_string(), "00112233445566778899aabbccddeeff");
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
        for good in ["I10", "E11.9", "K21.9", "M17.9", "C34.1", "E78.5", "C4A.0"] {
            assert!(Icd10::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "i10",
            "I1",
            "E11.",
            "E11.12345",
            "E11-9",
            "11.9",
            "I10.x00x002",
        ] {
            assert!(Icd10::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn national_edition_codes_are_kept_as_written_in_their_own_system() {
        for system in [Icd10System::CnClinical, Icd10System::CnInsurance] {
            for good in [
                "I10.x00x002",
                "E11.900",
                "J18.900",
                "I63.900x003",
                "A00.000",
            ] {
                let code = Icd10::in_system(system, good).unwrap();
                assert_eq!((code.as_str(), code.system()), (good, system));
            }
            for bad in [
                "",
                "I10",
                "E11.9",
                "I10.X00X002",
                "I10.x00x02",
                "I10.x00x0021",
                "I10.xx0",
                "I10.x00y002",
                "i10.x00",
                "C4A.000",
                "I10.x00x",
                "E11.900 ",
            ] {
                assert!(Icd10::in_system(system, bad).is_err(), "{bad}");
            }
        }
    }

    #[test]
    fn icd10_codes_read_and_write_json_in_both_forms() {
        let who: Icd10 = serde_json::from_str("\"E11.9\"").unwrap();
        assert_eq!(who, Icd10::new("E11.9").unwrap());
        assert_eq!(serde_json::to_string(&who).unwrap(), "\"E11.9\"");
        let national: Icd10 =
            serde_json::from_str(r#"{"system": "icd-10-cn-clinical", "code": "I10.x00x002"}"#)
                .unwrap();
        assert_eq!(national.system(), Icd10System::CnClinical);
        assert_eq!(
            serde_json::to_string(&national).unwrap(),
            r#"{"system":"icd-10-cn-clinical","code":"I10.x00x002"}"#
        );
        // The object form also takes WHO, and round-trips to the plain text.
        let explicit: Icd10 =
            serde_json::from_str(r#"{"code": "I10", "system": "icd-10"}"#).unwrap();
        assert_eq!(explicit, Icd10::new("I10").unwrap());
        for (bad, says) in [
            ("\"I10.x00x002\"", "needs its system"),
            (r#"{"system": "icd-10-cm", "code": "I10"}"#, "one of icd-10"),
            (
                r#"{"system": "icd-10-cn-clinical", "code": "I10"}"#,
                "national-edition",
            ),
            (r#"{"system": "icd-10-cn-clinical"}"#, "code"),
            (
                r#"{"system": "icd-10", "code": "I10", "display": "x"}"#,
                "system and code, once each",
            ),
            ("42", "WHO ICD-10 code as text"),
        ] {
            let error = serde_json::from_str::<Icd10>(bad).unwrap_err().to_string();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }
}
