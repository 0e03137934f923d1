//! qfuse-qwen3: Qwen3 dense models from Hugging Face checkpoints, generic over the compute backend.
#![warn(missing_docs)]

mod bench;
mod check;
mod checkpoint;
mod config;
mod decode;
mod generate;
mod golden;
mod model;
mod profile;
mod sampling;
mod synth;
mod text;

pub use bench::{run_bench, BenchReport, BenchSpec};
pub use check::{check_against, CheckReport, StageDiff, Stats};
pub use checkpoint::Checkpoint;
pub use config::Config;
pub use decode::Stepper;
pub use generate::{
    decode_ahead_runs, generate, generate_ahead, generate_with, top_k, validate, DecodeAheadRuns,
    FinishReason, Generation, Request, StepLogits, BLOCK_SIZE,
};
pub use golden::{golden_dir, GoldenCase, LogitsDiff, GOLDEN_MODELS};
pub use model::{
    check_numerics, expected_tensors, Attention, DecoderLayer, Inspector, Logits, Mlp, Qwen3,
    Stage, NUMERICS_LIMIT,
};
pub use profile::{amdahl, profile, FusedOpReport, ProfileReport, StageTime, GAPS};
pub use sampling::{Sampler, SamplingParams};
pub use synth::{synthetic_checkpoint, write_synthetic, SynthShape, GENERATION_CONFIG};
pub use text::{Message, StreamDecoder, Tokenizer};
