//! Estuary: the check that a document chunk stores its operations in the order automerge keeps
//! them in (the `OpsOutOfOrder` check the loader left as a `FIXME`).
//!
//! A document chunk's change hashes fix every operation (its id, object, key, reference,
//! action and value) and every successor, but not where the chunk stores it. The op set is
//! read in stored order: a map key's ops by binary search and their winner as the last op
//! without successors, a sequence's elements in stored order. So a chunk storing the same
//! operations in another order would load, with the same heads, into a document that reads
//! differently from the one its changes build when applied one by one. This check refuses
//! such a chunk: the order it holds the ops to is the order applying the changes produces.
//!
//! - Objects ascend by id, each object after the operation that makes it (an object is made
//!   after its parent, so the maker lies in an earlier object), and each holds keys of its
//!   own kind: a map (or table) names keys, a list (or text) names elements.
//! - In a map, keys ascend (by their bytes), and one key's ops ascend by id.
//! - In a sequence, each element's insert comes first, then the ops that update it, by
//!   ascending id. The elements are in the order of automerge's insert rule (an element goes
//!   after the one it was inserted after, past every later insert there with a greater id):
//!   that is the depth-first walk of the tree in which an element's parent is the element it
//!   was inserted after and siblings descend by id, given that an element's id is greater than
//!   its parent's (an insert comes after what it refers to, and ids grow along causality).
//!   The walk is checked in one pass with the stack of the elements on the path to the last
//!   one.
use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashMap;

use crate::op_set2::types::{Action, KeyRef};
use crate::op_set2::Op;
use crate::types::{ElemId, ObjId, OpId};

/// The state of the check, fed every op of a chunk in stored order (`process_op`).
#[derive(Debug, Default)]
pub(crate) struct OpOrderValidator<'a> {
    /// Whether each object made so far is a sequence (a list or text), by the id of the op
    /// that made it.
    made: HashMap<OpId, bool>,
    /// The object of the last op, and whether it is a sequence.
    object: Option<(ObjId, bool)>,
    /// In a map: the key and id of the last op.
    last_in_map: Option<(Cow<'a, str>, OpId)>,
    /// In a sequence: the elements on the path from the head to the last element inserted,
    /// each with the id of its last child seen (its next child must be smaller).
    path: Vec<(ElemId, Option<OpId>)>,
    /// In a sequence: the element the last op belongs to, and that op's id.
    last_in_element: Option<(ElemId, OpId)>,
    error: Option<String>,
}

impl<'a> OpOrderValidator<'a> {
    /// Whether the ops so far, `op` the last, are in order: once one is not, the chunk is
    /// refused, and the rest need not be read (building changes from ops out of order can
    /// trip automerge's own assertions).
    pub(crate) fn process_op(&mut self, op: &Op<'a>) -> bool {
        if self.error.is_none() {
            if let Err(reason) = self.check(op) {
                self.error = Some(format!("op {:?}: {reason}", op.id));
            }
        }
        self.error.is_none()
    }

    /// The first op out of order, and how, if any.
    pub(crate) fn take_error(&mut self) -> Option<String> {
        self.error.take()
    }

    fn check(&mut self, op: &Op<'a>) -> Result<(), &'static str> {
        let is_sequence = match self.object {
            Some((obj, is_sequence)) if obj == op.obj => is_sequence,
            last => {
                if last.is_some_and(|(obj, _)| op.obj < obj) {
                    return Err("its object is stored after a later object");
                }
                let is_sequence = if op.obj.is_root() {
                    false
                } else {
                    *self
                        .made
                        .get(&op.obj.0)
                        .ok_or("its object is stored before the op that makes it")?
                };
                self.object = Some((op.obj, is_sequence));
                self.last_in_map = None;
                self.path.clear();
                self.path.push((ElemId::head(), None));
                self.last_in_element = None;
                is_sequence
            }
        };
        match op.action {
            Action::MakeMap | Action::MakeTable => {
                self.made.insert(op.id, false);
            }
            Action::MakeList | Action::MakeText => {
                self.made.insert(op.id, true);
            }
            _ => {}
        }
        match (&op.key, is_sequence) {
            (KeyRef::Map(key), false) => {
                if op.insert {
                    return Err("it inserts into a map");
                }
                if let Some((last_key, last_id)) = &self.last_in_map {
                    match key.cmp(last_key) {
                        Ordering::Less => return Err("its key is stored after a greater key"),
                        Ordering::Equal if op.id <= *last_id => {
                            return Err("it is stored after a later op on its key")
                        }
                        _ => {}
                    }
                }
                self.last_in_map = Some((key.clone(), op.id));
            }
            (KeyRef::Seq(after), true) if op.insert => {
                if !after.is_head() && op.id <= after.0 {
                    return Err("it inserts after an element made after it");
                }
                loop {
                    match self.path.last() {
                        Some((element, _)) if element == after => break,
                        Some(_) => {
                            self.path.pop();
                        }
                        None => {
                            return Err("it inserts after an element not stored before it, or stored before an earlier sibling's elements end");
                        }
                    }
                }
                let (_, last_child) = self.path.last_mut().ok_or("no path")?;
                if last_child.is_some_and(|sibling| op.id >= sibling) {
                    return Err("it is stored after a sibling element with a smaller id");
                }
                *last_child = Some(op.id);
                self.path.push((ElemId(op.id), None));
                self.last_in_element = Some((ElemId(op.id), op.id));
            }
            (KeyRef::Seq(element), true) => match self.last_in_element {
                Some((last_element, last_id)) if last_element == *element && op.id > last_id => {
                    self.last_in_element = Some((*element, op.id));
                }
                _ => return Err("it updates an element it is not stored with, or after a later update"),
            },
            (KeyRef::Map(_), true) => return Err("it names a map key in a sequence"),
            (KeyRef::Seq(_), false) => return Err("it names an element in a map"),
        }
        Ok(())
    }
}
