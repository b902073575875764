//! Decompression bombs: compressed parts of untrusted automerge bytes that inflate past their
//! bounds are refused on every decode path, with a typed reason, before automerge inflates
//! them; malformed column layouts are refused the same way, never with a panic.

mod common;

use common::document_chunk::*;
use common::*;
use estuary_crdt_model::*;

const MIB: u64 = 1024 * 1024;

/// A health file with `encounters` encounters, each with a note of about 1 KB of clinical
/// words, long enough for automerge to deflate columns of the saved document.
fn file_with_notes(encounters: i64) -> HealthFile {
    const WORDS: &str = "patient reports chest pain on exertion for three weeks blood pressure \
        elevated advised follow-up with cardiology ECG sinus rhythm aspirin daily metformin \
        glucose renal";
    let words: Vec<&str> = WORDS.split_whitespace().collect();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut file = new_file(1);
    for encounter in 0..encounters {
        let mut note = String::new();
        while note.len() < 1_000 {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            note.push_str(words[(seed >> 33) as usize % words.len()]);
            note.push_str(if seed.is_multiple_of(11) { ". " } else { " " });
        }
        file.apply(
            &editor("chc-jianshe", 2_000 + encounter),
            &HealthFileOp::AddEncounter(NewEncounter {
                time: Timestamp(5 + encounter),
                kind: EncounterKind::Outpatient,
                diagnoses: vec![],
                note,
            }),
        )
        .expect("a valid encounter");
    }
    file
}

/// The verdict of every path that decodes untrusted bytes. A replica that refuses them is
/// left unchanged.
fn every_decode(bytes: &[u8]) -> Vec<(&'static str, Result<(), LoadError>)> {
    let base = new_file(1);
    let mut replica = new_file(1);
    let heads = replica.heads();
    let verdicts = vec![
        ("load_document", load_document(bytes).map(drop)),
        (
            "HealthFile::load",
            HealthFile::load(bytes, &actor(2)).map(drop),
        ),
        ("load_incremental", replica.load_incremental(bytes)),
        (
            "decode_changes_onto",
            decode_changes_onto(base.automerge(), bytes).map(drop),
        ),
        ("decode_change", decode_change(bytes).map(drop)),
        ("split_sync_chunk", split_sync_chunk(bytes).map(drop)),
    ];
    assert_eq!(replica.heads(), heads, "a refused load changes nothing");
    verdicts
}

#[track_caller]
fn assert_refused(path: &str, verdict: Result<(), LoadError>, because: &str) {
    match verdict {
        Err(LoadError::Refused { reason }) if reason.contains(because) => {}
        other => panic!("{path}: expected a refusal saying {because:?}, got {other:?}"),
    }
}

/// A small saved health file taken apart at its columns, with the index of a compressed one.
fn genuine_chunk() -> (DocumentChunk, usize) {
    let saved = file_with_notes(1).save();
    let mut chunk = DocumentChunk::parse(&saved);
    assert_eq!(chunk.to_bytes(), saved, "taken apart and put back exactly");
    let compressed = chunk
        .columns_mut()
        .position(|(specification, _)| *specification & COLUMN_DEFLATE != 0)
        .expect("a note of 1 KB is saved in a compressed column");
    (chunk, compressed)
}

#[test]
fn a_document_column_that_inflates_past_its_limit_is_refused_on_every_path() {
    let (mut chunk, compressed) = genuine_chunk();
    let mebibytes = limits::DOCUMENT_COLUMN_INFLATED_BYTES_MAX / MIB + 1;
    chunk.columns_mut().nth(compressed).expect("the column").1 = deflate_zeros(mebibytes as usize);
    let bomb = chunk.to_bytes();
    assert!(bomb.len() < 64 * 1024, "a small bomb: {} bytes", bomb.len());
    for (path, verdict) in every_decode(&bomb) {
        assert_refused(path, verdict, "document column inflates past its limit");
    }
}

#[test]
fn document_columns_that_together_inflate_past_the_limit_of_one_decode_are_refused() {
    let (mut chunk, _) = genuine_chunk();
    // Three columns, each within the column bound, together past the bound of one decode.
    let mebibytes = limits::INFLATED_BYTES_PER_DECODE_MAX / MIB / 3 + 1;
    assert!(mebibytes * MIB <= limits::DOCUMENT_COLUMN_INFLATED_BYTES_MAX);
    let bomb = deflate_zeros(mebibytes as usize);
    for (specification, column) in chunk.columns_mut().take(3) {
        *specification |= COLUMN_DEFLATE;
        column.clone_from(&bomb);
    }
    assert_refused(
        "load_document",
        load_document(&chunk.to_bytes()).map(drop),
        "past the limit of one decode",
    );
}

#[test]
fn compressed_changes_count_towards_the_limit_of_one_decode() {
    // Each within the bound of one compressed change, together past the bound of one decode.
    let mebibytes = limits::CHANGE_INFLATED_BYTES_MAX / MIB - 1;
    let count = limits::INFLATED_BYTES_PER_DECODE_MAX / (mebibytes * MIB) + 1;
    let compressed_change = chunk(2, &deflate_zeros(mebibytes as usize));
    let bytes = compressed_change.repeat(count as usize);
    assert!(
        bytes.len() < 128 * 1024,
        "small bombs: {} bytes",
        bytes.len()
    );
    let base = new_file(1);
    assert_refused(
        "decode_changes_onto",
        decode_changes_onto(base.automerge(), &bytes).map(drop),
        "past the limit of one decode",
    );
}

#[test]
fn honest_documents_with_compressed_columns_load_on_every_path() {
    let mut file = file_with_notes(80);
    let saved = file.save();
    let mut chunk = DocumentChunk::parse(&saved);
    let inflated: u64 = chunk
        .columns_mut()
        .filter(|(specification, _)| *specification & COLUMN_DEFLATE != 0)
        .map(|(_, column)| inflate(column).len() as u64)
        .sum();
    assert!(inflated > 64 * 1024, "columns to inflate: {inflated} bytes");

    let loaded = HealthFile::load(&saved, &actor(2)).expect("an honest document loads");
    assert_eq!(loaded.view(), file.view());
    let empty = automerge::AutoCommit::new();
    let changes = decode_changes_onto(&empty, &saved).expect("an honest document decodes");
    assert_eq!(changes.len(), file.changes_since(&[]).len());

    // A replica takes the saved document and an increment in one call.
    let mut replica = new_file(1);
    let mut both = saved.clone();
    file.save_incremental();
    file.apply(
        &editor("chc-jianshe", 9_000),
        &HealthFileOp::AddEncounter(NewEncounter {
            time: Timestamp(9_000),
            kind: EncounterKind::Outpatient,
            diagnoses: vec![],
            note: "seen again".into(),
        }),
    )
    .expect("a valid encounter");
    both.extend(file.save_incremental());
    replica
        .load_incremental(&both)
        .expect("honest chunks load together");
    assert_eq!(replica.view(), file.view());
}

#[test]
fn malformed_column_layouts_are_refused_not_panicked_on() {
    let unreadable = "column layout is unreadable";
    let uleb = |value: u64| {
        let mut bytes = Vec::new();
        write_uleb(&mut bytes, value);
        bytes
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("no data", vec![], unreadable),
        ("actors missing", vec![5], unreadable),
        ("an actor past the end", vec![1, 200, 1, 2], unreadable),
        ("heads past the end", vec![0, 3, 0, 0], unreadable),
        (
            "a head count whose bytes overflow",
            [&[0][..], &uleb(1 << 62)].concat(),
            unreadable,
        ),
        (
            "an absurd column count",
            [&[0, 0][..], &uleb(u64::MAX)].concat(),
            "too many columns",
        ),
        (
            "one column more than the limit",
            [&[0, 0][..], &uleb(limits::DOCUMENT_COLUMNS_MAX as u64 + 1)].concat(),
            "too many columns",
        ),
        (
            "a column specification past 32 bits",
            [&[0, 0, 1][..], &uleb(1 << 33), &[1, 0, 0]].concat(),
            unreadable,
        ),
        (
            "column metadata cut short",
            vec![0, 0, 2, 0x1d, 4],
            unreadable,
        ),
        (
            "a column longer than the chunk",
            [&[0, 0, 1, 0x1d][..], &uleb(1_000_000), &[0], &[0; 10]].concat(),
            "runs past its end",
        ),
        (
            "a column of the largest length",
            [&[0, 0, 0, 1, 0x1d][..], &uleb(u64::MAX), &[0; 10]].concat(),
            "runs past its end",
        ),
    ];
    for (case, data, because) in cases {
        let bytes = chunk(0, &data);
        assert_refused(case, load_document(&bytes).map(drop), because);
    }

    let (mut document, compressed) = genuine_chunk();
    document
        .columns_mut()
        .nth(compressed)
        .expect("the column")
        .1 = vec![0xff; 16];
    assert_refused(
        "a compressed column that is not DEFLATE",
        load_document(&document.to_bytes()).map(drop),
        "document column does not inflate",
    );
    // Refused for what comes first, as when every stream was inflated before the rest was
    // walked: a compressed change that does not inflate, then a chunk of a type not accepted.
    let bytes = [chunk(2, &[0xff; 16]), chunk(5, &[0; 4])].concat();
    assert_refused(
        "a broken compressed change before a chunk of another type",
        load_document(&bytes).map(drop),
        "compressed change does not inflate",
    );

    // Every cut of a genuine document before its heads' indices is refused by the walk.
    let (document, _) = genuine_chunk();
    let saved = document.to_bytes();
    let data = &saved[9 + uleb_size(&saved[9..])..];
    let columns_end = data.len() - document.suffix.len();
    for cut in 0..columns_end {
        let bytes = chunk(0, &data[..cut]);
        let verdict = load_document(&bytes).map(drop);
        assert!(
            matches!(verdict, Err(LoadError::Refused { .. })),
            "cut at {cut} of {columns_end}: {verdict:?}"
        );
    }
}

/// Bytes taken by the LEB128 value at the start of `bytes`.
fn uleb_size(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .position(|byte| byte & 0x80 == 0)
        .expect("a LEB128 value")
        + 1
}

#[test]
fn the_document_load_fuzz_seed_is_a_refused_bomb() {
    let seed = include_bytes!("../../fuzz/seeds/document_load/document-column-bomb");
    assert!(seed.len() < 64 * 1024, "seeds stay small");
    assert_refused(
        "load_document",
        load_document(seed).map(drop),
        "document column inflates past its limit",
    );
}

/// A sync message's chunk splits into its changes, each decoded on its own, and its
/// documents: concatenated changes (automerge's version-2 messages), a compressed change, and
/// a whole document followed by change chunks (as `save()` writes the changes it holds aside).
/// A change whose dependency is missing comes out like the others. Bad framing after a good
/// chunk refuses the whole.
#[test]
fn a_sync_chunk_splits_into_its_changes_and_documents() {
    let mut doc = file_with_notes(3).automerge().clone();
    let changes = doc.get_changes(&[]);
    assert_eq!(changes.len(), 4);
    // The last two, without the one they build on.
    let mut gap = changes[2].raw_bytes().to_vec();
    gap.extend_from_slice(changes[3].raw_bytes());
    let pieces = split_sync_chunk(&gap).expect("two changes");
    let hashes: Vec<_> = pieces
        .iter()
        .map(|piece| match piece {
            SyncChunk::Change(change) => change.hash(),
            SyncChunk::Document(_) => panic!("no document here"),
        })
        .collect();
    assert_eq!(hashes, vec![changes[2].hash(), changes[3].hash()]);
    // A compressed change (automerge compresses a change's bytes above 256 bytes).
    let compressed = changes[3].clone().bytes().to_vec();
    assert_eq!(compressed[8], 2, "a compressed change chunk");
    match split_sync_chunk(&compressed)
        .expect("a compressed change")
        .as_slice()
    {
        [SyncChunk::Change(change)] => assert_eq!(change.hash(), changes[3].hash()),
        _ => panic!("one change"),
    }
    // A document, then a change.
    let mut saved = doc.save();
    let document_bytes = saved.len();
    saved.extend_from_slice(changes[1].raw_bytes());
    match split_sync_chunk(&saved)
        .expect("a document and a change")
        .as_slice()
    {
        [SyncChunk::Document(document), SyncChunk::Change(change)] => {
            assert_eq!(document.len(), document_bytes);
            assert_eq!(change.hash(), changes[1].hash());
        }
        _ => panic!("a document and a change"),
    }
    // Framing cut short after a good chunk.
    let mut cut = changes[1].raw_bytes().to_vec();
    cut.extend_from_slice(&changes[2].raw_bytes()[..20]);
    assert!(split_sync_chunk(&cut).is_err());
    assert!(split_sync_chunk(&[]).is_err());
}
