//! Typed, validating reads of automerge objects, and the few write helpers the documents share.
//!
//! Every read checks every conflicting value of a field, not only the winner: the merge of two
//! valid documents then stays valid, which is what makes `validate` independent of the order
//! in which replicas received their changes.

use std::borrow::Cow;
use std::cell::OnceCell;

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, ReadDoc, ScalarValue, Value};
use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::ids::{Date, EntryId, Icd10, Icd10System, InstitutionId, Timestamp};
use crate::written::{Field, Made, Written};

/// A single-valued field as replicas see it after a merge: the value every replica shows by
/// default, and the concurrent values it won over, kept for a clinician to review.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(bound(deserialize = "T: Deserialize<'de>"))]
pub struct Register<T> {
    /// The value shown by default (automerge's deterministic winner).
    pub value: T,
    /// Values written concurrently with `value`; empty when there is no conflict.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<T>,
}

impl<T> Register<T> {
    /// A register without conflicts.
    pub fn single(value: T) -> Self {
        Self {
            value,
            conflicts: Vec::new(),
        }
    }

    /// Whether concurrent values are waiting for review.
    pub fn is_conflicted(&self) -> bool {
        !self.conflicts.is_empty()
    }
}

/// One automerge object of a document, read against its schema path.
pub(crate) struct Obj<'d, D: ReadDoc> {
    pub doc: &'d D,
    pub id: ObjId,
    pub path: &'static str,
    /// The object's fields, read in one pass when first asked for (see `fields`).
    fields: OnceCell<Vec<Field>>,
    /// What changes of `doc` wrote into objects they made, read from their operations: an
    /// object held there is read from there, not from `doc` (see `written`).
    written: Option<&'d Written>,
}

impl<'d, D: ReadDoc> Obj<'d, D> {
    pub fn root(doc: &'d D) -> Self {
        Self {
            doc,
            id: automerge::ROOT,
            path: "root",
            fields: OnceCell::new(),
            written: None,
        }
    }

    /// The root of `doc`, where the objects `written` holds are read from there: `written`
    /// must have read every change of `doc` that wrote into them.
    pub fn root_written(doc: &'d D, written: &'d Written) -> Self {
        Self {
            written: Some(written),
            ..Self::root(doc)
        }
    }

    pub fn child(&self, id: ObjId, path: &'static str) -> Self {
        Self {
            doc: self.doc,
            id,
            path,
            fields: OnceCell::new(),
            written: self.written,
        }
    }

    /// What the change that made this object wrote into it, if that is all it holds.
    fn made(&self, id: &ObjId) -> Option<&'d Made> {
        self.written?.get(id)
    }

    /// The object's fields in key order, read in one pass over it: reading a map field by
    /// field costs a search of the document per field (a scan at past heads). Empty for an
    /// empty map and for an object that is not a map, which are then read as before, key by
    /// key, so that what they hold (nothing, or a wrong type) is reported as before.
    fn fields(&self) -> &[Field] {
        if let Some(Made::Map(fields)) = self.made(&self.id) {
            return fields;
        }
        self.fields.get_or_init(|| {
            let mut fields = self
                .doc
                .map_range(&self.id, ..)
                .map(|item| {
                    let value =
                        (!item.conflict).then(|| (Value::from(item.value.clone()), item.id()));
                    (item.key.into_owned(), value)
                })
                .collect::<Vec<_>>();
            // Looked up by binary search: in the order of `str`, whatever order automerge
            // keeps.
            fields.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
            fields
        })
    }

    /// Rejects keys the schema does not define, so nothing unvalidated hides in a document.
    pub fn only_keys(&self, allowed: &[&str]) -> Result<(), ValidationError> {
        let fields = self.fields();
        let unknown = if fields.is_empty() {
            self.doc
                .keys(&self.id)
                .any(|key| !allowed.contains(&key.as_str()))
        } else {
            fields
                .iter()
                .any(|(key, _)| !allowed.contains(&key.as_str()))
        };
        if unknown {
            return Err(ValidationError::UnknownField { object: self.path });
        }
        Ok(())
    }

    /// Reads every value of `key`, validates each with `parse`, and returns them as a register.
    pub fn register<T>(
        &self,
        key: &str,
        field: &'static str,
        parse: impl Fn(&Self, &Value<'_>, &ObjId) -> Result<T, ValidationError>,
    ) -> Result<Option<Register<T>>, ValidationError> {
        let fields = self.fields();
        if !fields.is_empty() {
            match fields.binary_search_by(|(name, _)| name.as_str().cmp(key)) {
                Err(_) => return Ok(None),
                Ok(at) => {
                    if let (_, Some((value, id))) = &fields[at] {
                        return Ok(Some(Register::single(parse(self, value, id)?)));
                    }
                }
            }
        }
        let all = self
            .doc
            .get_all(&self.id, key)
            .map_err(|_| ValidationError::WrongType {
                field,
                expected: "a field of a map",
            })?;
        // automerge's winner is the value written by the greatest op id, which is the order of
        // `ObjId` (counter, then actor): one lookup instead of a second `get`.
        let Some(winner) = all.iter().map(|(_, id)| id).max().cloned() else {
            return Ok(None);
        };
        let mut value = None;
        let mut conflicts = Vec::with_capacity(all.len().saturating_sub(1));
        for (candidate, id) in &all {
            let parsed = parse(self, candidate, id)?;
            if *id == winner {
                value = Some(parsed);
            } else {
                conflicts.push(parsed);
            }
        }
        Ok(value.map(|value| Register { value, conflicts }))
    }

    /// A register that must be present.
    pub fn required<T>(
        &self,
        key: &str,
        field: &'static str,
        parse: impl Fn(&Self, &Value<'_>, &ObjId) -> Result<T, ValidationError>,
    ) -> Result<Register<T>, ValidationError> {
        self.register(key, field, parse)?
            .ok_or(ValidationError::MissingField { field })
    }

    /// A field written once: every value is validated, the winner is returned.
    pub fn once<T>(
        &self,
        key: &str,
        field: &'static str,
        parse: impl Fn(&Self, &Value<'_>, &ObjId) -> Result<T, ValidationError>,
    ) -> Result<T, ValidationError> {
        Ok(self.required(key, field, parse)?.value)
    }

    /// An optional field written once.
    pub fn once_opt<T>(
        &self,
        key: &str,
        field: &'static str,
        parse: impl Fn(&Self, &Value<'_>, &ObjId) -> Result<T, ValidationError>,
    ) -> Result<Option<T>, ValidationError> {
        Ok(self.register(key, field, parse)?.map(|r| r.value))
    }

    /// A container (a section, a list, a text) written once when its parent was created.
    /// Concurrent values mean it was replaced, which would hide what others added to the old
    /// one: refused.
    pub fn container(
        &self,
        key: &str,
        field: &'static str,
        kind: ObjType,
        expected: &'static str,
    ) -> Result<ObjId, ValidationError> {
        let register = self.required(key, field, object(kind, expected))?;
        if register.is_conflicted() {
            return Err(ValidationError::ReplacedObject { field });
        }
        Ok(register.value)
    }

    /// The entries of the list at `key`: each must be a single map; returns their ids.
    ///
    /// `max` bounds lists written whole in one change. Lists that grow by merging concurrent
    /// appends pass `None`: their bound is checked per change by `validate_change`, since a
    /// bound on the merged state would not survive a merge.
    pub fn entries(
        &self,
        key: &str,
        field: &'static str,
        max: Option<usize>,
    ) -> Result<Vec<ObjId>, ValidationError> {
        let list = self.container(key, field, ObjType::List, "a list")?;
        let not_objects = || ValidationError::WrongType {
            field,
            expected: "a list of objects",
        };
        // One pass over the list: reading it index by index costs a search per index, and
        // at past heads (`At`) that search is a scan, which made a list's read quadratic.
        // Only an element holding concurrent values is read again, for all of them. The pass
        // also counts the list (its length, at past heads, is another scan); past `max`, or
        // once an element is wrong, it only counts, so a list too long is refused as such.
        let mut entries = Vec::new();
        let mut count = 0;
        let mut wrong = None;
        if let Some(Made::List(elements)) = self.made(&list) {
            // Written by one change, as inserts one after another: none is conflicted.
            for (value, id) in elements {
                count += 1;
                if wrong.is_some() || max.is_some_and(|max| count > max) {
                    continue;
                }
                if *value != Value::Object(ObjType::Map) {
                    wrong = Some(not_objects());
                    continue;
                }
                entries.push(id.clone());
            }
        } else {
            for item in self.doc.list_range(&list, ..) {
                count += 1;
                if wrong.is_some() || max.is_some_and(|max| count > max) {
                    continue;
                }
                if !item.conflict {
                    if item.value != automerge::ValueRef::Object(ObjType::Map) {
                        wrong = Some(not_objects());
                        continue;
                    }
                    entries.push(item.id());
                    continue;
                }
                let Ok(values) = self.doc.get_all(&list, item.index) else {
                    wrong = Some(ValidationError::WrongType {
                        field,
                        expected: "a list",
                    });
                    continue;
                };
                for (value, id) in values {
                    if value != Value::Object(ObjType::Map) {
                        wrong = Some(not_objects());
                        break;
                    }
                    entries.push(id);
                }
            }
        }
        if let Some(max) = max.filter(|max| count > *max) {
            return Err(ValidationError::TooMany { field, count, max });
        }
        if let Some(wrong) = wrong {
            return Err(wrong);
        }
        Ok(entries)
    }

    /// The keys of a map object, in key order.
    pub fn keys(&self) -> Vec<String> {
        let fields = self.fields();
        if fields.is_empty() {
            return self.doc.keys(&self.id).collect();
        }
        fields.iter().map(|(key, _)| key.clone()).collect()
    }
}

/// The parser for an object of type `kind`: yields its id.
pub(crate) fn object<D: ReadDoc>(
    kind: ObjType,
    expected: &'static str,
) -> impl Fn(&Obj<'_, D>, &Value<'_>, &ObjId) -> Result<ObjId, ValidationError> {
    move |obj, value, id| match value {
        Value::Object(found) if *found == kind => Ok(id.clone()),
        _ => Err(ValidationError::WrongType {
            field: obj.path,
            expected,
        }),
    }
}

fn scalar<'v>(value: &'v Value<'_>) -> Option<&'v ScalarValue> {
    match value {
        Value::Scalar(Cow::Borrowed(scalar)) => Some(scalar),
        Value::Scalar(Cow::Owned(scalar)) => Some(scalar),
        Value::Object(_) => None,
    }
}

/// Checks a text's length (and that it is not empty when `required`).
pub(crate) fn check_text(
    text: &str,
    field: &'static str,
    max: usize,
    required: bool,
) -> Result<(), ValidationError> {
    if required && text.trim().is_empty() {
        return Err(ValidationError::Empty { field });
    }
    if text.len() > max {
        return Err(ValidationError::TooLong {
            field,
            bytes: text.len(),
            max,
        });
    }
    Ok(())
}

/// Parser of a string field of at most `max` bytes; `required` refuses blank text.
pub(crate) fn text<D: ReadDoc>(
    field: &'static str,
    max: usize,
    required: bool,
) -> impl Fn(&Obj<'_, D>, &Value<'_>, &ObjId) -> Result<String, ValidationError> {
    move |_, value, _| match scalar(value) {
        Some(ScalarValue::Str(text)) => {
            check_text(text, field, max, required)?;
            Ok(text.to_string())
        }
        _ => Err(ValidationError::WrongType {
            field,
            expected: "text",
        }),
    }
}

/// Parser of a text field checked by `check` and wrapped by `wrap`.
pub(crate) fn checked<D: ReadDoc, T>(
    field: &'static str,
    check: impl Fn(&str, &'static str) -> Result<T, ValidationError>,
) -> impl Fn(&Obj<'_, D>, &Value<'_>, &ObjId) -> Result<T, ValidationError> {
    move |_, value, _| match scalar(value) {
        Some(ScalarValue::Str(text)) => check(text, field),
        _ => Err(ValidationError::WrongType {
            field,
            expected: "text",
        }),
    }
}

pub(crate) fn date<D: ReadDoc>(
    field: &'static str,
) -> impl Fn(&Obj<'_, D>, &Value<'_>, &ObjId) -> Result<Date, ValidationError> {
    checked(field, |text, field| {
        Date::check(text, field)?;
        Date::new(text)
    })
}

/// The ICD-10 code of `entry`: its `code` key, in the system its `system` key names (WHO
/// when the key is absent). Each is `(key, field)`.
pub(crate) fn icd10<D: ReadDoc>(
    entry: &Obj<'_, D>,
    code: (&str, &'static str),
    system: (&str, &'static str),
) -> Result<Icd10, ValidationError> {
    let system = entry
        .once_opt(system.0, system.1, checked(system.1, Icd10System::parse))?
        .unwrap_or_default();
    entry.once(
        code.0,
        code.1,
        checked(code.1, move |text, field| Icd10::read(system, text, field)),
    )
}

pub(crate) fn institution<D: ReadDoc>(
    field: &'static str,
) -> impl Fn(&Obj<'_, D>, &Value<'_>, &ObjId) -> Result<InstitutionId, ValidationError> {
    checked(field, |text, field| {
        InstitutionId::check(text, field)?;
        InstitutionId::new(text)
    })
}

pub(crate) fn timestamp<D: ReadDoc>(
    field: &'static str,
) -> impl Fn(&Obj<'_, D>, &Value<'_>, &ObjId) -> Result<Timestamp, ValidationError> {
    move |_, value, _| match scalar(value) {
        Some(ScalarValue::Timestamp(ms)) => Ok(Timestamp(*ms)),
        _ => Err(ValidationError::WrongType {
            field,
            expected: "a timestamp",
        }),
    }
}

pub(crate) fn uint<D: ReadDoc>(
    field: &'static str,
) -> impl Fn(&Obj<'_, D>, &Value<'_>, &ObjId) -> Result<u64, ValidationError> {
    move |_, value, _| match scalar(value) {
        Some(ScalarValue::Uint(n)) => Ok(*n),
        _ => Err(ValidationError::WrongType {
            field,
            expected: "an unsigned integer",
        }),
    }
}

pub(crate) fn finite<D: ReadDoc>(
    field: &'static str,
) -> impl Fn(&Obj<'_, D>, &Value<'_>, &ObjId) -> Result<f64, ValidationError> {
    move |_, value, _| match scalar(value) {
        Some(ScalarValue::F64(n)) if n.is_finite() => Ok(*n),
        _ => Err(ValidationError::WrongType {
            field,
            expected: "a finite number",
        }),
    }
}

/// Parser of a note: a string, or an automerge Text object, as releases before notes became
/// plain registers wrote them (see ARCHITECTURE.md). Its length is bounded per change by
/// `validate_change`, not here: a Text note could grow past the bound by merging concurrent
/// edits, and such a note stays readable.
pub(crate) fn long_text<D: ReadDoc>(
    field: &'static str,
) -> impl Fn(&Obj<'_, D>, &Value<'_>, &ObjId) -> Result<String, ValidationError> {
    move |obj, value, id| match (value, scalar(value)) {
        (_, Some(ScalarValue::Str(text))) => Ok(text.to_string()),
        (Value::Object(ObjType::Text), _) => {
            obj.doc.text(id).map_err(|_| ValidationError::WrongType {
                field,
                expected: "text",
            })
        }
        _ => Err(ValidationError::WrongType {
            field,
            expected: "text",
        }),
    }
}

/// The entry id of an object.
pub(crate) fn entry_id(id: &ObjId) -> EntryId {
    EntryId(id.to_string())
}

/// Whether `entry` is the entry id of the object `id`, without formatting `id` (views are
/// brought up to date by walking a list's thousands of ids against its entries).
pub(crate) fn is_entry_of(entry: &EntryId, id: &ObjId) -> bool {
    let ObjId::Id(counter, actor, _) = id else {
        return false;
    };
    let Some((entry_counter, entry_actor)) = entry.0.split_once('@') else {
        return false;
    };
    let actor = actor.to_bytes();
    entry_counter.parse::<u64>().ok() == Some(*counter)
        && entry_actor.len() == 2 * actor.len()
        && entry_actor
            .as_bytes()
            .chunks(2)
            .zip(actor)
            .all(|(hex, byte)| {
                let digit = |c: u8| char::from(c).to_digit(16);
                matches!((digit(hex[0]), digit(hex[1])), (Some(hi), Some(lo)) if hi * 16 + lo == u32::from(*byte))
                    && hex.iter().all(|c| !c.is_ascii_uppercase())
            })
}

/// Writes a timestamp field.
pub(crate) fn put_time(
    tx: &mut impl Transactable,
    obj: &ObjId,
    key: &str,
    at: Timestamp,
) -> Result<(), crate::OpError> {
    tx.put(obj, key, ScalarValue::Timestamp(at.0))?;
    Ok(())
}

/// A new entry's fields, written in one batch when it is appended (`append_entry`): automerge
/// splices its op set twice for the whole entry, where a put per field splices it once per
/// field (a health file's entry holds ten to twenty values, an encounter's note one per
/// character).
#[derive(Default)]
pub(crate) struct NewEntry(std::collections::HashMap<String, automerge::hydrate::Value>);

impl NewEntry {
    /// Sets a scalar field.
    pub(crate) fn put(&mut self, key: &str, value: impl Into<ScalarValue>) -> &mut Self {
        self.0.insert(
            key.to_owned(),
            automerge::hydrate::Value::Scalar(value.into()),
        );
        self
    }

    /// Sets a timestamp field.
    pub(crate) fn time(&mut self, key: &str, at: Timestamp) -> &mut Self {
        self.put(key, ScalarValue::Timestamp(at.0))
    }

    /// Sets a text field, checked against `max` bytes, when there is one.
    pub(crate) fn opt_text(
        &mut self,
        key: &str,
        value: Option<&str>,
        field: &'static str,
        max: usize,
    ) -> Result<&mut Self, crate::OpError> {
        if let Some(value) = value {
            check_text(value, field, max, false)?;
            self.put(key, value);
        }
        Ok(self)
    }

    /// Sets a list of nested entries.
    pub(crate) fn list(&mut self, key: &str, items: Vec<NewEntry>) -> &mut Self {
        let items: Vec<automerge::hydrate::Value> =
            items.into_iter().map(NewEntry::into_value).collect();
        self.0.insert(key.to_owned(), items.into());
        self
    }

    /// Sets a list of scalars.
    pub(crate) fn scalars(&mut self, key: &str, items: Vec<ScalarValue>) -> &mut Self {
        let items: Vec<automerge::hydrate::Value> = items
            .into_iter()
            .map(automerge::hydrate::Value::Scalar)
            .collect();
        self.0.insert(key.to_owned(), items.into());
        self
    }

    /// Sets a field to a value already built.
    pub(crate) fn value(&mut self, key: &str, value: automerge::hydrate::Value) -> &mut Self {
        self.0.insert(key.to_owned(), value);
        self
    }

    /// The entry as one value.
    pub(crate) fn into_value(self) -> automerge::hydrate::Value {
        self.into_map().into()
    }

    /// The entry as a map.
    pub(crate) fn into_map(self) -> automerge::hydrate::Map {
        automerge::hydrate::Map::from(self.0)
    }
}

/// Writes `value` at `key` of the map `obj`: a scalar as a put, an object in one batch.
pub(crate) fn put_value(
    tx: &mut impl Transactable,
    obj: &ObjId,
    key: &str,
    value: &automerge::hydrate::Value,
) -> Result<(), crate::OpError> {
    match value {
        automerge::hydrate::Value::Scalar(scalar) => tx.put(obj, key, scalar.clone())?,
        object => {
            tx.batch_create_object(obj, key, object, false)?;
        }
    }
    Ok(())
}

/// Appends `entry` to the list at `key` of `parent` in one batch, refusing when the list is
/// full. Returns the new entry's object.
pub(crate) fn append_entry(
    tx: &mut impl Transactable,
    parent: &ObjId,
    key: &str,
    field: &'static str,
    max: usize,
    entry: NewEntry,
) -> Result<ObjId, crate::OpError> {
    let list = match tx.get(parent, key)? {
        Some((Value::Object(ObjType::List), id)) => id,
        _ => {
            return Err(ValidationError::MissingField { field }.into());
        }
    };
    let len = tx.length(&list);
    if len >= max {
        return Err(crate::OpError::Full { field, max });
    }
    Ok(tx.batch_create_object(&list, len, &entry.into_value(), true)?)
}

/// Finds the list index and object id of `entry` in the list at `key` of `parent`.
pub(crate) fn find_entry(
    doc: &impl ReadDoc,
    parent: &ObjId,
    key: &str,
    field: &'static str,
    entry: &EntryId,
) -> Result<(ObjId, usize, ObjId), crate::OpError> {
    let unknown = || crate::OpError::UnknownEntry {
        field,
        entry: entry.clone(),
    };
    let Some((Value::Object(ObjType::List), list)) = doc.get(parent, key)? else {
        return Err(ValidationError::MissingField { field }.into());
    };
    for index in 0..doc.length(&list) {
        if let Some((_, id)) = doc.get(&list, index)?
            && id.to_string() == entry.0
        {
            return Ok((list, index, id));
        }
    }
    Err(unknown())
}
