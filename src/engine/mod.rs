//! The engine: turns prompts into tokens with the model. For now one sequence at a time
//! (`generate`); the continuous-batching core loop over the scheduler arrives with the engine issue.

pub mod generate;
pub mod inputs;
pub mod sampler;

pub use generate::{generate, GenerateOptions, Generation};
