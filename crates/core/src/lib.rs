//! qfuse-core: the [`Backend`] trait every compute backend implements, the host-side tensor type,
//! batch descriptions and the paged KV cache shared by all backends.
#![warn(missing_docs)]

mod backend;
mod compare;
pub mod compose;
mod dtype;
mod error;
pub mod knobs;
mod kv;
mod perturb;
pub mod reuse;
mod rng;
mod tensor;
#[cfg(feature = "testing")]
pub mod testing;
mod unfused;

pub use backend::{AttentionConfig, Backend, DeviceTensor, LayerWeights};
pub use compare::rel_error;
pub use dtype::DType;
pub use error::{Error, Result};
pub use kv::{BatchInfo, BlockAllocator, KvCache, LayerKv, SeqChunk};
pub use perturb::Perturbed;
pub use rng::Rng;
pub use tensor::{HostData, HostTensor, Shape};
pub use unfused::{FusedOp, Unfused};
