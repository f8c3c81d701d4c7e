//! Fused CUDA kernels for llava-server, each wrapped as a candle custom op whose CPU side is the
//! engine's reference path. The kernels arrive with the GPU issue; without the `cuda` feature this
//! crate compiles to nothing so that CPU builds never need nvcc.
