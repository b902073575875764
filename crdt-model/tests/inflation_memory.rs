//! A refused decompression bomb is counted as it inflates, never held in memory. The only
//! test of its binary, so that the process's peak memory is this test's alone.

mod common;

use common::document_chunk::*;
use estuary_crdt_model::*;

/// The process's peak resident memory so far, in bytes (Linux's `VmHWM`).
#[cfg(target_os = "linux")]
fn peak_resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux has /proc");
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .expect("Linux reports VmHWM");
    let kibibytes: u64 = line
        .trim_start_matches("VmHWM:")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .expect("VmHWM is a number of kB");
    kibibytes * 1024
}

#[cfg(target_os = "linux")]
#[test]
fn a_refused_document_column_bomb_is_never_held_in_memory() {
    let mut file = common::new_file(1);
    let saved = file.save();
    let mut chunk = DocumentChunk::parse(&saved);
    let inflated_bytes = limits::DOCUMENT_COLUMN_INFLATED_BYTES_MAX + 1024 * 1024;
    let column = chunk
        .columns_mut()
        .max_by_key(|(_, column)| column.len())
        .expect("a document has columns");
    column.0 |= COLUMN_DEFLATE;
    column.1 = deflate_zeros((inflated_bytes / (1024 * 1024)) as usize);
    let bomb = chunk.to_bytes();

    let before = peak_resident_bytes();
    let verdict = load_document(&bomb);
    let grown = peak_resident_bytes().saturating_sub(before);
    // Holding the inflated column, as automerge does, would grow the peak by all of it.
    assert!(
        grown < inflated_bytes / 4,
        "the peak grew by {grown} bytes for a column of {inflated_bytes}"
    );
    assert!(
        matches!(verdict, Err(LoadError::Refused { .. })),
        "{verdict:?}"
    );
}
