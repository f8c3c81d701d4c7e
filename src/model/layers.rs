//! Small building blocks shared by the vision tower, projector and decoder: linear layers loaded by
//! checkpoint name, activations as HF defines them, and the two norms.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::config::Activation;
use super::cpu_kernels::{cpu_kernels_enabled, f32_slice};
use super::cpu_math;
use super::packed_gemm::PackedWeight;
use super::small_gemm;

/// `y = x Wᵀ (+ b)` for `x` of any rank; weights as stored by PyTorch (`[out, in]`), transposed once
/// at load for layers that only ever see many rows (`store_transposed`), or packed for the CPU
/// kernel that serves every row count (`store_packed`).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Stored,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum Stored {
    /// `[out, in]`.
    Rows(Tensor),
    /// `[in, out]`.
    Transposed(Tensor),
    Packed(PackedWeight),
}

impl Linear {
    pub fn load(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> candle_core::Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self::with_bias(weight, bias))
    }

    fn with_bias(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Stored::Rows(weight),
            bias,
        }
    }

    /// Several projections of the same input as one: weights (and biases) stacked along the output
    /// dim, so one GEMM computes them all and the outputs sit side by side in each row.
    pub fn load_merged(
        parts: &[(VarBuilder, usize)],
        in_dim: usize,
        bias: bool,
    ) -> candle_core::Result<Self> {
        let loaded = parts
            .iter()
            .map(|(vb, out_dim)| Self::load(vb.clone(), in_dim, *out_dim, bias))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let weights = loaded
            .iter()
            .map(|l| match &l.weight {
                Stored::Rows(w) => Ok(w),
                _ => candle_core::bail!("a freshly loaded weight is stored as rows"),
            })
            .collect::<candle_core::Result<Vec<&Tensor>>>()?;
        let bias = if bias {
            let biases: Vec<&Tensor> = loaded.iter().filter_map(|l| l.bias.as_ref()).collect();
            Some(Tensor::cat(&biases, 0)?)
        } else {
            None
        };
        Ok(Self::with_bias(Tensor::cat(&weights, 0)?, bias))
    }

    pub fn from_weight(weight: Tensor) -> Self {
        Self::with_bias(weight, None)
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.rank() == 2 {
            return self.forward_2d(x);
        }
        let dims = x.dims();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let flat = x.reshape((rows, dims[dims.len() - 1]))?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank ≥ 1") = self.out_dim()?;
        self.forward_2d(&flat)?.reshape(out_dims)
    }

    fn out_dim(&self) -> candle_core::Result<usize> {
        match &self.weight {
            Stored::Rows(w) => w.dim(0),
            Stored::Transposed(w) => w.dim(1),
            Stored::Packed(p) => Ok(p.out_dim()),
        }
    }

    /// Stores the weight as `Wᵀ` (`[in, out]`, contiguous) for layers that only see prefill-sized
    /// inputs (the vision tower, the projector). On the CPU, `gemm` multiplies by a contiguous `[in,
    /// out]` matrix 5–20% faster than by the transposed view of `[out, in]` (mid checkpoint shapes at
    /// 577 rows, e.g. CLIP's fc2 11.9 → 9.4 ms), and the bias becomes the product's starting value
    /// instead of another pass. Where `packed_gemm` runs, packed layers are faster still (`store_packed`).
    pub fn store_transposed(&mut self) -> candle_core::Result<()> {
        if let Stored::Rows(w) = &self.weight {
            self.weight = Stored::Transposed(w.t()?.contiguous()?);
        }
        Ok(())
    }

    /// Packs the `[out, in]` weight for `packed_gemm` where this CPU runs it (f32 or f16 weights,
    /// AVX-512, CPU kernels on) and keeps only the packed copy; leaves it as it is otherwise. The
    /// layer then multiplies only f32 rows: the caller packs the decoder of an f32 CPU model.
    pub fn store_packed(&mut self) -> candle_core::Result<()> {
        if let Stored::Rows(w) = &self.weight {
            if let Some(packed) = PackedWeight::pack(w)? {
                self.weight = Stored::Packed(packed);
            }
        }
        Ok(())
    }

    fn forward_2d(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let out = match &self.weight {
            Stored::Transposed(w) => {
                if let Some(out) = gemm_with_bias(x, w, self.bias.as_ref())? {
                    return Ok(out);
                }
                x.matmul(w)?
            }
            Stored::Rows(w) => matmul_rows(x, w)?,
            Stored::Packed(p) => p.matmul(x)?,
        };
        match &self.bias {
            Some(b) => out.broadcast_add(b),
            None => Ok(out),
        }
    }
}

/// `x · wt + bias` for f32 CPU tensors (`wt` is `[in, out]`) through `gemm` directly, the output
/// starting as the bias rows; `None` for other tensors or with the CPU kernels off.
fn gemm_with_bias(
    x: &Tensor,
    wt: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    if !cpu_kernels_enabled() {
        return Ok(None);
    }
    let ((m, k), (k2, n)) = (x.dims2()?, wt.dims2()?);
    if k != k2 {
        candle_core::bail!("linear layer of {k2} inputs given rows of {k}");
    }
    let out = {
        let (x_guard, x_layout) = x.storage_and_layout();
        let (w_guard, w_layout) = wt.storage_and_layout();
        let (Some(xs), Some(ws)) = (f32_slice(&x_guard, x_layout), f32_slice(&w_guard, w_layout))
        else {
            return Ok(None);
        };
        let mut out = match bias {
            Some(b) => {
                let b = b.to_vec1::<f32>()?;
                if b.len() != n {
                    candle_core::bail!("bias of {} for {n} outputs", b.len());
                }
                b.repeat(m)
            }
            None => vec![0f32; m * n],
        };
        // SAFETY: `xs` is m × k, `ws` k × n and `out` m × n, all row-major and contiguous.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                bias.is_some(),
                xs.as_ptr(),
                1,
                k as isize,
                ws.as_ptr(),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(candle_core::utils::get_num_threads()),
            )
        };
        out
    };
    Tensor::from_vec(out, (m, n), x.device()).map(Some)
}

/// `x Wᵀ` for `[out, in]` rows: decode-sized f32 inputs on the CPU stream the weights once
/// (`small_gemm`); the rest is a GEMM.
fn matmul_rows(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    match small_gemm::linear(x, w)? {
        Some(out) => Ok(out),
        // f16-stored weights meet f32 activations here only in prefill steps, where widening the
        // weight (one pass over it) costs little beside the GEMM.
        None if w.dtype() != x.dtype() => x.matmul(&w.to_dtype(x.dtype())?.t()?),
        None => x.matmul(&w.t()?),
    }
}

impl Linear {
    /// Keeps the weight in f16 (the bias as it is): the CPU kernels widen it to f32 in registers, so
    /// a decode step reads half the bytes and computes in f32 (`--cpu-f16-weights`).
    pub fn store_weight_f16(&mut self) -> candle_core::Result<()> {
        self.weight = match &self.weight {
            Stored::Rows(w) => Stored::Rows(w.to_dtype(DType::F16)?),
            Stored::Transposed(w) => Stored::Transposed(w.to_dtype(DType::F16)?),
            Stored::Packed(p) => Stored::Packed(p.to_f16()),
        };
        Ok(())
    }
}

pub fn activate(act: Activation, x: &Tensor) -> candle_core::Result<Tensor> {
    if act == Activation::QuickGelu {
        if let Some(out) = on_cpu_f32(x, cpu_math::quick_gelu)? {
            return Ok(out);
        }
    }
    match act {
        Activation::Silu => candle_nn::ops::silu(x),
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
        // x · σ(1.702 x), as CLIP's quick_gelu.
        Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        Activation::Relu => x.relu(),
    }
}

/// `act(gate) × up` from a merged gate/up projection `[rows, 2 × inter]` (gate first): one fused pass
/// for SiLU on f32 CPU tensors, `activate` on the gate half times the up half otherwise.
pub fn gated_activation(
    act: Activation,
    gate_up: &Tensor,
    inter: usize,
) -> candle_core::Result<Tensor> {
    if act == Activation::Silu {
        let rows = gate_up.dim(0)?;
        if let Some(out) = on_cpu_f32(gate_up, |x| cpu_math::silu_mul(x, inter))? {
            return out.reshape((rows, inter));
        }
    }
    activate(act, &gate_up.narrow(1, 0, inter)?)? * gate_up.narrow(1, inter, inter)?
}

/// `f` over a contiguous f32 CPU tensor's elements when the CPU kernels are on; its output keeps the
/// input's shape when it has as many elements (reshape it otherwise). `None` for any other tensor.
fn on_cpu_f32(
    x: &Tensor,
    f: impl FnOnce(&[f32]) -> Vec<f32>,
) -> candle_core::Result<Option<Tensor>> {
    if !cpu_kernels_enabled() {
        return Ok(None);
    }
    let out = {
        let (guard, layout) = x.storage_and_layout();
        match f32_slice(&guard, layout) {
            Some(data) => f(data),
            None => return Ok(None),
        }
    };
    let shape = match out.len() == x.elem_count() {
        true => x.shape().clone(),
        false => out.len().into(),
    };
    Tensor::from_vec(out, shape, x.device()).map(Some)
}

/// LLaMA's RMSNorm: normalise in f32, cast back, then scale (HF's order of operations).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.rank() == 2 && x.dim(1)? == self.weight.dim(0)? {
            // The weight read where it lies (an f32 CPU tensor, or not this path).
            let (storage, layout) = self.weight.storage_and_layout();
            if let Some(weight) = f32_slice(&storage, layout) {
                let eps = self.eps as f32;
                if let Some(out) = on_cpu_f32(x, |xs| cpu_math::rms_norm(xs, weight, eps))? {
                    return Ok(out);
                }
            }
        }
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let variance = x32.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let normed = x32.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        normed.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

/// CLIP's LayerNorm with weight and bias.
pub fn layer_norm(
    vb: VarBuilder,
    dim: usize,
    eps: f64,
) -> candle_core::Result<candle_nn::LayerNorm> {
    let weight = vb.get(dim, "weight")?;
    let bias = vb.get(dim, "bias")?;
    Ok(candle_nn::LayerNorm::new(weight, bias, eps))
}
