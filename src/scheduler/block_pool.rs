//! The paged KV block pool: fixed-size blocks handed out as owned `KvBlock`s whose `Drop` returns them,
//! so no path (finish, abort, preemption) can leak one. Full blocks carry a prefix hash; freed hashed
//! blocks stay findable (and evictable, least recently freed first) until their slot is reused.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;

/// Identity of a full block's contents: its parent's hash, its token ids and the content hashes of the
/// images whose placeholders lie in it. Compared in full on a hit, never trusted by hash alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub parent: Option<u64>,
    /// The sequence's cache salt, in the first block's key only.
    pub salt: Option<[u8; 32]>,
    pub token_ids: Vec<u32>,
    pub image_hashes: Vec<[u8; 32]>,
}

impl BlockKey {
    /// The chained hash that names this block (deterministic across runs: fixed-key SipHash).
    pub fn hash(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        #[allow(deprecated)]
        // SipHasher's fixed keys are the point: stable hashes across processes.
        let mut h = std::hash::SipHasher::new();
        Hash::hash(self, &mut h);
        h.finish()
    }
}

#[derive(Debug, Default)]
struct BlockMeta {
    ref_count: u32,
    /// Set while the block is registered in the prefix cache.
    key: Option<(u64, BlockKey)>,
    /// Position in the free queue while `ref_count == 0`.
    free_stamp: Option<u64>,
}

#[derive(Debug)]
struct PoolState {
    blocks: Vec<BlockMeta>,
    /// Free blocks ordered by when they were freed (oldest first): the eviction order.
    free_queue: BTreeSet<(u64, u32)>,
    next_stamp: u64,
    cached: HashMap<u64, u32>,
}

impl PoolState {
    fn push_free(&mut self, id: u32) {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.blocks[id as usize].free_stamp = Some(stamp);
        self.free_queue.insert((stamp, id));
    }

    fn take_from_free(&mut self, id: u32) {
        if let Some(stamp) = self.blocks[id as usize].free_stamp.take() {
            self.free_queue.remove(&(stamp, id));
        }
    }

    fn release(&mut self, id: u32) {
        let meta = &mut self.blocks[id as usize];
        meta.ref_count -= 1;
        if meta.ref_count == 0 {
            self.push_free(id);
        }
    }
}

/// The shared pool; cheap to clone (one pool per engine, used from the engine thread only).
#[derive(Debug, Clone)]
pub struct BlockPool {
    state: Rc<RefCell<PoolState>>,
    block_size: usize,
}

/// One owned reference to a block. Cloning adds a reference; dropping the last one frees the block.
#[derive(Debug)]
pub struct KvBlock {
    id: u32,
    pool: Rc<RefCell<PoolState>>,
}

impl KvBlock {
    pub fn id(&self) -> u32 {
        self.id
    }
}

impl Clone for KvBlock {
    fn clone(&self) -> Self {
        self.pool.borrow_mut().blocks[self.id as usize].ref_count += 1;
        Self {
            id: self.id,
            pool: self.pool.clone(),
        }
    }
}

impl Drop for KvBlock {
    fn drop(&mut self) {
        self.pool.borrow_mut().release(self.id);
    }
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        let mut state = PoolState {
            blocks: (0..num_blocks).map(|_| BlockMeta::default()).collect(),
            free_queue: BTreeSet::new(),
            next_stamp: 0,
            cached: HashMap::new(),
        };
        for id in 0..num_blocks as u32 {
            state.push_free(id);
        }
        Self {
            state: Rc::new(RefCell::new(state)),
            block_size,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.state.borrow().blocks.len()
    }

    /// Blocks not referenced by any sequence (cached-but-unused blocks count as free).
    pub fn num_free(&self) -> usize {
        self.state.borrow().free_queue.len()
    }

    pub fn can_allocate(&self, n: usize) -> bool {
        self.num_free() >= n
    }

    /// `n` fresh blocks, or `None` (and nothing taken) when fewer are free. Evicts the oldest freed
    /// blocks from the prefix cache as it reuses them.
    pub fn allocate(&self, n: usize) -> Option<Vec<KvBlock>> {
        let mut st = self.state.borrow_mut();
        if st.free_queue.len() < n {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let (_, id) = st.free_queue.pop_first().expect("counted above");
            let meta = &mut st.blocks[id as usize];
            meta.free_stamp = None;
            meta.ref_count = 1;
            if let Some((hash, _)) = meta.key.take() {
                st.cached.remove(&hash);
            }
            out.push(KvBlock {
                id,
                pool: self.state.clone(),
            });
        }
        Some(out)
    }

    /// A cached block whose key equals `key` exactly, with a new reference taken on it.
    pub fn lookup(&self, key: &BlockKey, hash: u64) -> Option<KvBlock> {
        let mut st = self.state.borrow_mut();
        let id = *st.cached.get(&hash)?;
        match &st.blocks[id as usize].key {
            Some((_, k)) if k == key => {}
            _ => return None,
        }
        st.take_from_free(id);
        st.blocks[id as usize].ref_count += 1;
        Some(KvBlock {
            id,
            pool: self.state.clone(),
        })
    }

    /// Registers a full block's contents so later prompts can reuse it. A block already registered
    /// under another key, or a hash already naming another block, is left as it is.
    pub fn register(&self, block: &KvBlock, key: BlockKey, hash: u64) {
        let mut st = self.state.borrow_mut();
        if st.blocks[block.id as usize].key.is_some() || st.cached.contains_key(&hash) {
            return;
        }
        st.cached.insert(hash, block.id);
        st.blocks[block.id as usize].key = Some((hash, key));
    }

    pub fn num_cached_blocks(&self) -> usize {
        self.state.borrow().cached.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tokens: &[u32]) -> BlockKey {
        BlockKey {
            parent: None,
            salt: None,
            token_ids: tokens.to_vec(),
            image_hashes: vec![],
        }
    }

    #[test]
    fn dropping_blocks_returns_them() {
        let pool = BlockPool::new(4, 16);
        let a = pool.allocate(3).unwrap();
        assert_eq!(pool.num_free(), 1);
        assert!(pool.allocate(2).is_none());
        assert_eq!(pool.num_free(), 1, "a failed allocation takes nothing");
        let shared = a[0].clone();
        drop(a);
        assert_eq!(pool.num_free(), 3, "the shared block is still referenced");
        drop(shared);
        assert_eq!(pool.num_free(), 4);
    }

    #[test]
    fn freed_cached_block_is_found_until_reused() {
        let pool = BlockPool::new(2, 2);
        let blocks = pool.allocate(1).unwrap();
        let k = key(&[5, 6]);
        pool.register(&blocks[0], k.clone(), k.hash());
        let id = blocks[0].id();
        drop(blocks);
        let hit = pool.lookup(&k, k.hash()).expect("still cached after free");
        assert_eq!(hit.id(), id);
        assert_eq!(
            pool.num_free(),
            1,
            "a hit takes the block out of the free queue"
        );
        drop(hit);
        // Reusing both blocks evicts the cached one.
        let _all = pool.allocate(2).unwrap();
        assert!(pool.lookup(&k, k.hash()).is_none());
        assert_eq!(pool.num_cached_blocks(), 0);
    }

    #[test]
    fn a_hash_collision_is_not_a_hit() {
        let pool = BlockPool::new(2, 2);
        let blocks = pool.allocate(1).unwrap();
        pool.register(&blocks[0], key(&[1, 2]), 42);
        assert!(pool.lookup(&key(&[3, 4]), 42).is_none());
        assert!(pool.lookup(&key(&[1, 2]), 42).is_some());
    }

    #[test]
    fn eviction_takes_the_least_recently_freed_block_first() {
        let pool = BlockPool::new(3, 1);
        let mut blocks = pool.allocate(3).unwrap();
        for (i, b) in blocks.iter().enumerate() {
            let k = key(&[i as u32]);
            pool.register(b, k.clone(), k.hash());
        }
        // Free block 2, then 0, then 1: the next allocation must evict 2 first.
        let b1 = blocks.remove(1);
        let b0 = blocks.remove(0);
        let b2 = blocks.remove(0);
        drop(b2);
        drop(b0);
        drop(b1);
        let got = pool.allocate(1).unwrap();
        assert_eq!(got[0].id(), 2);
        assert!(pool.lookup(&key(&[0]), key(&[0]).hash()).is_some());
    }
}
