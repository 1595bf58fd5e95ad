//! TensorProto <-> [`Tensor`], covering raw_data and the typed repeated fields.

use anyhow::{bail, Context, Result};
use onnx_protobuf::TensorProto;

use crate::ir::{ElemType, Tensor};

fn dims(t: &TensorProto) -> Result<Vec<usize>> {
    t.dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| anyhow::anyhow!("negative dimension {d}")))
        .collect()
}

/// Splits raw little-endian bytes into `n` chunks of `N` bytes.
fn raw_chunks<const N: usize>(raw: &[u8], n: usize) -> Result<impl Iterator<Item = [u8; N]> + '_> {
    if raw.len() != n * N {
        bail!(
            "raw_data holds {} bytes, but the shape needs {} elements of {} bytes",
            raw.len(),
            n,
            N
        );
    }
    Ok(raw
        .chunks_exact(N)
        .map(|c| c.try_into().expect("chunk size")))
}

/// Decodes a tensor. Integer and boolean types widen to i64, float64 narrows to f32;
/// float16 is rejected with a reason; external data must have been inlined first
/// ([`super::external::load`]).
pub fn from_proto(t: &TensorProto) -> Result<Tensor> {
    let shape = dims(t)?;
    let n: usize = shape.iter().product();
    if super::external::is_external(t) {
        bail!("its data is stored in an external file; read the model from its path so that the file beside it is found");
    }
    let elem = ElemType::from_onnx(t.data_type)
        .with_context(|| format!("unknown data type code {}", t.data_type))?;
    let raw = &t.raw_data;
    let has_raw = !raw.is_empty() || n == 0;
    let check = |len: usize| -> Result<()> {
        if len != n {
            bail!("holds {len} values, but its shape {shape:?} needs {n}");
        }
        Ok(())
    };
    match elem {
        ElemType::F32 => {
            let v: Vec<f32> = if has_raw && t.float_data.is_empty() {
                raw_chunks::<4>(raw, n)?.map(f32::from_le_bytes).collect()
            } else {
                check(t.float_data.len())?;
                t.float_data.clone()
            };
            Tensor::f32(&shape, v)
        }
        ElemType::F64 => {
            let v: Vec<f32> = if has_raw && t.double_data.is_empty() {
                raw_chunks::<8>(raw, n)?
                    .map(|b| f64::from_le_bytes(b) as f32)
                    .collect()
            } else {
                check(t.double_data.len())?;
                t.double_data.iter().map(|&v| v as f32).collect()
            };
            Tensor::f32(&shape, v)
        }
        ElemType::I64 => {
            let v: Vec<i64> = if has_raw && t.int64_data.is_empty() {
                raw_chunks::<8>(raw, n)?.map(i64::from_le_bytes).collect()
            } else {
                check(t.int64_data.len())?;
                t.int64_data.clone()
            };
            Tensor::i64(&shape, v)
        }
        ElemType::U64 => {
            let v: Vec<i64> = if has_raw && t.uint64_data.is_empty() {
                raw_chunks::<8>(raw, n)?
                    .map(|b| u64::from_le_bytes(b) as i64)
                    .collect()
            } else {
                check(t.uint64_data.len())?;
                t.uint64_data.iter().map(|&v| v as i64).collect()
            };
            Tensor::i64(&shape, v)
        }
        ElemType::I32
        | ElemType::I16
        | ElemType::I8
        | ElemType::U8
        | ElemType::U16
        | ElemType::Bool
        | ElemType::U32 => {
            let v: Vec<i64> = if has_raw && t.int32_data.is_empty() {
                match elem {
                    ElemType::I32 => raw_chunks::<4>(raw, n)?
                        .map(|b| i32::from_le_bytes(b) as i64)
                        .collect(),
                    ElemType::U32 => raw_chunks::<4>(raw, n)?
                        .map(|b| u32::from_le_bytes(b) as i64)
                        .collect(),
                    ElemType::I16 => raw_chunks::<2>(raw, n)?
                        .map(|b| i16::from_le_bytes(b) as i64)
                        .collect(),
                    ElemType::U16 => raw_chunks::<2>(raw, n)?
                        .map(|b| u16::from_le_bytes(b) as i64)
                        .collect(),
                    ElemType::I8 => raw_chunks::<1>(raw, n)?
                        .map(|b| b[0] as i8 as i64)
                        .collect(),
                    _ => raw_chunks::<1>(raw, n)?.map(|b| b[0] as i64).collect(),
                }
            } else {
                check(t.int32_data.len())?;
                t.int32_data.iter().map(|&v| v as i64).collect()
            };
            Tensor::i64(&shape, v)
        }
        ElemType::F16 | ElemType::BF16 => {
            bail!(
                "{} tensors are not supported (export the model in float32)",
                elem.name()
            )
        }
    }
}

/// Encodes a tensor as raw little-endian data (f32 or i64).
pub fn to_proto(name: &str, t: &Tensor) -> TensorProto {
    let mut p = TensorProto::new();
    p.name = name.to_string();
    p.dims = t.shape().iter().map(|&d| d as i64).collect();
    match t {
        Tensor::F32(a) => {
            p.data_type = ElemType::F32.onnx_code();
            p.raw_data = a.iter().flat_map(|v| v.to_le_bytes()).collect();
        }
        Tensor::I64(a) => {
            p.data_type = ElemType::I64.onnx_code();
            p.raw_data = a.iter().flat_map(|v| v.to_le_bytes()).collect();
        }
    }
    p
}
