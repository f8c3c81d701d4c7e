//! Fixed-shape decode steps (`static_decode`) captured as CUDA graphs: one graph launch replays a
//! whole step instead of about fifteen launches per layer, each paying candle's host-side cost.
//!
//! Capture rests on three things. Candle 0.11's host-to-device parameter cache: layout parameters
//! uploaded during a warm-up run are reused during capture, when copies are not allowed. Cudarc's
//! stream-ordered allocator: tensors made during capture become graph memory nodes whose addresses are
//! the same on every replay. And `AUTO_FREE_ON_LAUNCH`: the outputs that outlive the capture are
//! released and made again by each replay instead of forbidding it.

use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
use candle_core::Device;

use super::kv_cache::KvCache;
use super::llava::LlavaModel;
use super::static_decode::{DecodeOutput, StaticDecode};
use super::ModelError;

pub struct CapturedDecode {
    // Declared first so it drops first: the outputs' memory is freed while the graph still exists.
    output: DecodeOutput,
    graph: CudaGraph,
}

fn driver(what: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Config(format!("CUDA graph {what}: {e}"))
}

impl CapturedDecode {
    /// Warms the step up with padding rows, then records it. Must run on the thread that replays it:
    /// candle's device works on the per-thread default stream.
    pub fn capture(
        step: &StaticDecode,
        model: &LlavaModel,
        kv_cache: &KvCache,
    ) -> Result<Self, ModelError> {
        let Device::Cuda(device) = model.device() else {
            return Err(ModelError::Config("CUDA graphs need a CUDA device".into()));
        };
        let stream = device.cuda_stream();
        let _parameter_cache = device.enable_cuda_graph_htod_cache();
        step.upload(&[], &[])?;
        // Loads every module, sizes cuBLAS's workspace and fills the parameter cache.
        drop(step.run(model, kv_cache)?);
        stream.synchronize().map_err(|e| driver("warm-up", e))?;
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| driver("capture", e))?;
        let output = step.run(model, kv_cache);
        // Capture must end whatever happened, or the stream stays unusable: clear any error a failed
        // free recorded first (cudarc reports it from the next call, which would skip the end).
        let _ = stream.context().check_err();
        let graph = stream.end_capture(
            sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
        );
        let output = output?;
        // The outputs' addresses belong to the graph and are backed only once it has launched; if it
        // never does, freeing them would fail and poison the next driver call, so they are forgotten.
        let launched = graph
            .map_err(|e| driver("instantiation", e))
            .and_then(|g| {
                g.ok_or_else(|| ModelError::Config("CUDA graph capture recorded nothing".into()))
            })
            .and_then(|g| {
                // Capturing ran nothing: launch once so the outputs' memory exists.
                g.launch().map_err(|e| driver("launch", e))?;
                stream.synchronize().map_err(|e| driver("launch", e))?;
                Ok(g)
            });
        match launched {
            Ok(graph) => Ok(Self { output, graph }),
            Err(e) => {
                std::mem::forget(output);
                Err(e)
            }
        }
    }

    /// Replays the step on the inputs last uploaded into `step`'s buffers.
    pub fn replay(&self) -> Result<&DecodeOutput, ModelError> {
        self.graph.launch().map_err(|e| driver("launch", e))?;
        Ok(&self.output)
    }
}
