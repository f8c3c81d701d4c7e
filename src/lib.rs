//! llava-server: an OpenAI-compatible inference server for LLaVA vision-language models.
//! Layers (see DESIGN.md): api → {frontend, engine}; engine → {scheduler, model}; scheduler and model
//! never meet; `types` is shared by all.

pub mod api;
pub mod engine;
pub mod frontend;
pub mod model;
pub mod scheduler;
pub mod types;
