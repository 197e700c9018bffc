//! Block records (`docs/format.md`, "Block records"): one fixed-size entry per block
//! in a layer's `.rec` file saying where the block is and what its checksum is. The
//! only place that knows their bytes.

use std::io;

use crate::disk::DiskFile;
use crate::extents::ExtentMap;

/// Where a layer keeps a block, as its record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// An all-zero entry: the layer does not have the block.
    Absent,
    /// Data in slot 0 (`.data`).
    Data,
    /// The block reads as zeroes and hides older layers.
    Zero,
    /// Data in slot 1 (`.alt`).
    Alt,
    /// A state this version does not know: the block fails its checksum.
    Unknown,
}

impl State {
    fn byte(self) -> u8 {
        match self {
            State::Absent | State::Unknown => 0,
            State::Data => 1,
            State::Zero => 2,
            State::Alt => 3,
        }
    }

    fn of(b: u8) -> State {
        match b {
            1 => State::Data,
            2 => State::Zero,
            3 => State::Alt,
            _ => State::Unknown,
        }
    }

    /// The slot holding the block's data (0 unless `Alt`).
    pub(super) fn slot(self) -> u8 {
        u8::from(self == State::Alt)
    }

    /// The state of data in `slot`.
    pub(super) fn data_in(slot: u8) -> State {
        if slot == 1 {
            State::Alt
        } else {
            State::Data
        }
    }
}

/// One decoded block record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BlockRecord<'a> {
    /// crc32c of the block's data, then its seal.
    pub(super) crc: u32,
    pub(super) state: State,
    /// The engine's seal (empty on unencrypted volumes).
    pub(super) seal: &'a [u8],
}

impl<'a> BlockRecord<'a> {
    /// Decodes an entry of `len(seal)`-byte seals; `entry` is one whole entry.
    pub(super) fn decode(entry: &'a [u8], seal: usize) -> BlockRecord<'a> {
        if entry.iter().all(|&b| b == 0) {
            return BlockRecord {
                crc: 0,
                state: State::Absent,
                seal: &[],
            };
        }
        let crc = entry
            .get(..4)
            .map_or(0, |c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        BlockRecord {
            crc,
            state: State::of(entry.get(4).copied().unwrap_or(0)),
            seal: entry.get(8..8 + seal).unwrap_or(&[]),
        }
    }

    /// Whether `block` (its data) matches this record.
    pub(super) fn verifies(&self, block: &[u8]) -> bool {
        block_crc(block, self.seal) == self.crc
    }

    /// Appends this record as an entry of `len` bytes to `out`.
    pub(super) fn encode_into(&self, out: &mut Vec<u8>, len: usize) {
        let at = out.len();
        out.resize(at + len, 0);
        out[at..at + 4].copy_from_slice(&self.crc.to_le_bytes());
        out[at + 4] = self.state.byte();
        let t = self.seal.len().min(len - 8);
        out[at + 8..at + 8 + t].copy_from_slice(&self.seal[..t]);
    }
}

/// The record of a zeroed block.
pub(super) const ZERO: BlockRecord<'static> = BlockRecord {
    crc: 0,
    state: State::Zero,
    seal: &[],
};

/// The checksum of one block: crc32c of its data, then its seal (the same in block
/// records and in the log's side entries).
pub fn block_crc(data: &[u8], seal: &[u8]) -> u32 {
    crc32c::crc32c_append(crc_fast::crc32_iscsi(data), seal)
}

/// Size of a block record: 8 bytes, or 64 with a seal (a power of two, so no entry
/// straddles a 512-byte sector and a torn write cannot tear one).
pub(super) fn entry_len(seal: usize) -> usize {
    if seal == 0 {
        8
    } else {
        (8 + seal).next_power_of_two()
    }
}

/// Builds a layer's present-block map from its record file.
pub(super) fn scan(rec: &dyn DiskFile, blocks: u64, entry: usize) -> io::Result<ExtentMap<()>> {
    let mut present = ExtentMap::new();
    let len = rec.len()?.min(blocks * entry as u64);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    let mut run: Option<u64> = None;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        rec.read_at(&mut buf[..n], off)?;
        for (i, e) in buf[..n].chunks_exact(entry).enumerate() {
            let b = off / entry as u64 + i as u64;
            // Anything but an all-zero entry counts as present, so a damaged entry
            // fails its checksum instead of silently showing an older layer.
            let here = BlockRecord::decode(e, 0).state != State::Absent;
            match (here, run) {
                (true, None) => run = Some(b),
                (false, Some(s)) => {
                    present.insert(s, b, ());
                    run = None;
                }
                _ => {}
            }
        }
        off += n as u64;
    }
    if let Some(s) = run {
        present.insert(s, len / entry as u64, ());
    }
    Ok(present)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checksums already on disk were made with the crc32c crate: the faster one must
    /// agree with it on every block, or every stored block would read as rot.
    #[test]
    fn block_checksums_match_the_reference_crc32c() {
        let mut block = vec![0u8; 4096];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..64 {
            for b in block.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let seal: Vec<u8> = block[..32].to_vec();
            for seal in [&[][..], &seal[..]] {
                let want = crc32c::crc32c_append(crc32c::crc32c(&block), seal);
                assert_eq!(block_crc(&block, seal), want, "round {round}");
            }
        }
        assert_eq!(block_crc(&[0u8; 4096], &[]), crc32c::crc32c(&[0u8; 4096]));
    }

    #[test]
    fn records_round_trip_and_unknown_states_fail() {
        for seal in [0usize, 32] {
            let len = entry_len(seal);
            let tag = vec![7u8; seal];
            let mut out = Vec::new();
            for state in [State::Data, State::Zero, State::Alt] {
                let r = BlockRecord {
                    crc: 0xdead_beef,
                    state,
                    seal: &tag,
                };
                r.encode_into(&mut out, len);
                assert_eq!(BlockRecord::decode(&out[out.len() - len..], seal), r);
            }
            assert_eq!(out.len(), 3 * len);
            let mut bad = out[..len].to_vec();
            bad[4] = 9;
            assert_eq!(BlockRecord::decode(&bad, seal).state, State::Unknown);
            assert_eq!(
                BlockRecord::decode(&vec![0; len], seal).state,
                State::Absent
            );
        }
    }
}
