//! Hugging Face safetensors checkpoints, single-file or sharded, memory-mapped: each tensor's bytes
//! are read once, straight from the mapping, when the model uploads it.
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use qfuse_core::{DType, Error, HostTensor, Result, Shape};
use safetensors::tensor::{Metadata, SafeTensors};
use safetensors::Dtype;

/// A safetensors file's bytes: memory-mapped from disk, or built in memory.
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

struct Shard {
    path: PathBuf,
    mmap: Bytes,
    data_start: usize,
    meta: Metadata,
}

/// The tensors of a checkpoint directory.
pub struct Checkpoint {
    shards: Vec<Shard>,
    /// Tensor name -> index of the shard holding it.
    location: HashMap<String, usize>,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        err: e,
    }
}

fn dtype_of(d: Dtype) -> Option<DType> {
    match d {
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F16 => Some(DType::F16),
        Dtype::F32 => Some(DType::F32),
        Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}

impl Shard {
    fn open(path: PathBuf) -> Result<Self> {
        let file = File::open(&path).map_err(|e| io(&path, e))?;
        // SAFETY: the mapping is read-only and lives as long as the Shard. Another process
        // truncating the file while it is mapped would fault the reads; checkpoints are not
        // written while a model loads, as with every mmap-based loader.
        let mmap = Bytes::Mapped(unsafe { Mmap::map(&file) }.map_err(|e| io(&path, e))?);
        Self::parse(path, mmap)
    }

    fn parse(path: PathBuf, mmap: Bytes) -> Result<Self> {
        let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            Error::Model(format!(
                "{}: not a valid safetensors file: {e}",
                path.display()
            ))
        })?;
        Ok(Shard {
            path,
            mmap,
            data_start: 8 + header_len,
            meta,
        })
    }
}

impl Checkpoint {
    /// A checkpoint held in memory: the bytes of one safetensors file (`name` labels messages).
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self> {
        let shard = Shard::parse(PathBuf::from(name), Bytes::Owned(bytes))?;
        let location = shard.meta.tensors().into_keys().map(|n| (n, 0)).collect();
        Ok(Checkpoint {
            shards: vec![shard],
            location,
        })
    }

    /// Opens `dir/model.safetensors`, or the shards listed in `dir/model.safetensors.index.json`.
    ///
    /// # Errors
    /// A missing directory or file, an unreadable index, a truncated or inconsistent safetensors
    /// header, or an index naming a tensor its shard lacks.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Model(format!(
                "model directory {} does not exist",
                dir.display()
            )));
        }
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.exists() {
            let shard = Shard::open(single)?;
            let location = shard
                .meta
                .tensors()
                .into_keys()
                .map(|name| (name, 0))
                .collect();
            return Ok(Checkpoint {
                shards: vec![shard],
                location,
            });
        }
        if !index.exists() {
            return Err(Error::Model(format!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            )));
        }
        let text = std::fs::read_to_string(&index).map_err(|e| io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Model(format!("{}: invalid JSON: {e}", index.display())))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Model(format!("{}: no `weight_map` object", index.display())))?;
        let (mut shards, mut file_ids, mut location) = (Vec::new(), HashMap::new(), HashMap::new());
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                Error::Model(format!(
                    "{}: weight_map[{name}] is not a file name",
                    index.display()
                ))
            })?;
            if file.contains('/') || file.contains("..") {
                return Err(Error::Model(format!(
                    "{}: shard name {file:?} is not a plain file name",
                    index.display()
                )));
            }
            let id = match file_ids.get(file) {
                Some(&id) => id,
                None => {
                    shards.push(Shard::open(dir.join(file))?);
                    file_ids.insert(file.to_string(), shards.len() - 1);
                    shards.len() - 1
                }
            };
            if shards[id].meta.info(name).is_none() {
                return Err(Error::Model(format!(
                    "{}: index says tensor `{name}` is there, but it is not",
                    shards[id].path.display()
                )));
            }
            location.insert(name.clone(), id);
        }
        Ok(Checkpoint { shards, location })
    }

    /// Whether the checkpoint has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// Checks that `name` exists with this shape and a float dtype qfuse reads.
    pub fn check(&self, name: &str, shape: &[usize]) -> Result<()> {
        let (shard, info) = self.info(name)?;
        if dtype_of(info.dtype).is_none() {
            return Err(Error::Model(format!(
                "{}: tensor `{name}` has dtype {:?}; only BF16, F16, F32 and F64 are supported",
                shard.path.display(),
                info.dtype
            )));
        }
        if info.shape != shape {
            return Err(Error::Model(format!(
                "{}: tensor `{name}` has shape {} but the config implies {}",
                shard.path.display(),
                Shape::new(info.shape.clone()),
                Shape::new(shape.to_vec())
            )));
        }
        Ok(())
    }

    fn info(&self, name: &str) -> Result<(&Shard, &safetensors::tensor::TensorInfo)> {
        let shard = self
            .location
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| Error::Model(format!("checkpoint has no tensor `{name}`")))?;
        let info = shard
            .meta
            .info(name)
            .ok_or_else(|| Error::Model(format!("checkpoint has no tensor `{name}`")))?;
        Ok((shard, info))
    }

    /// The tensor `name` in its storage dtype, decoded from the mapping.
    pub fn tensor(&self, name: &str) -> Result<HostTensor> {
        let (shard, info) = self.info(name)?;
        let dtype = dtype_of(info.dtype).ok_or_else(|| {
            Error::Model(format!(
                "{}: tensor `{name}`: unsupported dtype {:?}",
                shard.path.display(),
                info.dtype
            ))
        })?;
        let (s, e) = info.data_offsets;
        // read_metadata checked that the offsets tile the data section exactly.
        let bytes = &shard.mmap[shard.data_start + s..shard.data_start + e];
        HostTensor::from_le_bytes(info.shape.clone(), dtype, bytes)
    }
}
