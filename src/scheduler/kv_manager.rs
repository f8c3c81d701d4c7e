//! A sequence's KV blocks, with block math in one place (vLLM v1's KV cache manager): the leading
//! blocks the prefix cache already holds (`get_computed_blocks`), the blocks a chunk of new tokens
//! needs and their allocation (`allocate_slots`, or `None` when the pool cannot give them), the
//! registration of computed blocks in the prefix cache, and freeing.

use super::block_pool::BlockPool;
use super::sequence::Sequence;

pub struct KvManager {
    pool: BlockPool,
}

impl KvManager {
    pub fn new(pool: BlockPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Blocks that hold `tokens` tokens.
    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.pool.block_size())
    }

    /// Takes the longest run of leading blocks found in the prefix cache for a sequence that holds
    /// none yet, leaving at least its last token to compute (its logits are needed). Returns the
    /// number of tokens they cover.
    pub fn get_computed_blocks(&self, seq: &mut Sequence) -> usize {
        if seq.computes_whole_prompt {
            return 0;
        }
        let bs = self.pool.block_size();
        let max_blocks = seq.len().saturating_sub(1) / bs;
        let mut parent = None;
        while seq.blocks.len() < max_blocks {
            let key = seq.block_key(seq.blocks.len(), bs, parent);
            let hash = key.hash();
            match self.pool.lookup(&key, hash) {
                Some(block) => {
                    seq.blocks.push(block);
                    seq.block_hashes.push(hash);
                    parent = Some(hash);
                }
                None => break,
            }
        }
        seq.blocks.len() * bs
    }

    /// Blocks the sequence still lacks to hold `num_new` tokens after its computed ones.
    pub fn slots_needed(&self, seq: &Sequence, num_new: usize) -> usize {
        self.blocks_for(seq.num_computed_tokens + num_new)
            .saturating_sub(seq.blocks.len())
    }

    pub fn can_allocate_slots(&self, seq: &Sequence, num_new: usize) -> bool {
        self.pool.can_allocate(self.slots_needed(seq, num_new))
    }

    /// Gives the sequence the blocks for `num_new` more tokens; `None` (and nothing taken) when the
    /// pool cannot.
    pub fn allocate_slots(&self, seq: &mut Sequence, num_new: usize) -> Option<()> {
        let blocks = self.pool.allocate(self.slots_needed(seq, num_new))?;
        seq.blocks.extend(blocks);
        Some(())
    }

    /// Registers every full, computed block of the sequence not yet in the prefix cache.
    pub fn cache_computed_blocks(&self, seq: &mut Sequence) {
        let bs = self.pool.block_size();
        let full = (seq.num_computed_tokens / bs).min(seq.blocks.len());
        while seq.block_hashes.len() < full {
            let index = seq.block_hashes.len();
            let key = seq.block_key(index, bs, seq.block_hashes.last().copied());
            let hash = key.hash();
            self.pool.register(&seq.blocks[index], key, hash);
            seq.block_hashes.push(hash);
        }
    }

    /// Gives back every block of the sequence and forgets its computed state: it will be recomputed.
    pub fn free(&self, seq: &mut Sequence) {
        seq.blocks.clear();
        seq.block_hashes.clear();
        seq.num_computed_tokens = 0;
        seq.images_scheduled.iter_mut().for_each(|s| *s = false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cover_the_computed_and_new_tokens_in_whole_blocks() {
        let kv = KvManager::new(BlockPool::new(8, 4));
        let mut seq = Sequence::new(1, (0..9).collect(), Vec::new());
        // 9 tokens need 3 blocks of 4; nothing is cached yet.
        assert_eq!(kv.slots_needed(&seq, 9), 3);
        kv.allocate_slots(&mut seq, 5).unwrap();
        assert_eq!(seq.num_blocks(), 2);
        seq.num_computed_tokens = 5;
        // 5 computed + 4 new = 9 tokens: one more block.
        assert_eq!(kv.slots_needed(&seq, 4), 1);
        assert!(kv.allocate_slots(&mut seq, 4).is_some());
        assert_eq!(kv.pool().num_free(), 5);
        // More than the pool has: nothing is taken.
        assert!(kv.allocate_slots(&mut seq, 100).is_none());
        assert_eq!(seq.num_blocks(), 3);
        kv.free(&mut seq);
        assert_eq!((seq.num_blocks(), seq.num_computed_tokens), (0, 0));
        assert_eq!(kv.pool().num_free(), 8);
    }
}
