//! Linked health files: the link and unlink operations, the group a read finds, the combined
//! record, and the group's determinism whatever order links and edits arrive in.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use common::*;
use estuary_crdt_model::linked::{CombinedRecord, Group, find_group};
use estuary_crdt_model::*;
use proptest::prelude::*;

const INSTITUTIONS: [&str; 3] = ["chc-jianshe", "xinhua", "dh-chongming-2"];

fn link(to: DocumentId) -> HealthFileOp {
    HealthFileOp::Link {
        to,
        reason: "same national id, registered twice".into(),
    }
}

fn allergy(substance: &str) -> HealthFileOp {
    HealthFileOp::AddAllergy(NewAllergy {
        substance: substance.into(),
        reaction: "urticaria".into(),
        severity: Severity::Severe,
    })
}

/// The group of `start` among `files`, read through their views and the links they hold.
fn group_of(files: &[&HealthFile], start: DocumentId) -> Option<Group<Arc<HealthFileView>>> {
    let views: BTreeMap<DocumentId, Arc<HealthFileView>> =
        files.iter().map(|f| (f.id(), Arc::new(f.view()))).collect();
    find_group(
        start,
        |id| Ok::<_, ()>(views.get(&id).cloned()),
        |id| {
            Ok(views
                .iter()
                .filter(|(from, view)| linked::linked_to(**from, view) == Some(id))
                .map(|(from, _)| *from)
                .collect())
        },
    )
    .expect("reads do not fail here")
}

#[test]
fn a_duplicate_linked_to_the_main_file_reads_as_one_record_through_either() {
    let mut main = new_file(1);
    let mut duplicate = new_file(2);
    let hospital = editor("xinhua", 5_000);
    main.apply(&editor("chc-jianshe", 2_000), &allergy("penicillin"))
        .unwrap();
    duplicate
        .apply(&hospital, &allergy("iodine contrast"))
        .unwrap();
    duplicate
        .apply(
            &hospital,
            &HealthFileOp::SetDemographic(DemographicField::Phone("+86 139".into())),
        )
        .unwrap();
    let before = duplicate.automerge().clone();
    duplicate.apply(&hospital, &link(main.id())).unwrap();
    assert_eq!(
        validate_change(&before, duplicate.automerge(), &hospital.institution),
        Ok(DocumentKind::HealthFile)
    );
    let link = duplicate.view().link.unwrap().value;
    assert_eq!(link.to, Some(main.id()));
    assert_eq!(link.recorded_by, hospital.institution);

    let through_main = group_of(&[&main, &duplicate], main.id()).unwrap();
    let through_duplicate = group_of(&[&main, &duplicate], duplicate.id()).unwrap();
    assert_eq!(through_main, through_duplicate);
    assert_eq!(through_main.main, main.id());
    let record = CombinedRecord::of(&through_main).unwrap();
    assert_eq!(record.files, vec![main.id(), duplicate.id()]);
    assert_eq!(record.view.id, main.id());
    // Both files' allergies, the main file's first; nothing dropped.
    let substances: Vec<&str> = record
        .view
        .allergies
        .iter()
        .map(|a| a.substance.as_str())
        .collect();
    assert_eq!(substances, ["penicillin", "iodine contrast"]);
    let in_duplicate = &record.view.allergies[1].entry;
    assert_eq!(record.entry_files.get(in_duplicate), Some(&duplicate.id()));
    assert_eq!(record.entry_files.len(), 1);
    // The phones differ: the main file's shows, the duplicate's is there to review.
    let phone = record.view.demographics.phone.as_ref().unwrap();
    assert_eq!(phone.value, "+86 13599251131");
    assert_eq!(phone.conflicts, ["+86 139"]);
    assert!(
        record
            .view
            .conflicts()
            .contains(&"demographics.phone".into())
    );
    assert!(record.links.contains_key(&duplicate.id()));
    assert!(!record.links.contains_key(&main.id()));
}

#[test]
fn an_unlinked_file_reads_alone_again_and_keeps_the_link_in_its_history() {
    let main = new_file(1);
    let mut duplicate = new_file(2);
    let clerk = editor("xinhua", 5_000);
    duplicate.apply(&clerk, &link(main.id())).unwrap();
    let unlink = HealthFileOp::Unlink {
        reason: "two residents with one name".into(),
    };
    duplicate.apply(&clerk, &unlink).unwrap();
    let link = duplicate.view().link.unwrap().value;
    assert_eq!(link.to, None);
    assert_eq!(link.reason, "two residents with one name");
    let group = group_of(&[&main, &duplicate], duplicate.id()).unwrap();
    assert_eq!(group.files.len(), 1);
    assert_eq!(group.main, duplicate.id());
    // Unlinking a file that is not linked says so.
    let error = duplicate.apply(&clerk, &unlink).unwrap_err();
    assert!(matches!(
        error,
        OpError::Invalid(ValidationError::InvalidValue { field: "link", .. })
    ));
}

#[test]
fn a_file_is_not_linked_to_itself() {
    let mut file = new_file(1);
    let error = file
        .apply(&editor("xinhua", 5_000), &link(file.id()))
        .unwrap_err();
    assert!(matches!(
        error,
        OpError::Invalid(ValidationError::InvalidValue {
            field: "link.to",
            ..
        })
    ));
    assert!(file.view().link.is_none());
}

#[test]
fn a_link_in_another_institutions_name_is_refused() {
    use automerge::{ObjType, ScalarValue, transaction::Transactable};
    let file = new_file(1);
    let mut doc = file.automerge().clone();
    let before = doc.clone();
    doc.set_actor(automerge::ActorId::from([9u8; 32].as_slice()));
    let link = doc
        .put_object(automerge::ROOT, "link", ObjType::Map)
        .unwrap();
    doc.put(&link, "to", doc_id(7).to_string()).unwrap();
    doc.put(&link, "reason", "same resident").unwrap();
    doc.put(&link, "recorded_by", "chc-jianshe").unwrap();
    doc.put(&link, "recorded_at", ScalarValue::Timestamp(1))
        .unwrap();
    doc.commit();
    assert_eq!(
        validate_change(&before, &doc, &institution("xinhua")),
        Err(ValidationError::Provenance {
            field: "link.recorded_by"
        })
    );
}

#[test]
fn files_linked_to_each_other_concurrently_lead_with_the_smaller_id() {
    let mut a = new_file(1);
    let mut b = new_file(2);
    a.apply(&editor("xinhua", 5_000), &link(b.id())).unwrap();
    b.apply(&editor("chc-jianshe", 5_000), &link(a.id()))
        .unwrap();
    let smaller = a.id().min(b.id());
    for start in [a.id(), b.id()] {
        let group = group_of(&[&a, &b], start).unwrap();
        assert_eq!(group.main, smaller);
        assert_eq!(group.files.len(), 2);
    }
}

#[test]
fn a_group_is_read_up_to_its_bound_and_names_the_rest() {
    let count = LINKED_FILES_MAX + 4;
    let mut files: Vec<HealthFile> = (0..count).map(|n| new_file(n as u8 + 1)).collect();
    // A chain: each file linked to the next.
    for n in 0..count - 1 {
        let next = files[n + 1].id();
        files[n]
            .apply(&editor("xinhua", 5_000), &link(next))
            .unwrap();
    }
    let all: Vec<&HealthFile> = files.iter().collect();
    let group = group_of(&all, files[0].id()).unwrap();
    assert_eq!(group.files.len(), LINKED_FILES_MAX);
    // The first file beyond the bound is named; those only it links to are not found.
    assert_eq!(group.missing, vec![files[LINKED_FILES_MAX].id()]);
    let read: BTreeSet<DocumentId> = group.files.iter().map(|(id, _)| *id).collect();
    assert!(group.missing.iter().all(|id| !read.contains(id)));
    // A file linked to one not held reads with it named as missing.
    let alone = group_of(&all[..1], files[0].id()).unwrap();
    assert_eq!(alone.main, files[0].id());
    assert_eq!(alone.missing, vec![files[1].id()]);
}

// ---- Determinism ------------------------------------------------------------------------

/// Files of one resident registered three times.
const FILES: usize = 3;

#[derive(Clone, Debug)]
enum Action {
    Link(usize),
    Unlink,
    Allergy(u8),
    Phone(u8),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        (0..FILES).prop_map(Action::Link),
        Just(Action::Unlink),
        any::<u8>().prop_map(Action::Allergy),
        any::<u8>().prop_map(Action::Phone),
    ]
}

#[derive(Clone, Debug)]
enum Step {
    Edit {
        node: usize,
        file: usize,
        action: Action,
    },
    Sync {
        from: usize,
        to: usize,
        file: usize,
    },
}

fn step(nodes: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..nodes, 0..FILES, action()).prop_map(|(node, file, action)| Step::Edit { node, file, action }),
        1 => (0..nodes, 0..nodes, 0..FILES).prop_map(|(from, to, file)| Step::Sync { from, to, file }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Nodes holding three files of one resident link, unlink and edit them concurrently and
    /// exchange changes in any order; once every node holds every change, every node reads
    /// the same group and the same combined record through every file, and no allergy
    /// recorded anywhere is missing from the record of its file's group.
    #[test]
    fn linked_files_read_the_same_on_every_node_whatever_the_order(
        nodes in 2usize..=4,
        steps in prop::collection::vec(step(4), 1..40),
    ) {
        let origins: Vec<HealthFile> = (0..FILES).map(|f| new_file(f as u8 + 1)).collect();
        let ids: Vec<DocumentId> = origins.iter().map(HealthFile::id).collect();
        let mut held: Vec<Vec<HealthFile>> = (0..nodes)
            .map(|node| {
                origins
                    .iter()
                    .map(|file| {
                        let saved = file.automerge().clone().save();
                        HealthFile::load(&saved, &actor(100 + node as u8)).unwrap()
                    })
                    .collect()
            })
            .collect();
        for step in steps {
            match step {
                Step::Edit { node, file, action } => {
                    let node = node % nodes;
                    let who = editor(INSTITUTIONS[node % INSTITUTIONS.len()], 10_000 + node as i64);
                    let target = &mut held[node][file];
                    let op = match action {
                        Action::Link(other) if other != file => link(ids[other]),
                        Action::Link(_) => continue,
                        Action::Unlink => {
                            if target.view().link.and_then(|l| l.value.to).is_none() {
                                continue;
                            }
                            HealthFileOp::Unlink { reason: "two residents".into() }
                        }
                        Action::Allergy(n) => allergy(&format!("substance {n}")),
                        Action::Phone(n) => {
                            HealthFileOp::SetDemographic(DemographicField::Phone(format!("+86 {n}")))
                        }
                    };
                    target.apply(&who, &op).unwrap();
                }
                Step::Sync { from, to, file } => {
                    let (from, to) = (from % nodes, to % nodes);
                    let changes = held[from][file].automerge().clone().get_changes(&[]);
                    held[to][file].apply_changes(changes).unwrap();
                }
            }
        }
        for file in 0..FILES {
            let mut all = Vec::new();
            for node in &held {
                all.extend(node[file].automerge().clone().get_changes(&[]));
            }
            for node in &mut held {
                node[file].apply_changes(all.clone()).unwrap();
            }
        }
        let records = |node: &Vec<HealthFile>| -> Vec<CombinedRecord> {
            let files: Vec<&HealthFile> = node.iter().collect();
            ids.iter()
                .map(|id| CombinedRecord::of(&group_of(&files, *id).unwrap()).unwrap())
                .collect()
        };
        let first = records(&held[0]);
        for node in &held[1..] {
            prop_assert_eq!(&records(node), &first);
        }
        for (index, record) in first.iter().enumerate() {
            prop_assert!(record.files.contains(&ids[index]));
            prop_assert!(record.missing.is_empty());
            // Every file of the group is read, and the group is the same through each.
            for other in &record.files {
                let through = &first[ids.iter().position(|id| id == other).unwrap()];
                prop_assert_eq!(through, record);
            }
            let mut expected: Vec<EntryId> = Vec::new();
            for file in &record.files {
                let position = ids.iter().position(|id| id == file).unwrap();
                expected.extend(held[0][position].view().allergies.into_iter().map(|a| a.entry.clone()));
            }
            let shown: Vec<EntryId> = record.view.allergies.iter().map(|a| a.entry.clone()).collect();
            prop_assert_eq!(shown, expected);
        }
    }
}
