//! A document chunk from a peer is refused unless it stores its operations in the order
//! automerge keeps them in.
//!
//! A chunk's change hashes fix every operation but not where the chunk stores it, and a
//! document is read in stored order (a list's elements, a key's winning value). A chunk that
//! stores the same operations otherwise would load, with the same heads and signatures, into
//! a document that reads differently from the one its changes build when applied: two
//! replicas holding the same heads would disagree for good. The stored order of a document is
//! unique, so every other order is refused, and every document automerge saves loads.

use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, Automerge, ObjId as ExId, ObjType, ROOT, ReadDoc};
use estuary_crdt_model::{LoadError, load_document, load_document_with_changes};
use proptest::prelude::*;

/// An op as `save_with_ops_reordered` describes it: object, key, id, whether it inserts.
type Described = (ExId, String, ExId, bool);

fn actor(n: u8) -> ActorId {
    ActorId::from([n; 16])
}

/// A document of the first writer's, its status a draft.
fn drafted() -> AutoCommit {
    let mut doc = AutoCommit::new().with_actor(actor(1));
    doc.put(ROOT, "status", "draft").unwrap();
    doc.commit();
    doc
}

/// Both loaders refuse `bytes`, naming the stored order as the reason.
fn refused_for_order(bytes: &[u8]) {
    refused_because(bytes, "out of order");
}

/// Both loaders refuse `bytes`, with a reason that says `reason`.
fn refused_because(bytes: &[u8], reason: &str) {
    for (loader, verdict) in [
        ("load_document", load_document(bytes).map(drop)),
        (
            "load_document_with_changes",
            load_document_with_changes(bytes).map(drop),
        ),
    ] {
        match verdict {
            Err(LoadError::Decode(error)) => assert!(
                error.to_string().contains(reason),
                "{loader}: refused for another reason: {error}"
            ),
            other => panic!("{loader}: a crafted chunk loads: {other:?}"),
        }
    }
}

/// The stored positions of `doc`'s ops that `pick` selects, in stored order.
fn positions(doc: &Automerge, pick: impl Fn(&Described) -> bool) -> Vec<usize> {
    let mut found = Vec::new();
    doc.save_with_ops_reordered(|ops, _| {
        found = (0..ops.len()).filter(|&pos| pick(&ops[pos])).collect();
    });
    found
}

/// `doc` saved with the ops at stored positions `a` and `b` swapped.
fn swapped(doc: &Automerge, a: usize, b: usize) -> Vec<u8> {
    doc.save_with_ops_reordered(|_, order| order.swap(a, b))
}

/// Two writers insert at the head of one list at once: the elements are siblings, stored by
/// descending id. Stored the other way round, the list would read reversed.
#[test]
fn sibling_elements_stored_in_another_order_are_refused() {
    let mut base = AutoCommit::new().with_actor(actor(1));
    let list = base.put_object(ROOT, "list", ObjType::List).unwrap();
    base.commit();
    let mut other = base.fork().with_actor(actor(2));
    base.insert(&list, 0, "from one").unwrap();
    other.insert(&list, 0, "from two").unwrap();
    base.merge(&mut other).unwrap();
    let doc = base.document();
    let inserts = positions(doc, |(obj, _, _, insert)| *obj == list && *insert);
    assert_eq!(inserts.len(), 2);
    let honest = doc.save_with_ops_reordered(|_, _| {});
    assert!(load_document(&honest).is_ok(), "the order automerge keeps");
    refused_for_order(&swapped(doc, inserts[0], inserts[1]));
}

/// Two writers set one key at once: the later id wins. Stored the other way round, the other
/// value would.
#[test]
fn conflicting_values_of_a_key_stored_in_another_order_are_refused() {
    let mut base = drafted();
    let mut other = base.fork().with_actor(actor(2));
    base.put(ROOT, "status", "final").unwrap();
    other.put(ROOT, "status", "cancelled").unwrap();
    base.merge(&mut other).unwrap();
    let doc = base.document();
    let writes = positions(doc, |(_, key, _, _)| key == "status");
    assert_eq!(writes.len(), 3);
    refused_for_order(&swapped(doc, writes[1], writes[2]));
}

/// A map's keys, its objects, and an element's updates each have their place.
#[test]
fn keys_objects_and_updates_stored_out_of_place_are_refused() {
    let mut doc = AutoCommit::new().with_actor(actor(1));
    doc.put(ROOT, "a", 1).unwrap();
    doc.put(ROOT, "b", 2).unwrap();
    let first = doc.put_object(ROOT, "first", ObjType::Map).unwrap();
    let second = doc.put_object(ROOT, "second", ObjType::List).unwrap();
    doc.put(&first, "k", "v").unwrap();
    doc.insert(&second, 0, "x").unwrap();
    doc.insert(&second, 1, "y").unwrap();
    doc.commit();
    doc.put(&second, 0, "x2").unwrap();
    doc.commit();
    let doc = doc.document();
    let a = positions(doc, |(_, key, _, _)| key == "a")[0];
    let b = positions(doc, |(_, key, _, _)| key == "b")[0];
    refused_for_order(&swapped(doc, a, b));
    let in_first = positions(doc, |(obj, _, _, _)| *obj == first)[0];
    let in_second = positions(doc, |(obj, _, _, _)| *obj == second)[0];
    refused_for_order(&swapped(doc, in_first, in_second));
    // The update of the first element, moved after the second element.
    let in_list = positions(doc, |(obj, _, _, _)| *obj == second);
    assert_eq!(in_list.len(), 3, "two inserts and an update");
    refused_for_order(&swapped(doc, in_list[1], in_list[2]));
}

/// A chunk holding ops of a change it does not carry (with the heads of the changes it does)
/// would read that change's writes under heads that leave them out.
#[test]
fn ops_of_no_change_in_the_chunk_are_refused() {
    let mut doc = drafted();
    let mut before = doc.fork().with_actor(actor(1));
    doc.put(ROOT, "status", "final").unwrap();
    doc.put(ROOT, "extra", 1).unwrap();
    doc.commit();
    let crafted = doc.document().save_with_changes_of(before.document());
    refused_because(&crafted, "belongs to no change");
}

/// What one writer does to its replica in a random history.
#[derive(Debug, Clone)]
enum Step {
    Put { key: u8, value: u8 },
    PutObject { key: u8, list: bool },
    Insert { at: u8, value: u8 },
    InsertObject { at: u8 },
    Delete { at: u8 },
    Splice { at: u8, delete: u8, text: String },
    Mark { at: u8, length: u8 },
    Increment { by: i8 },
    Merge { from: usize },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..4u8, any::<u8>()).prop_map(|(key, value)| Step::Put { key, value }),
        (0..4u8, any::<bool>()).prop_map(|(key, list)| Step::PutObject { key, list }),
        (any::<u8>(), any::<u8>()).prop_map(|(at, value)| Step::Insert { at, value }),
        any::<u8>().prop_map(|at| Step::InsertObject { at }),
        any::<u8>().prop_map(|at| Step::Delete { at }),
        (any::<u8>(), 0..3u8, "[a-z]{0,4}").prop_map(|(at, delete, text)| Step::Splice {
            at,
            delete,
            text
        }),
        (any::<u8>(), 1..4u8).prop_map(|(at, length)| Step::Mark { at, length }),
        any::<i8>().prop_map(|by| Step::Increment { by }),
        (0..3usize).prop_map(|from| Step::Merge { from }),
    ]
}

/// Three writers, each with its own replica of one document, taking `steps` in turn; then
/// one replica merges the others.
fn history(steps: &[(usize, Step)]) -> AutoCommit {
    let mut base = AutoCommit::new().with_actor(actor(1));
    let list = base.put_object(ROOT, "list", ObjType::List).unwrap();
    let text = base.put_object(ROOT, "text", ObjType::Text).unwrap();
    base.put(ROOT, "count", automerge::ScalarValue::counter(0))
        .unwrap();
    base.commit();
    let mut replicas = vec![
        base.fork().with_actor(actor(2)),
        base.fork().with_actor(actor(3)),
    ];
    replicas.insert(0, base);
    for (writer, step) in steps {
        let writer = writer % replicas.len();
        if let Step::Merge { from } = step {
            if *from != writer {
                let mut other = replicas[*from].fork().with_actor(actor(9));
                replicas[writer].merge(&mut other).unwrap();
            }
            continue;
        }
        let doc = &mut replicas[writer];
        let length = doc.length(&list);
        let text_length = doc.length(&text);
        let key = |k: &u8| format!("k{k}");
        match step {
            Step::Put { key: k, value } => {
                doc.put(ROOT, key(k), u64::from(*value)).unwrap();
            }
            Step::PutObject { key: k, list } => {
                let kind = if *list { ObjType::List } else { ObjType::Map };
                let made = doc.put_object(ROOT, key(k), kind).unwrap();
                if *list {
                    doc.insert(&made, 0, "inner").unwrap();
                } else {
                    doc.put(&made, "inner", 1).unwrap();
                }
            }
            Step::Insert { at, value } => {
                let at = usize::from(*at) % (length + 1);
                doc.insert(&list, at, u64::from(*value)).unwrap();
            }
            Step::InsertObject { at } => {
                let at = usize::from(*at) % (length + 1);
                let made = doc.insert_object(&list, at, ObjType::Map).unwrap();
                doc.put(&made, "entry", "x").unwrap();
            }
            Step::Delete { at } if length > 0 => {
                doc.delete(&list, usize::from(*at) % length).unwrap();
            }
            Step::Delete { .. } => {}
            Step::Splice {
                at,
                delete,
                text: inserted,
            } => {
                let at = usize::from(*at) % (text_length + 1);
                let delete = usize::from(*delete).min(text_length - at);
                doc.splice_text(&text, at, delete as isize, inserted)
                    .unwrap();
            }
            Step::Mark { at, length } if text_length > 0 => {
                let start = usize::from(*at) % text_length;
                let end = (start + usize::from(*length)).min(text_length);
                let mark = automerge::marks::Mark::new("bold".into(), true, start, end);
                doc.mark(&text, mark, automerge::marks::ExpandMark::After)
                    .unwrap();
            }
            Step::Mark { .. } => {}
            Step::Increment { by } => {
                doc.increment(ROOT, "count", i64::from(*by)).unwrap();
            }
            Step::Merge { .. } => unreachable!(),
        }
        doc.commit();
    }
    let mut merged = replicas.remove(0);
    for other in &mut replicas {
        merged.merge(other).unwrap();
    }
    merged
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Every document automerge saves loads, and reads as it did.
    #[test]
    fn every_document_automerge_saves_loads(
        steps in proptest::collection::vec((0..3usize, step()), 1..40),
    ) {
        let mut doc = history(&steps);
        let bytes = doc.save();
        let (loaded, _) = load_document_with_changes(&bytes)
            .unwrap_or_else(|e| panic!("an honest document is refused: {e}"));
        prop_assert_eq!(loaded.hydrate(ROOT, None).unwrap(), doc.hydrate(ROOT, None).unwrap());
        let unreordered = doc.document().save_with_ops_reordered(|_, _| {});
        prop_assert!(load_document(&unreordered).is_ok());
    }

    /// Any two ops of a document swapped, the chunk is refused.
    #[test]
    fn every_other_order_of_a_documents_ops_is_refused(
        steps in proptest::collection::vec((0..3usize, step()), 1..40),
        first in any::<prop::sample::Index>(),
        second in any::<prop::sample::Index>(),
    ) {
        let mut doc = history(&steps);
        let doc = doc.document();
        let count = positions(doc, |_| true).len();
        let (a, b) = (first.index(count), second.index(count));
        prop_assume!(a != b);
        refused_for_order(&swapped(doc, a, b));
    }
}
