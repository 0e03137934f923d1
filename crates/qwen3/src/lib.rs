//! qfuse-qwen3: Qwen3 dense models from Hugging Face checkpoints, generic over the compute backend.
#![warn(missing_docs)]

mod checkpoint;
mod config;
mod generate;
mod model;

pub use checkpoint::Checkpoint;
pub use config::Config;
pub use generate::{
    generate_greedy, top_k, validate, FinishReason, Generation, Request, StepLogits, BLOCK_SIZE,
};
pub use model::{expected_tensors, Attention, DecoderLayer, Inspector, Logits, Mlp, Qwen3, Stage};
