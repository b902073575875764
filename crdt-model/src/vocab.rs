//! The closed vocabularies of the model. Each is stored in documents as its text form.

use crate::error::ValidationError;

/// Declares a closed vocabulary stored as text, with one list of (variant, text) pairs as the
/// single source for parsing, printing and serde.
macro_rules! vocabulary {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The text stored in documents.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// Parses the stored text; `field` names the schema path for the error.
            pub fn parse(text: &str, field: &'static str) -> Result<Self, ValidationError> {
                match text {
                    $($text => Ok($name::$variant),)+
                    _ => Err(ValidationError::InvalidValue {
                        field,
                        reason: concat!("not a known ", stringify!($name)),
                    }),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use vocabulary;

vocabulary! {
    /// Administrative sex, as in FHIR's `AdministrativeGender`.
    Sex {
        /// Male.
        Male = "male",
        /// Female.
        Female = "female",
        /// Other.
        Other = "other",
        /// Unknown.
        Unknown = "unknown",
    }
}

vocabulary! {
    /// How severe an allergic reaction is.
    Severity {
        /// Mild.
        Mild = "mild",
        /// Moderate.
        Moderate = "moderate",
        /// Severe.
        Severe = "severe",
    }
}

vocabulary! {
    /// What is known of an allergy record, as FHIR's `AllergyIntoleranceVerificationStatus`.
    /// A record no one has verified has none.
    AllergyVerification {
        /// Not yet confirmed: a suspicion, or a resident's own account.
        Unconfirmed = "unconfirmed",
        /// Confirmed, for example by a test or a reaction observed.
        Confirmed = "confirmed",
        /// Shown not to be: the resident is not allergic. The record stays, refuted, so the
        /// same suspicion is not recorded again and what was believed stays visible.
        Refuted = "refuted",
    }
}

vocabulary! {
    /// Whether a chronic problem is current.
    ProblemStatus {
        /// Active.
        Active = "active",
        /// Resolved.
        Resolved = "resolved",
    }
}

vocabulary! {
    /// What kind of encounter a resident had.
    EncounterKind {
        /// An outpatient visit.
        Outpatient = "outpatient",
        /// An inpatient stay.
        Inpatient = "inpatient",
        /// A follow-up visit.
        FollowUp = "follow-up",
        /// A consultation between institutions.
        Consultation = "consultation",
        /// An emergency visit.
        Emergency = "emergency",
        /// A home visit by the community team.
        HomeVisit = "home visit",
        /// A visit to the contracted family doctor.
        FamilyDoctorVisit = "family-doctor visit",
        /// A visit that arrived by referral.
        ReferralIn = "referral-in",
    }
}

vocabulary! {
    /// What kind of examination produced a result.
    ExamKind {
        /// A laboratory test.
        Lab = "lab",
        /// An imaging study.
        Imaging = "imaging",
        /// An electrocardiogram.
        Ecg = "ecg",
    }
}

vocabulary! {
    /// What kind of member an institution is.
    InstitutionKind {
        /// The consortium's core (municipal) hospital.
        CoreHospital = "core_hospital",
        /// A district hospital.
        DistrictHospital = "district_hospital",
        /// A community health centre.
        CommunityCentre = "community_centre",
    }
}

vocabulary! {
    /// Which way a referral goes.
    Direction {
        /// Up to a hospital.
        Up = "up",
        /// Down to a community centre, for recovery.
        Down = "down",
    }
}

vocabulary! {
    /// How urgent a referral is.
    Urgency {
        /// Routine.
        Routine = "routine",
        /// Priority: the "green channel".
        Priority = "priority",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vocabulary_round_trips_its_text() {
        for kind in EncounterKind::ALL {
            assert_eq!(EncounterKind::parse(kind.as_str(), "kind"), Ok(*kind));
            let json = serde_json::to_string(kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
        }
        assert!(Sex::parse("M", "sex").is_err());
    }
}
