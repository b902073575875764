//! A JSON Schema check of exactly the keywords `node/openapi.json` uses, for the tests that
//! hold real requests and responses to the API's description. A keyword it does not know
//! fails the check rather than being skipped, so the description cannot outgrow it unseen.

use serde_json::Value;

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
            "pattern" => match rule.as_str() {
                Some("^[0-9a-f]{32}$") => {
                    if let Some(text) = value.as_str()
                        && !(text.len() == 32
                            && text
                                .bytes()
                                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
                    {
                        return Err(format!("{at}: {text} is not 32 lowercase hex characters"));
                    }
                }
                Some(r"^\d{4}-\d{2}-\d{2}$") => {
                    if let Some(text) = value.as_str() {
                        let digits = |range: std::ops::Range<usize>| {
                            text.get(range)
                                .is_some_and(|d| d.bytes().all(|b| b.is_ascii_digit()))
                        };
                        let shaped = text.len() == 10
                            && digits(0..4)
                            && &text[4..5] == "-"
                            && digits(5..7)
                            && &text[7..8] == "-"
                            && digits(8..10);
                        if !shaped {
                            return Err(format!("{at}: {text} is not a YYYY-MM-DD date"));
                        }
                    }
                }
                other => {
                    return Err(format!(
                        "{at}: pattern {other:?} is not one this check reads"
                    ));
                }
            },
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
