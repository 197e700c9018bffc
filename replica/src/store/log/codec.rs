//! The log's on-disk records (`docs/format.md`, "The log"): pure encoding and
//! decoding, no I/O.
//!
//! ```text
//! offset 0, 512: header slots  magic "TTHRWAL1" | gen u64 | revision u64 | half u8 |
//!                              0 0 0 | crc32c u32
//! offset 4096:   records       magic u32 | kind u8 | tag u8 | slot u8 | more u8 | gen u64 | seq u64 |
//!                              block u64 | count u32 | crc32c u32      (40 bytes)
//!                              then for a write: count × side entry (crc32c u32 of the
//!                              block's data and tag, then `tag` bytes of the engine's
//!                              seal), then count × 4096 bytes of data; for a direct
//!                              write (kind 3, slot in byte 6) only the side entries:
//!                              the data went straight into that slot of the head layer
//! ```
//!
//! The record crc covers the header (crc field zeroed) and the side entries; each
//! block's data and tag are covered by its own crc so one block can be read and
//! verified alone.

/// Block size of every volume.
pub const BLOCK: usize = tether_proto::wire::BLOCK_SIZE as usize;
/// Where records start in the log file.
pub const RECORDS_START: u64 = 4096;
/// Size of a record header.
pub const RECORD_HEADER: usize = 40;
const HEADER_MAGIC: &[u8; 8] = b"TTHRWAL1";
const HEADER_SLOT: usize = 32;
const RECORD_MAGIC: u32 = 0x5752_4543;

/// The log's header: where replay starts (generation `gen` in half `half`, then
/// generation `gen + 1` in the other half), and the revision that the last checkpoint
/// made durable in the layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WalHeader {
    /// Records of other generations are stale leftovers.
    pub gen: u64,
    /// Highest write sequence already applied to the layers.
    pub revision: u64,
    /// Which half of the log holds generation `gen` (0 or 1).
    pub half: u8,
}

impl WalHeader {
    /// Encodes one header slot.
    pub fn encode(&self) -> [u8; HEADER_SLOT] {
        let mut b = [0u8; HEADER_SLOT];
        b[0..8].copy_from_slice(HEADER_MAGIC);
        b[8..16].copy_from_slice(&self.gen.to_le_bytes());
        b[16..24].copy_from_slice(&self.revision.to_le_bytes());
        b[24] = self.half;
        let crc = crc32c::crc32c(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a header slot; `None` if torn or never written.
    pub fn decode(b: &[u8]) -> Option<WalHeader> {
        let b = b.get(..HEADER_SLOT)?;
        if &b[0..8] != HEADER_MAGIC || crc32c::crc32c(&b[..28]) != le32(&b[28..32]) || b[24] > 1 {
            return None;
        }
        Some(WalHeader {
            gen: le64(&b[8..16]),
            revision: le64(&b[16..24]),
            half: b[24],
        })
    }

    /// Byte offset of the slot this header goes to (alternating, so a torn header
    /// write leaves the previous one intact).
    pub fn slot_offset(&self) -> u64 {
        if self.gen.is_multiple_of(2) {
            0
        } else {
            512
        }
    }
}

/// Where the two sync-mark slots are, between the header slots and the records.
pub const MARK_SLOTS: [u64; 2] = [1024, 1536];
const MARK_MAGIC: &[u8; 8] = b"TTHRSYN1";
const MARK_LEN: usize = 36;
/// Marks that also carry the crc of the log bytes they cover.
const MARK_MAGIC_2: &[u8; 8] = b"TTHRSYN2";
const MARK_LEN_2: usize = 40;

/// How far the head layer's slots are known durable: every direct record of generation
/// `gen` that starts before byte `off` of the log (and every one of an older
/// generation) had its data synced before this mark was written. Replay tells rot in a
/// synced slot from a direct write a power cut tore by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct SyncMark {
    /// Counts the marks written; the valid slot with the highest is current.
    pub seq: u64,
    /// The log generation the mark reaches into.
    pub gen: u64,
    /// The log offset it reaches (exclusive).
    pub off: u64,
    /// crc32c of the log's bytes from the start of `gen`'s half up to `off`: the mark
    /// counts only if they all reached the disk. It is written in the same unsynced
    /// batch as the records it covers, so a power cut may keep it and lose one of
    /// them; replay would then take a direct record that a lost later record had
    /// overwritten in place for rot (crash proptest). `None` in marks written before.
    pub content: Option<u32>,
}

impl SyncMark {
    /// Encodes one mark slot (always with the content crc).
    pub fn encode(&self) -> [u8; MARK_LEN_2] {
        let mut b = [0u8; MARK_LEN_2];
        b[0..8].copy_from_slice(MARK_MAGIC_2);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.gen.to_le_bytes());
        b[24..32].copy_from_slice(&self.off.to_le_bytes());
        b[32..36].copy_from_slice(&self.content.unwrap_or(0).to_le_bytes());
        let crc = crc32c::crc32c(&b[..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a mark slot; `None` if torn or never written (logs made before marks
    /// existed hold zeroes there).
    pub fn decode(b: &[u8]) -> Option<SyncMark> {
        if b.get(0..8) == Some(MARK_MAGIC_2.as_slice()) {
            let b = b.get(..MARK_LEN_2)?;
            if crc32c::crc32c(&b[..36]) != le32(&b[36..40]) {
                return None;
            }
            return Some(SyncMark {
                seq: le64(&b[8..16]),
                gen: le64(&b[16..24]),
                off: le64(&b[24..32]),
                content: Some(le32(&b[32..36])),
            });
        }
        let b = b.get(..MARK_LEN)?;
        if &b[0..8] != MARK_MAGIC || crc32c::crc32c(&b[..32]) != le32(&b[32..36]) {
            return None;
        }
        Some(SyncMark {
            seq: le64(&b[8..16]),
            gen: le64(&b[16..24]),
            off: le64(&b[24..32]),
            content: None,
        })
    }

    /// Byte offset of the slot this mark goes to (alternating, so a torn write leaves
    /// the previous mark).
    pub fn slot_offset(&self) -> u64 {
        MARK_SLOTS[(self.seq % 2) as usize]
    }

    /// Whether a record of generation `gen` at log offset `off` is covered.
    pub fn covers(&self, gen: u64, off: u64) -> bool {
        gen < self.gen || (gen == self.gen && off < self.off)
    }
}

/// What a record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// Whole blocks of data follow.
    Write,
    /// The blocks read as zeroes from now on.
    Zero,
    /// The data went straight into one slot of the head layer; the record holds only
    /// the blocks' checksums (and seals).
    Direct,
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Write or zero.
    pub kind: RecordKind,
    /// Generation of the log when written.
    pub gen: u64,
    /// Engine write sequence.
    pub seq: u64,
    /// First block.
    pub block: u64,
    /// Number of blocks.
    pub count: u32,
    /// Bytes of engine seal (encryption nonce and tag) per block; 0 if unencrypted.
    pub tag: u8,
    /// For a direct write: which slot of the head layer holds the data (0 or 1).
    pub slot: u8,
    /// More records of the same write follow this one: replay counts a write in the
    /// revision only once its last record is back.
    pub more: bool,
}

impl RecordHeader {
    /// Bytes of one block's side entry: its crc, then its tag.
    pub fn side_len(&self) -> usize {
        4 + self.tag as usize
    }

    /// Bytes of side entries after the header.
    pub fn sides_len(&self) -> usize {
        match self.kind {
            RecordKind::Write | RecordKind::Direct => self.count as usize * self.side_len(),
            RecordKind::Zero => 0,
        }
    }

    /// Bytes of data after the crcs.
    pub fn data_len(&self) -> usize {
        match self.kind {
            RecordKind::Write => self.count as usize * BLOCK,
            RecordKind::Zero | RecordKind::Direct => 0,
        }
    }

    /// Total length of the record on disk.
    pub fn total_len(&self) -> u64 {
        (RECORD_HEADER + self.sides_len() + self.data_len()) as u64
    }
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

pub use crate::store::record::block_crc;

/// Encodes a record's header and side entries (the data is written after them).
pub fn encode_record(h: &RecordHeader, sides: &[u8]) -> Vec<u8> {
    // Room for the data too: small writes append it to this buffer (one pwrite).
    let mut b = Vec::with_capacity(RECORD_HEADER + sides.len() + h.data_len().min(64 << 10));
    b.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    b.push(match h.kind {
        RecordKind::Write => 1,
        RecordKind::Zero => 2,
        RecordKind::Direct => 3,
    });
    b.extend_from_slice(&[h.tag, h.slot, u8::from(h.more)]);
    b.extend_from_slice(&h.gen.to_le_bytes());
    b.extend_from_slice(&h.seq.to_le_bytes());
    b.extend_from_slice(&h.block.to_le_bytes());
    b.extend_from_slice(&h.count.to_le_bytes());
    b.extend_from_slice(&[0, 0, 0, 0]);
    b.extend_from_slice(sides);
    let crc = crc32c::crc32c(&b);
    b[36..40].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a record header; `None` if it is not a record of generation `gen`.
pub fn decode_header(b: &[u8], gen: u64) -> Option<RecordHeader> {
    let b = b.get(..RECORD_HEADER)?;
    if le32(&b[0..4]) != RECORD_MAGIC {
        return None;
    }
    let kind = match b[4] {
        1 => RecordKind::Write,
        2 => RecordKind::Zero,
        3 => RecordKind::Direct,
        _ => return None,
    };
    if b[6] > 1 || (b[6] != 0 && kind != RecordKind::Direct) || b[7] > 1 {
        return None;
    }
    let h = RecordHeader {
        kind,
        gen: le64(&b[8..16]),
        seq: le64(&b[16..24]),
        block: le64(&b[24..32]),
        count: le32(&b[32..36]),
        tag: b[5],
        slot: b[6],
        more: b[7] == 1,
    };
    (h.gen == gen && h.count > 0).then_some(h)
}

/// Checks a record's crc over its header and side entries (`b` holds both).
pub fn verify_record(b: &[u8]) -> bool {
    if b.len() < RECORD_HEADER {
        return false;
    }
    let stored = le32(&b[36..40]);
    let mut h = crc32c::crc32c(&b[..36]);
    h = crc32c::crc32c_append(h, &[0, 0, 0, 0]);
    h = crc32c::crc32c_append(h, &b[RECORD_HEADER..]);
    h == stored
}

/// Splits side entries of `side_len` bytes into (crc, tag) per block.
pub fn sides(b: &[u8], side_len: usize) -> impl Iterator<Item = (u32, &[u8])> {
    b.chunks_exact(side_len.max(4))
        .map(|e| (le32(&e[..4]), &e[4..]))
}

/// Builds the side entries of `data` (whole blocks) and `tags` (`tag` bytes each).
pub fn make_sides(data: &[u8], tags: &[u8], tag: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / BLOCK * (4 + tag));
    for (i, d) in data.chunks_exact(BLOCK).enumerate() {
        let t = tags.get(i * tag..(i + 1) * tag).unwrap_or(&[]);
        out.extend_from_slice(&block_crc(d, t).to_le_bytes());
        out.extend_from_slice(t);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn record_roundtrip(seq: u64, block: u64, count in 1u32..64, kind in 0u8..4, gen: u64, sealed: bool, more: bool) {
            let (kind, slot) = match kind {
                0 => (RecordKind::Zero, 0),
                1 => (RecordKind::Write, 0),
                k => (RecordKind::Direct, k - 2),
            };
            let tag = if sealed { 32 } else { 0 };
            let h = RecordHeader { kind, gen, seq, block, count, tag, slot, more };
            let side: Vec<u8> = (0..h.sides_len()).map(|i| i as u8).collect();
            let b = encode_record(&h, &side);
            prop_assert_eq!(decode_header(&b, gen), Some(h));
            prop_assert!(verify_record(&b));
            prop_assert_eq!(&b[RECORD_HEADER..], &side[..]);
            prop_assert_eq!(sides(&b[RECORD_HEADER..], h.side_len()).count(), side.len() / h.side_len());
            prop_assert_eq!(decode_header(&b, gen.wrapping_add(1)), None);
        }

        #[test]
        fn any_flipped_bit_is_caught(seq: u64, count in 1u32..8, bit in 0usize..(40 + 8) * 8) {
            let h = RecordHeader { kind: RecordKind::Write, gen: 3, seq, block: 9, count, tag: 0, slot: 0, more: false };
            let side: Vec<u8> = (0..count * 4).map(|i| i as u8).collect();
            let mut b = encode_record(&h, &side);
            let bit = bit % (b.len() * 8);
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode_header(&b, 3).is_none() || !verify_record(&b));
        }

        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = decode_header(&b, 0);
            let _ = verify_record(&b);
            let _ = WalHeader::decode(&b);
            let _ = SyncMark::decode(&b);
        }
    }

    #[test]
    fn mark_roundtrip_and_torn_slot() {
        let m = SyncMark {
            seq: 3,
            gen: 7,
            off: 8192,
            content: Some(0xdead_beef),
        };
        let mut b = m.encode();
        assert_eq!(SyncMark::decode(&b), Some(m));
        assert_eq!(m.slot_offset(), MARK_SLOTS[1]);
        assert!(m.covers(6, 1 << 30) && m.covers(7, 8191));
        assert!(!m.covers(7, 8192) && !m.covers(8, 4096));
        b[20] ^= 1;
        assert_eq!(SyncMark::decode(&b), None);
        assert_eq!(SyncMark::decode(&[0u8; 64]), None);
    }

    #[test]
    fn header_roundtrip_and_torn_slot() {
        let h = WalHeader {
            gen: 5,
            revision: 77,
            half: 1,
        };
        let mut b = h.encode();
        assert_eq!(WalHeader::decode(&b), Some(h));
        b[9] ^= 1;
        assert_eq!(WalHeader::decode(&b), None);
    }
}
