//! What the changes of a history wrote into the objects they made, read from their operations
//! instead of from the document.
//!
//! Reading an object of an automerge document searches the document's columns for it; a
//! fetched file is read whole once, and most of its objects (the entries of its lists and what
//! is in them) were each written by one change, the one that made it. Such an object holds
//! exactly what that change wrote into it, so its content can be read from the change's
//! operations, which judging the change decodes anyway (`judge::judge_appends`).
//!
//! Only the plainest shapes are read this way, where the operations alone fix the content:
//! a map whose every key one operation put, overwriting nothing; a list whose every element
//! one operation inserted, each after the one inserted before it, overwriting nothing. An
//! object any other change wrote into, or written any other way (a delete, a counter, a
//! mark, a text, a key put twice), is not held here: it is read from the document as before.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use automerge::{ActorId, Change, ObjId, ObjType, OpAction, OpRead, Value};

/// A field of a map as `access::Obj` reads it: its key, and its value with the value's id.
pub(crate) type Field = (String, Option<(Value<'static>, ObjId)>);

/// What one change wrote into an object it made, when that is all the object holds.
#[derive(Debug)]
pub(crate) enum Made {
    /// A map's fields, in key order.
    Map(Vec<Field>),
    /// A list's elements, in order: each value with its id.
    List(Vec<(Value<'static>, ObjId)>),
}

/// The objects made by a set of changes and written by the change that made each alone, with
/// their content (see the module's doc).
#[derive(Debug, Default)]
pub(crate) struct Written {
    objects: HashMap<ObjId, Made>,
    /// Objects written by a change that did not make them (or made twice): never held.
    foreign: HashSet<ObjId>,
}

/// An object a change makes, as its operations fill it in.
enum Filling {
    Map(Vec<Field>),
    /// The elements so far and the operation that inserted the last one.
    List(Vec<(Value<'static>, ObjId)>, Option<(u64, ActorId)>),
    /// Written in a way not read here.
    Other,
}

impl Written {
    /// Reads what `change`, whose operations are `ops` (`Change::ops`), wrote into the
    /// objects it made, and into the root too if `root` (a creation read at its own state:
    /// the root then holds only what it wrote). Every change that wrote into an object read
    /// here must be added before it is read (`get`): an object another change also wrote
    /// into is then dropped.
    pub(crate) fn add(&mut self, change: &Change, ops: &[OpRead<'_>], root: bool) {
        let actor = change.actor_id();
        let start = change.start_op().get();
        let mut made: HashMap<u64, Filling> = HashMap::new();
        let mut at_root = root.then(|| Filling::Map(Vec::new()));
        for (index, op) in ops.iter().enumerate() {
            let counter = start + index as u64;
            match op.obj {
                None => {
                    if let Some(filling) = &mut at_root {
                        fill(filling, op, counter, actor);
                    }
                }
                Some((obj_counter, obj_actor)) => {
                    match made.get_mut(&obj_counter).filter(|_| obj_actor == actor) {
                        Some(filling) => fill(filling, op, counter, actor),
                        None => {
                            let obj = ObjId::Id(obj_counter, obj_actor.clone(), usize::MAX);
                            self.objects.remove(&obj);
                            self.foreign.insert(obj);
                        }
                    }
                }
            }
            if let OpAction::Make(kind) = op.action {
                let id = ObjId::Id(counter, actor.clone(), usize::MAX);
                let filling = match kind {
                    ObjType::Map => Filling::Map(Vec::new()),
                    ObjType::List => Filling::List(Vec::new(), None),
                    ObjType::Text | ObjType::Table => Filling::Other,
                };
                if made.insert(counter, filling).is_some() || self.objects.contains_key(&id) {
                    made.insert(counter, Filling::Other);
                    self.objects.remove(&id);
                    self.foreign.insert(id);
                }
            }
        }
        let made = made
            .into_iter()
            .map(|(counter, filling)| (ObjId::Id(counter, actor.clone(), usize::MAX), filling))
            .chain(at_root.map(|filling| (automerge::ROOT, filling)));
        for (id, filling) in made {
            if self.foreign.contains(&id) {
                continue;
            }
            let content = match filling {
                Filling::Map(mut fields) => {
                    fields.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
                    Made::Map(fields)
                }
                Filling::List(elements, _) => Made::List(elements),
                Filling::Other => continue,
            };
            self.objects.insert(id, content);
        }
    }

    /// What the changes added wrote into `obj`, if that is all it holds.
    pub(crate) fn get(&self, obj: &ObjId) -> Option<&Made> {
        self.objects.get(obj)
    }
}

/// Fills `filling` in with `op`, the operation `counter@actor` of the change that made it.
fn fill(filling: &mut Filling, op: &OpRead<'_>, counter: u64, actor: &ActorId) {
    let id = || ObjId::Id(counter, actor.clone(), usize::MAX);
    let value = match &op.action {
        OpAction::Put(scalar) => Value::Scalar(Cow::Owned(scalar.clone())),
        OpAction::Make(kind) => Value::Object(*kind),
        _ => {
            *filling = Filling::Other;
            return;
        }
    };
    if op.overwrites != 0 {
        *filling = Filling::Other;
        return;
    }
    match filling {
        Filling::Map(fields) => match op.map_key() {
            Some(key) if !op.insert && !fields.iter().any(|(k, _)| k == key) => {
                fields.push((key.to_string(), Some((value, id()))));
            }
            _ => *filling = Filling::Other,
        },
        Filling::List(elements, last) => {
            // After the element inserted last (the head for the first): the list then reads
            // in the order of its inserts.
            let after_last = match (op.elem(), &*last) {
                (Some(None), None) => true,
                (Some(Some((c, a))), Some((last_c, last_a))) => c == *last_c && a == last_a,
                _ => false,
            };
            if op.insert && after_last {
                *last = Some((counter, actor.clone()));
                elements.push((value, id()));
            } else {
                *filling = Filling::Other;
            }
        }
        Filling::Other => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::is_entry_of;
    use crate::testing::{editor, health_file};
    use crate::{HealthFileOp, View};
    use automerge::{AutoCommit, ReadDoc};
    use proptest::prelude::*;

    /// What every change of `doc` wrote, read from its operations.
    fn written(doc: &mut AutoCommit) -> Written {
        let mut written = Written::default();
        for change in doc.get_changes(&[]) {
            let ops = change.ops().collect::<Result<Vec<_>, _>>().unwrap();
            written.add(&change, &ops, false);
        }
        written
    }

    /// Checks that every object `written` holds reads in `doc` as it holds it; gives how many
    /// it holds.
    fn held_as_the_document_reads(doc: &impl ReadDoc, written: &Written) -> usize {
        for (id, made) in &written.objects {
            match made {
                Made::Map(fields) => {
                    let mut read: Vec<Field> = doc
                        .map_range(id, ..)
                        .map(|item| {
                            let value = (!item.conflict)
                                .then(|| (Value::from(item.value.clone()), item.id()));
                            (item.key.into_owned(), value)
                        })
                        .collect();
                    read.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
                    assert_eq!(fields, &read, "the map {id}");
                }
                Made::List(elements) => {
                    let read: Vec<_> = doc
                        .list_range(id, ..)
                        .map(|item| {
                            assert!(!item.conflict);
                            (Value::from(item.value.clone()), item.id())
                        })
                        .collect();
                    assert_eq!(elements, &read, "the list {id}");
                }
            }
        }
        written.objects.len()
    }

    #[test]
    fn what_a_change_wrote_into_the_objects_it_made_reads_as_the_document() {
        let mut doc = AutoCommit::load(&health_file(4, 2).save()).unwrap();
        let written = written(&mut doc);
        // Each encounter, its list of diagnoses and both diagnoses.
        assert!(held_as_the_document_reads(&doc, &written) >= 4 * 4);
        let View::HealthFile(view) = crate::view(&doc).unwrap() else {
            unreachable!("a health file")
        };
        for encounter in &view.encounters {
            assert!(
                written
                    .objects
                    .keys()
                    .any(|id| is_entry_of(&encounter.entry, id))
            );
        }
        // The list every encounter went into is written by every change: read from `doc`.
        let (_, list) = doc.get(automerge::ROOT, "encounters").unwrap().unwrap();
        assert!(written.get(&list).is_none());
    }

    #[test]
    fn an_object_another_change_wrote_into_is_read_from_the_document() {
        let mut file = health_file(3, 2);
        let view = file.view();
        let edited = view.encounters[1].entry.clone();
        file.apply(
            &editor(9_000),
            &HealthFileOp::EditEncounterNote {
                entry: edited.clone(),
                note: "seen again".into(),
            },
        )
        .unwrap();
        let mut doc = AutoCommit::load(&file.save()).unwrap();
        let written = written(&mut doc);
        held_as_the_document_reads(&doc, &written);
        for encounter in &view.encounters {
            let held = written
                .objects
                .keys()
                .any(|id| is_entry_of(&encounter.entry, id));
            assert_eq!(held, encounter.entry != edited, "{:?}", encounter.entry);
        }
    }

    /// A raw write, as any writer could record one: `map` and `list` pick among the objects
    /// made so far, keys among four, so that keys are written again and objects written by
    /// later changes.
    #[derive(Clone, Debug)]
    enum RawWrite {
        Put {
            map: usize,
            key: u8,
            value: i64,
        },
        Make {
            map: usize,
            key: u8,
            list: bool,
        },
        DeleteKey {
            map: usize,
            key: u8,
        },
        Insert {
            list: usize,
            index: usize,
            map: bool,
        },
        DeleteAt {
            list: usize,
            index: usize,
        },
    }

    fn raw_write() -> impl Strategy<Value = RawWrite> {
        prop_oneof![
            4 => (any::<usize>(), any::<u8>(), any::<i64>())
                .prop_map(|(map, key, value)| RawWrite::Put { map, key, value }),
            2 => (any::<usize>(), any::<u8>(), any::<bool>())
                .prop_map(|(map, key, list)| RawWrite::Make { map, key, list }),
            1 => (any::<usize>(), any::<u8>()).prop_map(|(map, key)| RawWrite::DeleteKey { map, key }),
            4 => (any::<usize>(), any::<usize>(), any::<bool>())
                .prop_map(|(list, index, map)| RawWrite::Insert { list, index, map }),
            1 => (any::<usize>(), any::<usize>()).prop_map(|(list, index)| RawWrite::DeleteAt { list, index }),
        ]
    }

    /// Records `write` in `doc`; writes automerge refuses are left out.
    fn record(
        doc: &mut AutoCommit,
        maps: &mut Vec<ObjId>,
        lists: &mut Vec<ObjId>,
        write: &RawWrite,
    ) {
        use automerge::transaction::Transactable;
        let key = |key: u8| format!("k{}", key % 4);
        match *write {
            RawWrite::Put { map, key: k, value } => {
                let map = maps[map % maps.len()].clone();
                let _ = doc.put(&map, key(k), value);
            }
            RawWrite::Make { map, key: k, list } => {
                let map = maps[map % maps.len()].clone();
                let kind = if list { ObjType::List } else { ObjType::Map };
                if let Ok(made) = doc.put_object(&map, key(k), kind) {
                    if list {
                        lists.push(made)
                    } else {
                        maps.push(made)
                    }
                }
            }
            RawWrite::DeleteKey { map, key: k } => {
                let map = maps[map % maps.len()].clone();
                let _ = doc.delete(&map, key(k));
            }
            RawWrite::Insert { list, index, map } => {
                let Some(list) = (!lists.is_empty()).then(|| lists[list % lists.len()].clone())
                else {
                    return;
                };
                let at = index % (doc.length(&list) + 1);
                if map {
                    if let Ok(made) = doc.insert_object(&list, at, ObjType::Map) {
                        maps.push(made);
                    }
                } else {
                    let _ = doc.insert(&list, at, index as i64);
                }
            }
            RawWrite::DeleteAt { list, index } => {
                let Some(list) = (!lists.is_empty()).then(|| lists[list % lists.len()].clone())
                else {
                    return;
                };
                let length = doc.length(&list);
                if length > 0 {
                    let _ = doc.delete(&list, index % length);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever changes of two writers wrote, every object held reads as the document
        /// reads it: the whole history's, and the first change's at its own state (root
        /// included).
        #[test]
        fn every_object_held_reads_as_the_document_reads_it(
            changes in prop::collection::vec(prop::collection::vec(raw_write(), 1..12), 1..5),
        ) {
            let mut doc = AutoCommit::new();
            let mut maps = vec![automerge::ROOT];
            let mut lists = Vec::new();
            for (index, writes) in changes.iter().enumerate() {
                doc.set_actor(automerge::ActorId::from(vec![1 + (index % 2) as u8; 32]));
                for write in writes {
                    record(&mut doc, &mut maps, &mut lists, write);
                }
                doc.commit();
            }
            let mut doc = AutoCommit::load(&doc.save()).unwrap();
            let changes = doc.get_changes(&[]);
            prop_assume!(!changes.is_empty());
            let mut written = Written::default();
            for change in &changes {
                let ops = change.ops().collect::<Result<Vec<_>, _>>().unwrap();
                written.add(change, &ops, false);
            }
            held_as_the_document_reads(&doc, &written);
            let first = &changes[0];
            let ops = first.ops().collect::<Result<Vec<_>, _>>().unwrap();
            let mut at_first = Written::default();
            at_first.add(first, &ops, true);
            let at = [first.hash()];
            held_as_the_document_reads(&crate::at::At::new(&doc, &at), &at_first);
        }
    }
}
