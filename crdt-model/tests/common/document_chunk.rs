//! A saved document taken apart at its columns and put back together, to craft document
//! chunks the way a hostile peer could: automerge 0.12's layout, checksum and all.

use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// The bit of a column specification that marks its data as DEFLATE.
pub const COLUMN_DEFLATE: u32 = 0x08;

/// One document chunk: everything before the column metadata, the columns, and the heads'
/// indices after them.
#[derive(Clone, Debug, PartialEq)]
pub struct DocumentChunk {
    /// The actors and the heads, as written.
    pub prefix: Vec<u8>,
    /// Each change column's specification and data.
    pub change_columns: Vec<(u32, Vec<u8>)>,
    /// Each op column's specification and data.
    pub op_columns: Vec<(u32, Vec<u8>)>,
    /// The heads' indices, as written.
    pub suffix: Vec<u8>,
}

impl DocumentChunk {
    /// Takes apart the one document chunk of `saved` (what `save` returns).
    pub fn parse(saved: &[u8]) -> Self {
        assert_eq!(saved[..4], [0x85, 0x6f, 0x4a, 0x83], "automerge magic");
        assert_eq!(saved[8], 0, "a document chunk");
        let mut at = 9;
        let length = uleb(saved, &mut at) as usize;
        let data = &saved[at..];
        assert_eq!(data.len(), length, "one chunk");
        let mut at = 0;
        for _ in 0..uleb(data, &mut at) {
            at += uleb(data, &mut at) as usize;
        }
        at += 32 * uleb(data, &mut at) as usize;
        let prefix = data[..at].to_vec();
        let mut metadata = || -> Vec<(u32, usize)> {
            (0..uleb(data, &mut at))
                .map(|_| (uleb(data, &mut at) as u32, uleb(data, &mut at) as usize))
                .collect()
        };
        let change_metadata = metadata();
        let op_metadata = metadata();
        let mut columns = |metadata: Vec<(u32, usize)>| -> Vec<(u32, Vec<u8>)> {
            metadata
                .into_iter()
                .map(|(specification, length)| {
                    at += length;
                    (specification, data[at - length..at].to_vec())
                })
                .collect()
        };
        let change_columns = columns(change_metadata);
        let op_columns = columns(op_metadata);
        DocumentChunk {
            prefix,
            change_columns,
            op_columns,
            suffix: data[at..].to_vec(),
        }
    }

    /// The chunk as bytes, with its length and checksum computed afresh.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut data = self.prefix.clone();
        for columns in [&self.change_columns, &self.op_columns] {
            write_uleb(&mut data, columns.len() as u64);
            for (specification, column) in columns {
                write_uleb(&mut data, u64::from(*specification));
                write_uleb(&mut data, column.len() as u64);
            }
        }
        for (_, column) in self.change_columns.iter().chain(&self.op_columns) {
            data.extend(column);
        }
        data.extend(&self.suffix);
        chunk(0, &data)
    }

    /// Every column, change columns first, as (specification, data).
    pub fn columns_mut(&mut self) -> impl Iterator<Item = &mut (u32, Vec<u8>)> {
        self.change_columns
            .iter_mut()
            .chain(self.op_columns.iter_mut())
    }
}

/// A DEFLATE stream of `mebibytes` MiB of zeros, about 1,000 to 1: one MiB compressed once
/// and repeated. Each copy ends in a sync flush, so it is a whole run of blocks that refers
/// only to the zeros before it, and copies can follow one another.
pub fn deflate_zeros(mebibytes: usize) -> Vec<u8> {
    static MEBIBYTE: OnceLock<Vec<u8>> = OnceLock::new();
    let mebibyte = MEBIBYTE.get_or_init(|| {
        let mut compressor = flate2::Compress::new(flate2::Compression::best(), false);
        let mut compressed = Vec::with_capacity(64 * 1024);
        compressor
            .compress_vec(
                &vec![0; 1024 * 1024],
                &mut compressed,
                flate2::FlushCompress::Sync,
            )
            .expect("compresses into a Vec with room");
        assert_eq!(
            compressor.total_in(),
            1024 * 1024,
            "the whole MiB was taken"
        );
        compressed
    });
    let mut stream = mebibyte.repeat(mebibytes);
    // A last, empty block with fixed codes: final bit, type 01, end of block.
    stream.extend([0x03, 0x00]);
    stream
}

/// An automerge chunk of `chunk_type` around `data`, with its length and checksum.
pub fn chunk(chunk_type: u8, data: &[u8]) -> Vec<u8> {
    // The checksum: the first 4 bytes of SHA-256 over the chunk type, length and data.
    let mut hashed = vec![chunk_type];
    write_uleb(&mut hashed, data.len() as u64);
    hashed.extend(data);
    let hash = Sha256::digest(&hashed);
    let mut chunk = vec![0x85, 0x6f, 0x4a, 0x83];
    chunk.extend(&hash[..4]);
    chunk.extend(&hashed);
    chunk
}

/// Inflates a DEFLATE stream into memory.
pub fn inflate(compressed: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut inflated = Vec::new();
    flate2::bufread::DeflateDecoder::new(compressed)
        .read_to_end(&mut inflated)
        .expect("a valid stream");
    inflated
}

fn uleb(bytes: &[u8], at: &mut usize) -> u64 {
    let mut value = 0;
    let mut shift = 0;
    loop {
        let byte = bytes[*at];
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return value;
        }
    }
}

/// Writes an unsigned LEB128 value.
pub fn write_uleb(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        out.push(if value == 0 { byte } else { byte | 0x80 });
        if value == 0 {
            return;
        }
    }
}
