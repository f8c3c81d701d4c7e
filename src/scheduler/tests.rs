//! Scheduler tests with no model: steps are "run" by hand (sampled tokens made up), as vLLM's
//! `tests/v1/core` does.

use super::*;

fn config(tokens: usize, seqs: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_batched_tokens: tokens,
        max_num_seqs: seqs,
        max_num_encoder_tokens: 1000,
    }
}

fn seq(id: SeqId, len: usize) -> Sequence {
    Sequence::new(
        id,
        (0..len as u32).map(|t| t + 100 * id as u32).collect(),
        vec![],
    )
}

/// Runs one step: every sequence that reached its end gets token `7`.
fn step(s: &mut Scheduler) -> SchedulerOutput {
    let out = s.schedule();
    let sampled: Vec<(SeqId, u32)> = out
        .scheduled
        .iter()
        .filter(|x| x.sample)
        .map(|x| (x.seq_id, 7))
        .collect();
    s.update(&out, &sampled);
    out
}

fn new_tokens(out: &SchedulerOutput) -> Vec<(SeqId, usize)> {
    out.scheduled
        .iter()
        .map(|s| (s.seq_id, s.num_new))
        .collect()
}

#[test]
fn prefill_is_chunked_under_the_token_budget_and_decodes_join_the_batch() {
    let mut s = Scheduler::new(config(8, 4), BlockPool::new(64, 4));
    s.add(seq(1, 10));
    let out = step(&mut s);
    assert_eq!(new_tokens(&out), vec![(1, 8)]);
    assert!(
        !out.scheduled[0].sample,
        "a partial prefill samples nothing"
    );
    s.add(seq(2, 5));
    let out = step(&mut s);
    // The rest of 1's prompt (2 tokens) then 6 tokens of 2's prompt.
    assert_eq!(new_tokens(&out), vec![(1, 2), (2, 5)]);
    assert!(out.scheduled.iter().all(|x| x.sample));
    let out = step(&mut s);
    assert_eq!(new_tokens(&out), vec![(1, 1), (2, 1)], "both decode");
    // Positions 0..10 are cached; the first sampled token (position 10) is computed now.
    assert_eq!(out.scheduled[0].num_cached, 10);
    assert_eq!(s.get(1).unwrap().len(), 12);
}

#[test]
fn sequence_cap_holds_back_waiting_sequences() {
    let mut s = Scheduler::new(config(100, 2), BlockPool::new(64, 4));
    for id in 1..=3 {
        s.add(seq(id, 3));
    }
    let out = step(&mut s);
    assert_eq!(new_tokens(&out), vec![(1, 3), (2, 3)]);
    assert_eq!(s.num_waiting(), 1);
    s.remove(1);
    let out = step(&mut s);
    assert_eq!(new_tokens(&out), vec![(2, 1), (3, 3)]);
}

#[test]
fn block_tables_cover_the_computed_tokens() {
    let mut s = Scheduler::new(config(100, 4), BlockPool::new(64, 4));
    s.add(seq(1, 9));
    let out = step(&mut s);
    assert_eq!(
        out.scheduled[0].block_ids.len(),
        3,
        "9 tokens need 3 blocks of 4"
    );
    for _ in 0..3 {
        step(&mut s);
    }
    // 9 prompt tokens + 3 computed outputs = 12 → still 3 blocks; the 4th decode needs a 4th.
    let out = step(&mut s);
    assert_eq!(out.scheduled[0].num_cached, 12);
    assert_eq!(out.scheduled[0].block_ids.len(), 4);
    let ids = &out.scheduled[0].block_ids;
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "no block twice in a table");
}

#[test]
fn prefix_cache_hit_skips_computed_blocks_but_not_the_last_token() {
    let pool = BlockPool::new(64, 4);
    let mut s = Scheduler::new(config(100, 4), pool.clone());
    let prompt: Vec<u32> = (0..12).collect();
    s.add(Sequence::new(1, prompt.clone(), vec![]));
    step(&mut s);
    // Same 12-token prompt: blocks 0 and 1 hit; block 2 holds the last token, which is recomputed.
    s.add(Sequence::new(2, prompt.clone(), vec![]));
    let out = step(&mut s);
    let second = out.scheduled.iter().find(|x| x.seq_id == 2).unwrap();
    assert_eq!((second.num_cached, second.num_new), (8, 4));
    let first_table = &s.get(1).unwrap().block_ids();
    assert_eq!(&second.block_ids[..2], &first_table[..2], "shared blocks");
    assert_ne!(second.block_ids[2], first_table[2]);
    assert_eq!(s.num_prefix_hit_tokens(), 8);
    // A prompt that differs inside block 1 shares only block 0.
    let mut other = prompt.clone();
    other[5] = 999;
    s.add(Sequence::new(3, other, vec![]));
    let out = step(&mut s);
    let third = out.scheduled.iter().find(|x| x.seq_id == 3).unwrap();
    assert_eq!(third.num_cached, 4);
}

#[test]
fn a_sequence_that_computes_its_whole_prompt_takes_no_prefix_hit() {
    let pool = BlockPool::new(64, 4);
    let mut s = Scheduler::new(config(100, 4), pool);
    let prompt: Vec<u32> = (0..12).collect();
    s.add(Sequence::new(1, prompt.clone(), vec![]));
    step(&mut s);
    let mut whole = Sequence::new(2, prompt, vec![]);
    whole.computes_whole_prompt = true;
    s.add(whole);
    let out = step(&mut s);
    let second = out.scheduled.iter().find(|x| x.seq_id == 2).unwrap();
    assert_eq!((second.num_cached, second.num_new), (0, 12));
}

#[test]
fn a_cache_salt_separates_prefix_cache_entries() {
    let pool = BlockPool::new(64, 4);
    let mut s = Scheduler::new(config(100, 4), pool);
    let prompt: Vec<u32> = (0..12).collect();
    let salted = |id, salt: Option<u8>| {
        let mut seq = Sequence::new(id, prompt.clone(), vec![]);
        seq.cache_salt = salt.map(|b| [b; 32]);
        seq
    };
    s.add(salted(1, Some(1)));
    step(&mut s);
    // Another tenant's salt, and no salt: nothing is shared, not even block 0.
    for (id, salt) in [(2, Some(2)), (3, None)] {
        s.add(salted(id, salt));
        let out = step(&mut s);
        let x = out.scheduled.iter().find(|x| x.seq_id == id).unwrap();
        assert_eq!(x.num_cached, 0, "salt {salt:?}");
    }
    // The same salt hits as an unsalted prompt would.
    s.add(salted(4, Some(1)));
    let out = step(&mut s);
    assert_eq!(
        out.scheduled
            .iter()
            .find(|x| x.seq_id == 4)
            .unwrap()
            .num_cached,
        8
    );
}

#[test]
fn image_hashes_are_part_of_the_prefix_key() {
    let pool = BlockPool::new(64, 4);
    let mut s = Scheduler::new(config(100, 4), pool);
    let prompt: Vec<u32> = vec![1, 2, 9, 9, 9, 9, 9, 9, 3, 4, 5];
    let image = |h: u8| SeqImage {
        start: 2,
        len: 6,
        content_hash: [h; 32],
    };
    s.add(Sequence::new(1, prompt.clone(), vec![image(1)]));
    let out = step(&mut s);
    assert_eq!(out.scheduled[0].encode_images, vec![0]);
    // Same placeholder ids, another picture: nothing after block 0's image part may be reused.
    s.add(Sequence::new(2, prompt.clone(), vec![image(2)]));
    let out = step(&mut s);
    let second = out.scheduled.iter().find(|x| x.seq_id == 2).unwrap();
    assert_eq!(
        second.num_cached, 0,
        "block 0 already holds image placeholders"
    );
    // Same picture: two full blocks are reused.
    s.add(Sequence::new(3, prompt, vec![image(1)]));
    let out = step(&mut s);
    let third = out.scheduled.iter().find(|x| x.seq_id == 3).unwrap();
    assert_eq!(third.num_cached, 8);
    assert!(
        third.encode_images.is_empty(),
        "the image lies wholly in cached blocks"
    );
}

#[test]
fn encoder_budget_stops_a_chunk_before_an_image_that_does_not_fit() {
    let mut s = Scheduler::new(
        SchedulerConfig {
            max_num_batched_tokens: 100,
            max_num_seqs: 4,
            max_num_encoder_tokens: 6,
        },
        BlockPool::new(64, 4),
    );
    let img = |start, h| SeqImage {
        start,
        len: 6,
        content_hash: [h; 32],
    };
    s.add(Sequence::new(1, vec![5; 20], vec![img(1, 1), img(10, 2)]));
    let out = step(&mut s);
    assert_eq!(
        new_tokens(&out),
        vec![(1, 10)],
        "stops where the second image starts"
    );
    assert_eq!(out.scheduled[0].encode_images, vec![0]);
    let out = step(&mut s);
    assert_eq!(new_tokens(&out), vec![(1, 10)]);
    assert_eq!(out.scheduled[0].encode_images, vec![1]);
}

#[test]
fn running_out_of_blocks_preempts_the_newest_and_everything_finishes() {
    // 6 blocks of 4 tokens: two sequences of 9 prompt tokens grow until one must yield.
    let pool = BlockPool::new(6, 4);
    let mut s = Scheduler::new(config(100, 4), pool.clone());
    s.add(seq(1, 9));
    s.add(seq(2, 9));
    let mut preempted = Vec::new();
    let mut finished = Vec::new();
    for _ in 0..200 {
        if !s.has_work() {
            break;
        }
        let out = step(&mut s);
        preempted.extend(out.preempted.iter().copied());
        for id in [1, 2] {
            if s.get(id).is_some_and(|q| q.num_output_tokens() == 8) {
                finished.push(id);
                s.remove(id);
            }
        }
    }
    assert_eq!(preempted.first(), Some(&2), "the newest sequence yields");
    assert_eq!(finished, vec![1, 2]);
    assert_eq!(pool.num_free(), 6, "every block is back");
}

#[test]
fn removing_a_sequence_in_any_state_returns_its_blocks() {
    let pool = BlockPool::new(16, 4);
    let mut s = Scheduler::new(config(6, 4), pool.clone());
    s.add(seq(1, 10)); // prefilling (chunked)
    s.add(seq(2, 3)); // waiting behind the budget
    step(&mut s);
    s.add(seq(3, 2));
    step(&mut s);
    step(&mut s);
    assert!(pool.num_free() < 16);
    for id in [1, 2, 3] {
        s.remove(id);
    }
    assert_eq!(pool.num_free(), 16);
}

#[test]
fn sibling_waits_for_its_parent_prompt_then_shares_it() {
    let pool = BlockPool::new(64, 4);
    let mut s = Scheduler::new(config(100, 4), pool);
    s.add(seq(1, 13));
    let mut sibling = seq(1, 13);
    sibling.id = 2;
    sibling.wait_for = Some(1);
    s.add(sibling);
    let out = step(&mut s);
    assert_eq!(new_tokens(&out), vec![(1, 13)], "the sibling waits");
    let out = step(&mut s);
    let second = out.scheduled.iter().find(|x| x.seq_id == 2).unwrap();
    assert_eq!((second.num_cached, second.num_new), (12, 1));
}
