//! Shapes and host-resident tensors: what checkpoints load into and what backends upload/download.
use std::fmt;

use half::{bf16, f16};

use crate::{DType, Error, Result};

/// The dimensions of a row-major tensor, outermost first.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    /// A shape from its dimensions.
    pub fn new(dims: impl Into<Vec<usize>>) -> Self {
        Shape(dims.into())
    }

    /// The dimensions, outermost first.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Number of elements (1 for a rank-0 shape).
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }

    /// Slots of a KV-cache pool `[blocks, block_size, kv_heads, head_dim]` whose rows are `width`
    /// (`kv_heads * head_dim`) wide, or an error naming `op`.
    pub fn cache_slots(&self, width: usize, op: &'static str) -> Result<usize> {
        match self.0.as_slice() {
            [b, bs, h, d] if h * d == width => Ok(b * bs),
            _ => Err(Error::invalid(
                op,
                format!("cache shape {self} does not hold rows of {width}"),
            )),
        }
    }

    /// The two dimensions of a matrix, or an error naming `op` if the rank is not 2.
    pub fn as_matrix(&self, op: &'static str) -> Result<(usize, usize)> {
        match self.0.as_slice() {
            [r, c] => Ok((*r, *c)),
            _ => Err(Error::invalid(
                op,
                format!("expected a matrix, got shape {self}"),
            )),
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<Vec<usize>> for Shape {
    fn from(d: Vec<usize>) -> Self {
        Shape(d)
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape(d.to_vec())
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(d: [usize; N]) -> Self {
        Shape(d.to_vec())
    }
}

/// Typed element storage of a [`HostTensor`].
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    /// bfloat16 elements.
    BF16(Vec<bf16>),
    /// f16 elements.
    F16(Vec<f16>),
    /// f32 elements.
    F32(Vec<f32>),
    /// f64 elements.
    F64(Vec<f64>),
}

impl HostData {
    fn len(&self) -> usize {
        match self {
            HostData::BF16(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::F32(v) => v.len(),
            HostData::F64(v) => v.len(),
        }
    }
}

/// A tensor in host memory, in its storage dtype. Conversions to f64 are exact for every dtype.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    shape: Shape,
    data: HostData,
}

impl HostTensor {
    /// A tensor from a shape and elements; errors if the element count does not match.
    pub fn new(shape: impl Into<Shape>, data: HostData) -> Result<Self> {
        let shape = shape.into();
        if shape.numel() != data.len() {
            return Err(Error::invalid(
                "HostTensor::new",
                format!(
                    "shape {shape} needs {} elements, got {}",
                    shape.numel(),
                    data.len()
                ),
            ));
        }
        Ok(HostTensor { shape, data })
    }

    /// An f64 tensor.
    pub fn from_f64(shape: impl Into<Shape>, data: Vec<f64>) -> Result<Self> {
        Self::new(shape, HostData::F64(data))
    }

    /// A tensor decoded from little-endian bytes of `dtype` (the safetensors layout).
    pub fn from_le_bytes(shape: impl Into<Shape>, dtype: DType, bytes: &[u8]) -> Result<Self> {
        let shape = shape.into();
        let want = shape.numel() * dtype.size_in_bytes();
        if bytes.len() != want {
            return Err(Error::invalid(
                "HostTensor::from_le_bytes",
                format!(
                    "{dtype} tensor of shape {shape} needs {want} bytes, got {}",
                    bytes.len()
                ),
            ));
        }
        let data = match dtype {
            DType::BF16 => HostData::BF16(
                bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            DType::F16 => HostData::F16(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            DType::F32 => HostData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::F64 => HostData::F64(
                bytes
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            ),
        };
        Ok(HostTensor { shape, data })
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The storage dtype.
    pub fn dtype(&self) -> DType {
        match self.data {
            HostData::BF16(_) => DType::BF16,
            HostData::F16(_) => DType::F16,
            HostData::F32(_) => DType::F32,
            HostData::F64(_) => DType::F64,
        }
    }

    /// The typed elements.
    pub fn data(&self) -> &HostData {
        &self.data
    }

    /// All elements converted (exactly) to f64.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match &self.data {
            HostData::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            HostData::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            HostData::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            HostData::F64(v) => v.clone(),
        }
    }

    /// The same values rounded to `dtype` (round-to-nearest-even).
    pub fn to_dtype(&self, dtype: DType) -> HostTensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        let v = self.to_f64_vec();
        let data = match dtype {
            DType::BF16 => HostData::BF16(v.iter().map(|&x| bf16::from_f64(x)).collect()),
            DType::F16 => HostData::F16(v.iter().map(|&x| f16::from_f64(x)).collect()),
            DType::F32 => HostData::F32(v.iter().map(|&x| x as f32).collect()),
            DType::F64 => HostData::F64(v),
        };
        HostTensor {
            shape: self.shape.clone(),
            data,
        }
    }

    /// Matrices stacked along rows: `[r1, c] ++ [r2, c] -> [r1 + r2, c]`, all in the dtype of the
    /// first. Used to fuse projection weights (q/k/v, gate/up) at load time.
    pub fn concat_rows(parts: &[&HostTensor]) -> Result<HostTensor> {
        let first = parts
            .first()
            .ok_or_else(|| Error::invalid("concat_rows", "no tensors"))?;
        let (_, cols) = first.shape.as_matrix("concat_rows")?;
        let dtype = first.dtype();
        let mut rows = 0;
        for p in parts {
            let (r, c) = p.shape.as_matrix("concat_rows")?;
            if c != cols || p.dtype() != dtype {
                return Err(Error::shape("concat_rows", &first.shape, &p.shape));
            }
            rows += r;
        }
        macro_rules! cat {
            ($variant:ident) => {{
                let mut out = Vec::with_capacity(rows * cols);
                for p in parts {
                    if let HostData::$variant(v) = &p.data {
                        out.extend_from_slice(v);
                    }
                }
                HostData::$variant(out)
            }};
        }
        let data = match dtype {
            DType::BF16 => cat!(BF16),
            DType::F16 => cat!(F16),
            DType::F32 => cat!(F32),
            DType::F64 => cat!(F64),
        };
        HostTensor::new([rows, cols], data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn le_bytes_round_trip_for_every_dtype() {
        let vals = [1.5, -2.0, 8192.0, 0.0078125];
        let t = HostTensor::from_f64([2, 2], vals.to_vec()).unwrap();
        for dtype in [DType::BF16, DType::F16, DType::F32, DType::F64] {
            let typed = t.to_dtype(dtype);
            let bytes: Vec<u8> = match typed.data() {
                HostData::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                HostData::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                HostData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                HostData::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            };
            let back = HostTensor::from_le_bytes([2, 2], dtype, &bytes).unwrap();
            assert_eq!(back.to_f64_vec(), vals, "{dtype}");
        }
    }

    #[test]
    fn wrong_byte_count_is_an_error() {
        let err = HostTensor::from_le_bytes([3], DType::F32, &[0u8; 8]).unwrap_err();
        assert!(err.to_string().contains("needs 12 bytes, got 8"), "{err}");
    }

    #[test]
    fn concat_rows_stacks_and_checks_columns() {
        let a = HostTensor::from_f64([1, 2], vec![1.0, 2.0]).unwrap();
        let b = HostTensor::from_f64([2, 2], vec![3.0, 4.0, 5.0, 6.0]).unwrap();
        let c = HostTensor::concat_rows(&[&a, &b]).unwrap();
        assert_eq!(c.shape().dims(), &[3, 2]);
        assert_eq!(c.to_f64_vec(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let odd = HostTensor::from_f64([1, 3], vec![0.0; 3]).unwrap();
        assert!(HostTensor::concat_rows(&[&a, &odd]).is_err());
    }
}
