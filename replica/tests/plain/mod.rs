//! Whole blocks without seals, for tests of unencrypted volumes: the store itself
//! has one write and one read, both with seals.

use bytes::Bytes;
use tether_replica::{StoreError, Volume};

/// Writes and reads of unencrypted blocks.
pub trait Plain {
    /// Writes whole blocks at `block` as write sequence `seq`.
    fn write_blocks(&self, seq: u64, block: u64, data: &[u8]) -> Result<(), StoreError>;
    /// Reads `count` whole blocks of the head at `block`.
    fn read_blocks(&self, block: u64, count: u32) -> Result<Bytes, StoreError>;
}

impl Plain for Volume {
    fn write_blocks(&self, seq: u64, block: u64, data: &[u8]) -> Result<(), StoreError> {
        self.write_sealed(seq, block, data, &[])
    }

    fn read_blocks(&self, block: u64, count: u32) -> Result<Bytes, StoreError> {
        Ok(self.read(None, block, count)?.0)
    }
}
