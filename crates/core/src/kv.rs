//! Batches of sequences and the paged KV cache.
//!
//! A forward pass takes the new tokens of several sequences flattened to `[T, hidden]`. Each
//! sequence's keys and values live in fixed-size blocks of a per-layer pool; a block table maps a
//! sequence's position `p` to slot `table[p / block_size] * block_size + p % block_size`.
use std::ops::Range;

use crate::{Backend, Error, Result, Shape};

/// The new tokens of one sequence in a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqChunk {
    /// Tokens of this sequence already in the KV cache (the position of the first new token).
    pub start_pos: usize,
    /// New tokens of this sequence in the batch (at least one).
    pub len: usize,
    /// The cache blocks holding this sequence, enough for `start_pos + len` positions.
    pub block_table: Vec<u32>,
}

/// Where every token of a flattened batch sits: its id, sequence, position and cache slot; and,
/// after sampling, the ids sampled for each sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchInfo {
    block_size: usize,
    seqs: Vec<SeqChunk>,
    row_starts: Vec<usize>,
    positions: Vec<u32>,
    slots: Vec<u32>,
    token_seq: Vec<u32>,
    token_ids: Vec<u32>,
    capacity: usize,
    sampled: Vec<u32>,
}

impl BatchInfo {
    /// A batch of sequence chunks, rows in the order given.
    ///
    /// # Errors
    /// An empty batch, an empty chunk, a zero block size, or a block table too short for its chunk.
    pub fn new(block_size: usize, seqs: Vec<SeqChunk>) -> Result<Self> {
        const OP: &str = "BatchInfo::new";
        if block_size == 0 {
            return Err(Error::invalid(OP, "block size 0"));
        }
        if seqs.is_empty() {
            return Err(Error::invalid(OP, "empty batch"));
        }
        let (mut positions, mut slots, mut token_seq, mut row_starts) =
            (Vec::new(), Vec::new(), Vec::new(), vec![0]);
        for (s, seq) in seqs.iter().enumerate() {
            if seq.len == 0 {
                return Err(Error::invalid(
                    OP,
                    format!("sequence {s} has no new tokens"),
                ));
            }
            let end = seq.start_pos + seq.len;
            let need = end.div_ceil(block_size);
            if seq.block_table.len() < need {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "sequence {s}: {end} positions need {need} blocks, table has {}",
                        seq.block_table.len()
                    ),
                ));
            }
            for p in seq.start_pos..end {
                positions.push(to_u32(p)?);
                let slot = seq.block_table[p / block_size] as usize * block_size + p % block_size;
                slots.push(to_u32(slot)?);
                token_seq.push(to_u32(s)?);
            }
            row_starts.push(positions.len());
        }
        let token_ids = vec![0; positions.len()];
        let capacity = seqs.iter().map(|s| s.start_pos + s.len).max().unwrap_or(0);
        Ok(BatchInfo {
            block_size,
            seqs,
            row_starts,
            positions,
            slots,
            token_seq,
            token_ids,
            capacity,
            sampled: Vec::new(),
        })
    }

    /// The same batch carrying the ids of its tokens (`[T]`, in batch order).
    ///
    /// # Errors
    /// A count other than [`BatchInfo::num_tokens`].
    pub fn with_token_ids(mut self, ids: Vec<u32>) -> Result<Self> {
        if ids.len() != self.positions.len() {
            return Err(Error::invalid(
                "BatchInfo::with_token_ids",
                format!(
                    "{} ids for a batch of {} tokens",
                    ids.len(),
                    self.positions.len()
                ),
            ));
        }
        self.token_ids = ids;
        Ok(self)
    }

    /// The same batch, declared reusable for later steps whose sequences grow up to `positions`:
    /// device backends size position-dependent buffers and launch shapes for it, so a captured
    /// decode step can be replayed as the context grows.
    pub fn with_capacity(mut self, positions: usize) -> Self {
        self.capacity = self.capacity.max(positions);
        self
    }

    /// Ids of the batch's tokens, `[T]`.
    pub fn token_ids(&self) -> &[u32] {
        &self.token_ids
    }

    /// The longest context this batch's buffers are meant for (at least [`BatchInfo::max_context`]).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Ids sampled from the last forward pass over this batch (one per logits row).
    pub fn sampled(&self) -> &[u32] {
        &self.sampled
    }

    /// Records sampled ids.
    pub fn set_sampled(&mut self, ids: Vec<u32>) {
        self.sampled = ids;
    }

    /// Tokens in the batch (`T`).
    pub fn num_tokens(&self) -> usize {
        self.positions.len()
    }

    /// Every sequence brings one new token: a decode step, where a token's attention needs no
    /// key written by another token of the same batch.
    pub fn is_decode_step(&self) -> bool {
        self.seqs.iter().all(|s| s.len == 1)
    }

    /// Cache positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The sequence chunks.
    pub fn seqs(&self) -> &[SeqChunk] {
        &self.seqs
    }

    /// Rows of the batch that belong to sequence `s`.
    pub fn rows(&self, s: usize) -> Range<usize> {
        self.row_starts[s]..self.row_starts[s + 1]
    }

    /// Position of every token in its sequence, `[T]`.
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// Cache slot every token's key and value are written to, `[T]`.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// An error naming the first token whose cache slot lies outside a pool of `slots` slots.
    pub fn check_slots_within(&self, slots: usize, op: &'static str) -> Result<()> {
        match self.slots.iter().find(|&&s| s as usize >= slots) {
            Some(bad) => Err(Error::invalid(op, format!("slot {bad} beyond {slots}"))),
            None => Ok(()),
        }
    }

    /// An error naming the first block of any table that lies outside a pool of `slots` slots.
    pub fn check_blocks_within(&self, slots: usize, op: &'static str) -> Result<()> {
        let bs = self.block_size;
        let bad = self
            .seqs
            .iter()
            .flat_map(|s| &s.block_table)
            .find(|&&b| (b as usize + 1) * bs > slots);
        match bad {
            Some(b) => Err(Error::invalid(
                op,
                format!("block {b} beyond the cache's {} blocks", slots / bs.max(1)),
            )),
            None => Ok(()),
        }
    }

    /// The sequence index of every token, `[T]`.
    pub fn token_seq(&self) -> &[u32] {
        &self.token_seq
    }

    /// The cache slot of position `pos` of sequence `s`.
    pub fn slot(&self, s: usize, pos: usize) -> usize {
        self.seqs[s].block_table[pos / self.block_size] as usize * self.block_size
            + pos % self.block_size
    }

    /// The longest block table.
    pub fn max_table_len(&self) -> usize {
        self.seqs
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(0)
    }

    /// Block tables flattened to `[seqs, width]`, each zero-padded to `width`: the layout device
    /// kernels index. A `width` below [`BatchInfo::max_table_len`] is raised to it.
    pub fn padded_block_tables(&self, width: usize) -> Vec<u32> {
        let width = width.max(self.max_table_len());
        let mut tables = vec![0u32; self.seqs.len() * width];
        for (s, seq) in self.seqs.iter().enumerate() {
            tables[s * width..s * width + seq.block_table.len()].copy_from_slice(&seq.block_table);
        }
        tables
    }

    /// The last row of every sequence: the rows whose logits decoding needs.
    pub fn last_rows(&self) -> Vec<u32> {
        self.row_starts[1..]
            .iter()
            .map(|&r| (r - 1) as u32)
            .collect()
    }

    /// The longest context any sequence attends to after this batch.
    pub fn max_context(&self) -> usize {
        self.seqs
            .iter()
            .map(|s| s.start_pos + s.len)
            .max()
            .unwrap_or(0)
    }
}

impl AsRef<BatchInfo> for BatchInfo {
    fn as_ref(&self) -> &BatchInfo {
        self
    }
}

impl AsMut<BatchInfo> for BatchInfo {
    fn as_mut(&mut self) -> &mut BatchInfo {
        self
    }
}

fn to_u32(x: usize) -> Result<u32> {
    u32::try_from(x).map_err(|_| Error::invalid("BatchInfo::new", format!("{x} exceeds u32")))
}

/// Hands out cache blocks and takes them back.
#[derive(Clone, Debug)]
pub struct BlockAllocator {
    block_size: usize,
    free: Vec<u32>,
}

impl BlockAllocator {
    /// An allocator over blocks `0..num_blocks`.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        let free = (0..num_blocks as u32).rev().collect();
        BlockAllocator { block_size, free }
    }

    /// Blocks not handed out.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Grows `table` until it holds `positions` positions.
    ///
    /// # Errors
    /// [`Error::CacheFull`] if too few blocks are free; `table` is then unchanged.
    pub fn reserve(&mut self, table: &mut Vec<u32>, positions: usize) -> Result<()> {
        let need = positions
            .div_ceil(self.block_size)
            .saturating_sub(table.len());
        if need > self.free.len() {
            return Err(Error::CacheFull {
                needed: need,
                free: self.free.len(),
            });
        }
        let at = self.free.len() - need;
        table.extend(self.free.drain(at..).rev());
        Ok(())
    }

    /// Returns a sequence's blocks.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.extend(table.drain(..).rev());
    }
}

/// One layer's key and value block pools, each `[num_blocks, block_size, kv_heads, head_dim]`,
/// as tensors of type `T` (a backend's `Tensor`).
#[derive(Clone, Debug)]
pub struct LayerKv<T> {
    /// Keys (after q/k-norm and RoPE).
    pub k: T,
    /// Values.
    pub v: T,
}

/// The paged KV cache of every layer, with the allocator of its blocks.
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    layers: Vec<LayerKv<B::Tensor>>,
    allocator: BlockAllocator,
    block_size: usize,
}

impl<B: Backend> KvCache<B> {
    /// Allocates `num_blocks` blocks of `block_size` positions for each of `num_layers` layers,
    /// in the backend's KV dtype.
    pub fn new(
        b: &B,
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 {
            return Err(Error::invalid(
                "KvCache::new",
                "block size and block count must be positive",
            ));
        }
        let shape = Shape::new([num_blocks, block_size, kv_heads, head_dim]);
        let layers = (0..num_layers)
            .map(|_| {
                Ok(LayerKv {
                    k: b.zeros(&shape, b.kv_dtype())?,
                    v: b.zeros(&shape, b.kv_dtype())?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            allocator: BlockAllocator::new(num_blocks, block_size),
            block_size,
        })
    }

    /// Cache positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Layer `i`'s pools.
    pub fn layer(&self, i: usize) -> &LayerKv<B::Tensor> {
        &self.layers[i]
    }

    /// Layer `i`'s pools, writable.
    pub fn layer_mut(&mut self, i: usize) -> &mut LayerKv<B::Tensor> {
        &mut self.layers[i]
    }

    /// The block allocator.
    pub fn allocator(&mut self) -> &mut BlockAllocator {
        &mut self.allocator
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_block_tables() {
        let b = BatchInfo::new(
            4,
            vec![
                SeqChunk {
                    start_pos: 0,
                    len: 3,
                    block_table: vec![7],
                },
                SeqChunk {
                    start_pos: 6,
                    len: 1,
                    block_table: vec![2, 5],
                },
            ],
        )
        .unwrap();
        assert_eq!(b.positions(), &[0, 1, 2, 6]);
        assert_eq!(b.slots(), &[28, 29, 30, 22]);
        assert_eq!(b.token_seq(), &[0, 0, 0, 1]);
        assert_eq!(b.last_rows(), vec![2, 3]);
        assert_eq!(b.rows(1), 3..4);
        assert_eq!(b.slot(1, 1), 9);
    }

    #[test]
    fn short_block_table_is_rejected() {
        let err = BatchInfo::new(
            4,
            vec![SeqChunk {
                start_pos: 3,
                len: 2,
                block_table: vec![0],
            }],
        )
        .unwrap_err();
        assert!(err.to_string().contains("need 2 blocks"), "{err}");
    }

    #[test]
    fn allocator_reserves_and_releases() {
        let mut a = BlockAllocator::new(3, 2);
        let mut t = Vec::new();
        a.reserve(&mut t, 3).unwrap();
        assert_eq!(t.len(), 2);
        assert!(matches!(
            a.reserve(&mut t, 7),
            Err(Error::CacheFull { needed: 2, free: 1 })
        ));
        assert_eq!(t.len(), 2);
        a.release(&mut t);
        assert_eq!(a.num_free(), 3);
    }
}
