//! A JSON Schema check of exactly the keywords `node/openapi.json` and the official FHIR R4
//! JSON schema use, for the tests that hold real requests and responses to the API's
//! description and every FHIR answer to the R4 schema. A keyword it does not know fails the
//! check rather than being skipped, so neither description can outgrow it unseen.

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use serde_json::Value;
use sha2::{Digest, Sha256};

/// SHA-256 of `tests/data/fhir.schema.json.gz` once inflated: the FHIR R4 (4.0.1) JSON schema
/// as HL7 publishes it (http://hl7.org/fhir/R4/fhir.schema.json, draft-06, "id"
/// http://hl7.org/fhir/json-schema/4.0; the specification is CC0), taken unmodified (git blob
/// ae3dd40c) from github.com/dirkarnez/fhir-schema-validation, `fhir.schema.json` at commit
/// bb0c701. It differs from the 4.0.0 schema only by the 4.0.1 technical correction (the
/// `Meta` choice of extension and task values, "4.0.1" among the FHIR versions).
const FHIR_R4_SCHEMA_SHA256: &str =
    "2230406893b4cf002a4ee1e5e2bbeca22ac5d2d4931b3e9ef7b9594bbc376a01";

/// The official FHIR R4 JSON schema, checked against its recorded digest.
pub fn fhir_r4() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let packed = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/fhir.schema.json.gz"
        ))
        .unwrap();
        let mut text = Vec::new();
        flate2::read::GzDecoder::new(packed.as_slice())
            .read_to_end(&mut text)
            .unwrap();
        let digest: String = Sha256::digest(&text)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            digest, FHIR_R4_SCHEMA_SHA256,
            "the vendored FHIR schema changed"
        );
        serde_json::from_slice(&text).unwrap()
    })
}

/// FHIR answers checked against the R4 schema so far in this test binary.
static FHIR_CHECKED: AtomicUsize = AtomicUsize::new(0);

/// Checks a FHIR answer (a resource, a Bundle, an OperationOutcome) against the R4 schema.
pub fn check_fhir(resource: &Value) -> Result<(), String> {
    let schema = fhir_r4();
    let checked = check(schema, schema, resource, "$");
    FHIR_CHECKED.fetch_add(1, Ordering::Relaxed);
    checked
}

/// How many FHIR answers this test binary has checked against the R4 schema.
pub fn fhir_checked() -> usize {
    FHIR_CHECKED.load(Ordering::Relaxed)
}

/// `pattern` as JSON Schema reads it: an ECMA 262 regular expression that matches anywhere
/// in the string unless anchored. The patterns of both descriptions are in the syntax the
/// `regex` crate shares with ECMA 262.
fn matches_pattern(pattern: &str, text: &str) -> Result<bool, String> {
    static COMPILED: OnceLock<Mutex<HashMap<String, regex::Regex>>> = OnceLock::new();
    let mut compiled = COMPILED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if !compiled.contains_key(pattern) {
        let regex = regex::Regex::new(pattern)
            .map_err(|error| format!("pattern {pattern:?} does not compile: {error}"))?;
        compiled.insert(pattern.to_owned(), regex);
    }
    Ok(compiled[pattern].is_match(text))
}

/// The API's description.
pub fn openapi() -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Checks `value` against `schema`, `$ref`s resolved in `root`; the error names where
/// (`at`, a JSON path) and which rule.
pub fn check(root: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let Some(rules) = schema.as_object() else {
        return Err(format!("{at}: the schema is not an object"));
    };
    if let Some(reference) = rules.get("$ref").and_then(Value::as_str) {
        let target = reference
            .strip_prefix("#/")
            .map(|path| path.split('/').fold(root, |node, key| &node[key]))
            .filter(|target| !target.is_null())
            .ok_or_else(|| format!("{at}: unresolved {reference}"))?;
        return check(root, target, value, at);
    }
    for (keyword, rule) in rules {
        match keyword.as_str() {
            "description" | "summary" | "title" | "example" | "format" => {}
            // The FHIR schema's own header: where its definitions live, and which of them a
            // resource's `resourceType` names (read by `oneOf` below).
            "$schema" | "id" | "definitions" | "discriminator" => {}
            "type" => {
                let allowed: Vec<&str> = match rule {
                    Value::String(one) => vec![one.as_str()],
                    Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
                    _ => return Err(format!("{at}: a type that is not a name")),
                };
                if !allowed.iter().any(|kind| is_type(kind, value)) {
                    return Err(format!("{at}: {value} is not of type {allowed:?}"));
                }
            }
            "required" => {
                if let Some(object) = value.as_object() {
                    for name in rule
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                    {
                        if !object.contains_key(name) {
                            return Err(format!("{at}: required field `{name}` is missing"));
                        }
                    }
                }
            }
            "properties" => {
                if let (Some(object), Some(properties)) = (value.as_object(), rule.as_object()) {
                    for (name, sub) in properties {
                        if let Some(field) = object.get(name) {
                            check(root, sub, field, &format!("{at}.{name}"))?;
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Some(object) = value.as_object() {
                    let known = rules.get("properties").and_then(Value::as_object);
                    for (name, field) in object {
                        if known.is_some_and(|k| k.contains_key(name)) {
                            continue;
                        }
                        match rule {
                            Value::Bool(false) => {
                                return Err(format!("{at}: field `{name}` is not described"));
                            }
                            Value::Bool(true) => {}
                            sub => check(root, sub, field, &format!("{at}.{name}"))?,
                        }
                    }
                }
            }
            "items" => {
                for (index, item) in value.as_array().into_iter().flatten().enumerate() {
                    check(root, rule, item, &format!("{at}[{index}]"))?;
                }
            }
            "enum" => {
                if !rule
                    .as_array()
                    .is_some_and(|allowed| allowed.contains(value))
                {
                    return Err(format!("{at}: {value} is not one of {rule}"));
                }
            }
            "const" => {
                if rule != value {
                    return Err(format!("{at}: {value} is not {rule}"));
                }
            }
            "oneOf" => {
                let branches = rule.as_array().cloned().unwrap_or_default();
                // A resource is one of FHIR's resources: the one its `resourceType` names,
                // by the schema's discriminator. Every other branch fixes another type.
                let named = value["resourceType"].as_str().and_then(|kind| {
                    root["discriminator"]["mapping"][kind]
                        .as_str()
                        .map(|target| (kind, target))
                });
                if let Some((kind, target)) = named
                    && branches.iter().any(|b| b["$ref"] == target)
                {
                    check(root, &serde_json::json!({ "$ref": target }), value, at)
                        .map_err(|error| format!("{error} (as a {kind})"))?;
                    continue;
                }
                let resource_list =
                    root["discriminator"]["mapping"]
                        .as_object()
                        .is_some_and(|mapping| {
                            branches
                                .iter()
                                .all(|b| mapping.values().any(|target| *target == b["$ref"]))
                        });
                if resource_list {
                    return Err(format!(
                        "{at}: {} is not a FHIR resource type",
                        value["resourceType"]
                    ));
                }
                let matching = branches
                    .iter()
                    .filter(|branch| check(root, branch, value, at).is_ok())
                    .count();
                if matching != 1 {
                    return Err(format!(
                        "{at}: {value} matches {matching} of the {} alternatives, not one",
                        branches.len()
                    ));
                }
            }
            "minProperties" | "maxProperties" => {
                if let (Some(object), Some(bound)) = (value.as_object(), rule.as_u64()) {
                    let count = object.len() as u64;
                    let within = match keyword.as_str() {
                        "minProperties" => count >= bound,
                        _ => count <= bound,
                    };
                    if !within {
                        return Err(format!("{at}: {count} fields, against {keyword} {bound}"));
                    }
                }
            }
            "minimum" => {
                if let (Some(number), Some(bound)) = (value.as_f64(), rule.as_f64())
                    && number < bound
                {
                    return Err(format!("{at}: {number} is below {bound}"));
                }
            }
            "pattern" => {
                let Some(pattern) = rule.as_str() else {
                    return Err(format!("{at}: a pattern that is not a string"));
                };
                // A pattern concerns strings only (FHIR's schema also sets patterns on its
                // boolean and number primitives).
                if let Some(text) = value.as_str()
                    && !matches_pattern(pattern, text).map_err(|e| format!("{at}: {e}"))?
                {
                    return Err(format!("{at}: {text:?} does not match {pattern:?}"));
                }
            }
            other => {
                return Err(format!(
                    "{at}: keyword `{other}` is not one this check reads"
                ));
            }
        }
    }
    Ok(())
}

fn is_type(kind: &str, value: &Value) -> bool {
    match kind {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => false,
    }
}

/// The schema of `method path`'s answer with `status` (`None` if that status is not
/// described for it).
pub fn response_schema<'a>(
    root: &'a Value,
    method: &str,
    path: &str,
    status: u16,
) -> Option<&'a Value> {
    let mut response = &root["paths"][path][method.to_lowercase()]["responses"][status.to_string()];
    if response.is_null() {
        return None;
    }
    if let Some(reference) = response["$ref"].as_str() {
        response = reference
            .strip_prefix("#/")?
            .split('/')
            .fold(root, |node, key| &node[key]);
    }
    let content = response["content"].as_object()?;
    content.values().next().map(|media| &media["schema"])
}
