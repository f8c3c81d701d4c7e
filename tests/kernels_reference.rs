//! The kernels' CPU sides (the definitions the CUDA kernels are checked against on the device) agree
//! with the model's reference path built from candle ops, on random inputs; and in f16/bf16 stay within
//! the tolerances of the f32 result.

use candle_core::{DType, Device, Tensor};
use llava_kernels as k;
use llava_server::model::attention::{paged_attention, write_kv, AttentionMetadata, SequenceStep};

fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    let got = got.to_dtype(DType::F32).unwrap();
    let want = want.to_dtype(DType::F32).unwrap();
    let diff = (got - &want)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let norm = want
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    (diff / norm).sqrt()
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()
}

/// Two sequences with interleaved blocks of 16 in one pool: lengths (cached, new).
struct Batch {
    tables: Vec<Vec<u32>>,
    lens: Vec<(usize, usize)>,
}

fn batch() -> Batch {
    Batch {
        tables: vec![
            (0..8).map(|b| b * 2).collect(),
            (0..8).map(|b| b * 2 + 1).collect(),
        ],
        lens: vec![(37, 5), (0, 70)],
    }
}

fn meta(b: &Batch) -> AttentionMetadata {
    let steps: Vec<SequenceStep> = b
        .lens
        .iter()
        .zip(&b.tables)
        .map(|(&(c, n), t)| SequenceStep {
            num_cached: c,
            num_new: n,
            block_table: t,
        })
        .collect();
    AttentionMetadata::build(&steps, 16, &Device::Cpu).unwrap()
}

fn prefill_work(b: &Batch) -> k::PrefillWork {
    let lens: Vec<usize> = b.lens.iter().map(|&(_, n)| n).collect();
    let (tiles, singles) = k::prefill_work(&lens);
    k::PrefillWork {
        tiles: Tensor::new(tiles, &Device::Cpu).unwrap(),
        singles: Tensor::new(singles, &Device::Cpu).unwrap(),
    }
}

fn paged(b: &Batch, kv_heads: usize) -> k::PagedLayout {
    let flat: Vec<u32> = b.tables.concat();
    k::PagedLayout {
        block_tables: Tensor::from_vec(flat, (b.tables.len(), 8), &Device::Cpu).unwrap(),
        block_size: 16,
        num_kv_heads: kv_heads,
    }
}

#[test]
fn prefill_and_decode_attention_match_the_reference_path() {
    for (heads, kv_heads, dim) in [(8, 2, 64), (4, 4, 128)] {
        let b = batch();
        let m = meta(&b);
        let slots = 16 * 16;
        let kc = randn(&[slots, kv_heads * dim]);
        let vc = randn(&[slots, kv_heads * dim]);
        let q = randn(&[m.num_tokens, heads, dim]);
        let scale = (dim as f64).powf(-0.5);
        let want = paged_attention(&q, &kc, &vc, &m, kv_heads, scale).unwrap();
        let token_seq: Vec<u32> = b
            .lens
            .iter()
            .enumerate()
            .flat_map(|(s, &(_, n))| std::iter::repeat_n(s as u32, n))
            .collect();
        let token_seq = Tensor::new(token_seq, &Device::Cpu).unwrap();
        let work = prefill_work(&b);
        let got = k::prefill_attention(
            &q,
            &kc,
            &vc,
            &m.positions,
            &token_seq,
            &work,
            &paged(&b, kv_heads),
            scale as f32,
        )
        .unwrap()
        .reshape((m.num_tokens, heads * dim))
        .unwrap();
        assert!(
            rel_err(&got, &want) < 1e-5,
            "prefill {heads}/{kv_heads}/{dim}"
        );
        // In half precision the kernel stays within the tolerances of the f32 result.
        for (dtype, tol) in [(DType::BF16, 1e-2), (DType::F16, 1e-3)] {
            let c = |t: &Tensor| t.to_dtype(dtype).unwrap();
            let got = k::prefill_attention(
                &c(&q),
                &c(&kc),
                &c(&vc),
                &m.positions,
                &token_seq,
                &work,
                &paged(&b, kv_heads),
                scale as f32,
            )
            .unwrap()
            .reshape((m.num_tokens, heads * dim))
            .unwrap();
            assert!(rel_err(&got, &want) < tol, "{dtype:?}");
        }

        // Decode: the last token of each sequence alone, over its whole context.
        let lasts: Vec<u32> = vec![4, 74];
        let qd = q
            .index_select(&Tensor::new(lasts.clone(), &Device::Cpu).unwrap(), 0)
            .unwrap();
        let want_d = want
            .index_select(&Tensor::new(lasts, &Device::Cpu).unwrap(), 0)
            .unwrap();
        let lens = Tensor::new(&[42u32, 70], &Device::Cpu).unwrap();
        let got = k::decode_attention(&qd, &kc, &vc, &lens, 70, &paged(&b, kv_heads), scale as f32)
            .unwrap()
            .reshape((2, heads * dim))
            .unwrap();
        assert!(
            rel_err(&got, &want_d) < 1e-5,
            "decode {heads}/{kv_heads}/{dim}"
        );
    }
}

#[test]
fn write_kv_matches_the_reference_path() {
    let slots = Tensor::new(&[5u32, 0, 17], &Device::Cpu).unwrap();
    let src = randn(&[3, 2, 4]);
    let (a, b) = (
        Tensor::zeros((20, 8), DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros((20, 8), DType::F32, &Device::Cpu).unwrap(),
    );
    let va = a.zeros_like().unwrap();
    write_kv(&a, &va, &src, &src, &slots).unwrap();
    k::write_kv(&b, &src.reshape((3, 8)).unwrap(), &slots).unwrap();
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    // The same rows as a column slice of wider rows (the v part of merged qkv rows), read in place.
    let wide = Tensor::cat(&[&randn(&[3, 5]), &src.reshape((3, 8)).unwrap()], 1).unwrap();
    let c = a.zeros_like().unwrap();
    k::write_kv(&c, &wide.narrow(1, 5, 8).unwrap(), &slots).unwrap();
    assert_eq!(a.to_vec2::<f32>().unwrap(), c.to_vec2::<f32>().unwrap());
    assert!(
        b.get(5)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
}

#[test]
fn fused_elementwise_ops_match_candle() {
    let (x, r) = (randn(&[6, 128]), randn(&[6, 128]));
    let w = randn(&[128]);
    let (normed, summed) = k::add_rms_norm(&x, &r, &w, 1e-5).unwrap();
    let s = (&x + &r).unwrap();
    let want = candle_nn::ops::rms_norm_slow(&s, &w, 1e-5).unwrap();
    assert!(rel_err(&summed, &s) < 1e-7);
    assert!(rel_err(&normed, &want) < 1e-6);
    for (dtype, tol) in [(DType::BF16, 1e-2), (DType::F16, 1e-3)] {
        let c = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let (n, _) = k::add_rms_norm(&c(&x), &c(&r), &c(&w), 1e-5).unwrap();
        assert!(rel_err(&n, &want) < tol, "{dtype:?}");
    }

    let (g, u) = (randn(&[5, 344]), randn(&[5, 344]));
    let want = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
    let gate_up = Tensor::cat(&[&g, &u], 1).unwrap();
    assert!(rel_err(&k::silu_mul(&gate_up).unwrap(), &want) < 1e-6);

    // Rotary of the q and k heads of merged qkv rows: the same cos|sin table as candle's rope_thd at
    // gathered positions, v untouched.
    let (tokens, q_heads, kv_heads, dim, max_pos) = (7, 4, 2, 64, 50);
    let qkv = randn(&[tokens, (q_heads + 2 * kv_heads) * dim]);
    let angles = randn(&[max_pos, dim / 2]);
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let table = Tensor::cat(&[&cos, &sin], 1).unwrap();
    let positions = Tensor::new(&[0u32, 3, 9, 49, 1, 2, 3], &Device::Cpu).unwrap();
    let (q, k) = k::rotary_qk(&qkv, &table, &positions, q_heads, kv_heads).unwrap();
    let rope = |start: usize, heads: usize| {
        let x = qkv
            .narrow(1, start * dim, heads * dim)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((1, tokens, heads, dim))
            .unwrap();
        candle_nn::rotary_emb::rope_thd(
            &x,
            &cos.index_select(&positions, 0).unwrap(),
            &sin.index_select(&positions, 0).unwrap(),
        )
        .unwrap()
        .squeeze(0)
        .unwrap()
    };
    assert!(rel_err(&q, &rope(0, q_heads)) < 1e-6);
    let got = k;
    let want = rope(q_heads, kv_heads);
    assert!(rel_err(&got, &want) < 1e-6);
}
