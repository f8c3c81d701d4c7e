//! A sequence as the scheduler sees it: token ids (prompt, then generated), how many of them have K/V
//! in the cache (`num_computed_tokens`), the blocks that hold them, and where its images' placeholders lie.

use super::block_pool::{BlockKey, KvBlock};

pub type SeqId = u64;

/// An image's placeholder run in the token ids, and its content hash (for caches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqImage {
    pub start: usize,
    pub len: usize,
    pub content_hash: [u8; 32],
}

impl SeqImage {
    pub fn overlaps(&self, start: usize, end: usize) -> bool {
        self.start < end && start < self.start + self.len
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqStatus {
    Waiting,
    Running,
}

#[derive(Debug)]
pub struct Sequence {
    pub id: SeqId,
    pub token_ids: Vec<u32>,
    pub num_prompt_tokens: usize,
    pub num_computed_tokens: usize,
    pub images: Vec<SeqImage>,
    pub status: SeqStatus,
    pub num_preemptions: usize,
    /// Prompt tokens found in the prefix cache when this sequence was (last) admitted.
    pub num_cached_prompt_tokens: usize,
    /// A sibling (`n > 1`) waits until this sequence's prompt is computed, then reuses its blocks.
    pub wait_for: Option<SeqId>,
    /// Hashed into the first block's key, so sequences with different salts never share cached
    /// blocks (vLLM's `cache_salt`): one tenant cannot learn from `cached_tokens` what another sent.
    pub cache_salt: Option<[u8; 32]>,
    /// Every prompt position is computed (its logits are wanted): no prefix-cache hit is taken.
    pub computes_whole_prompt: bool,
    pub(super) blocks: Vec<KvBlock>,
    /// Chained hashes of the leading full blocks that are registered in the prefix cache.
    pub(super) block_hashes: Vec<u64>,
    /// Which images have been handed to the encoder since admission.
    pub(super) images_scheduled: Vec<bool>,
}

impl Sequence {
    pub fn new(id: SeqId, prompt: Vec<u32>, images: Vec<SeqImage>) -> Self {
        let n = images.len();
        Self {
            id,
            num_prompt_tokens: prompt.len(),
            token_ids: prompt,
            num_computed_tokens: 0,
            images,
            status: SeqStatus::Waiting,
            num_preemptions: 0,
            num_cached_prompt_tokens: 0,
            wait_for: None,
            cache_salt: None,
            computes_whole_prompt: false,
            blocks: Vec::new(),
            block_hashes: Vec::new(),
            images_scheduled: vec![false; n],
        }
    }

    pub fn len(&self) -> usize {
        self.token_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.token_ids.is_empty()
    }

    pub fn num_output_tokens(&self) -> usize {
        self.token_ids.len() - self.num_prompt_tokens
    }

    pub fn block_ids(&self) -> Vec<u32> {
        self.blocks.iter().map(KvBlock::id).collect()
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The key of full block `index` (its tokens must be known), chained onto block `index − 1`.
    pub(super) fn block_key(
        &self,
        index: usize,
        block_size: usize,
        parent: Option<u64>,
    ) -> BlockKey {
        let (start, end) = (index * block_size, (index + 1) * block_size);
        BlockKey {
            parent,
            // Later blocks chain onto the first one's hash, so salting it salts them all.
            salt: if index == 0 { self.cache_salt } else { None },
            token_ids: self.token_ids[start..end].to_vec(),
            image_hashes: self
                .images
                .iter()
                .filter(|img| img.overlaps(start, end))
                .map(|img| img.content_hash)
                .collect(),
        }
    }
}
