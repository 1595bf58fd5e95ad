//! Constant tensors held by the IR: initializers and folded constants.
//!
//! Only two storage types exist: f32 for weights and activations, i64 for shape arithmetic.
//! ONNX's other integer and boolean types are widened to i64 on read, and other float types are
//! rejected, because a CNN classifier has no use for them and a narrow core is easier to keep
//! correct. [`ElemType`] still names every ONNX type so that `Cast` and graph inputs round-trip.

use anyhow::{bail, Result};
use ndarray::{ArrayD, IxDyn};

/// An ONNX element type, by its `TensorProto.DataType` code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElemType {
    F32,
    U8,
    I8,
    U16,
    I16,
    I32,
    I64,
    Bool,
    F16,
    F64,
    U32,
    U64,
    BF16,
}

impl ElemType {
    pub fn from_onnx(code: i32) -> Option<ElemType> {
        Some(match code {
            1 => ElemType::F32,
            2 => ElemType::U8,
            3 => ElemType::I8,
            4 => ElemType::U16,
            5 => ElemType::I16,
            6 => ElemType::I32,
            7 => ElemType::I64,
            9 => ElemType::Bool,
            10 => ElemType::F16,
            11 => ElemType::F64,
            12 => ElemType::U32,
            13 => ElemType::U64,
            16 => ElemType::BF16,
            _ => return None,
        })
    }

    pub fn onnx_code(self) -> i32 {
        match self {
            ElemType::F32 => 1,
            ElemType::U8 => 2,
            ElemType::I8 => 3,
            ElemType::U16 => 4,
            ElemType::I16 => 5,
            ElemType::I32 => 6,
            ElemType::I64 => 7,
            ElemType::Bool => 9,
            ElemType::F16 => 10,
            ElemType::F64 => 11,
            ElemType::U32 => 12,
            ElemType::U64 => 13,
            ElemType::BF16 => 16,
        }
    }

    /// Whether values of this type are stored as f32 (true) or i64 (false) in the IR.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            ElemType::F32 | ElemType::F16 | ElemType::F64 | ElemType::BF16
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            ElemType::F32 => "float32",
            ElemType::U8 => "uint8",
            ElemType::I8 => "int8",
            ElemType::U16 => "uint16",
            ElemType::I16 => "int16",
            ElemType::I32 => "int32",
            ElemType::I64 => "int64",
            ElemType::Bool => "bool",
            ElemType::F16 => "float16",
            ElemType::F64 => "float64",
            ElemType::U32 => "uint32",
            ElemType::U64 => "uint64",
            ElemType::BF16 => "bfloat16",
        }
    }
}

/// A constant tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    F32(ArrayD<f32>),
    I64(ArrayD<i64>),
}

impl Tensor {
    pub fn f32(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        match ArrayD::from_shape_vec(IxDyn(shape), data) {
            Ok(a) => Ok(Tensor::F32(a)),
            Err(_) => bail!(
                "{} values do not fill shape {:?}",
                shape.iter().product::<usize>(),
                shape
            ),
        }
    }

    pub fn i64(shape: &[usize], data: Vec<i64>) -> Result<Tensor> {
        match ArrayD::from_shape_vec(IxDyn(shape), data) {
            Ok(a) => Ok(Tensor::I64(a)),
            Err(_) => bail!(
                "{} values do not fill shape {:?}",
                shape.iter().product::<usize>(),
                shape
            ),
        }
    }

    /// A 1-D i64 tensor, the form of every ONNX shape operand.
    pub fn i64_vec(v: &[i64]) -> Tensor {
        Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).expect("1-D shape"))
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32(a) => a.shape(),
            Tensor::I64(a) => a.shape(),
        }
    }

    pub fn len(&self) -> usize {
        self.shape().iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn elem_type(&self) -> ElemType {
        match self {
            Tensor::F32(_) => ElemType::F32,
            Tensor::I64(_) => ElemType::I64,
        }
    }

    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Some(a),
            Tensor::I64(_) => None,
        }
    }

    /// The values as i64, for tensors used as shapes, axes or indices.
    pub fn to_i64s(&self) -> Vec<i64> {
        match self {
            Tensor::F32(a) => a.iter().map(|&v| v as i64).collect(),
            Tensor::I64(a) => a.iter().copied().collect(),
        }
    }

    /// The values as f32, for scalars such as Clip bounds or a Pad value.
    pub fn to_f32s(&self) -> Vec<f32> {
        match self {
            Tensor::F32(a) => a.iter().copied().collect(),
            Tensor::I64(a) => a.iter().map(|&v| v as f32).collect(),
        }
    }

    /// Converts to the storage of `to` (f32 for float types, i64 otherwise), as ONNX Cast does.
    pub fn cast(&self, to: ElemType) -> Tensor {
        match (self, to.is_float()) {
            (Tensor::F32(a), true) => Tensor::F32(a.clone()),
            (Tensor::F32(a), false) => {
                if to == ElemType::Bool {
                    Tensor::I64(a.mapv(|v| (v != 0.0) as i64))
                } else {
                    Tensor::I64(a.mapv(|v| v as i64))
                }
            }
            (Tensor::I64(a), true) => Tensor::F32(a.mapv(|v| v as f32)),
            (Tensor::I64(a), false) => {
                if to == ElemType::Bool {
                    Tensor::I64(a.mapv(|v| (v != 0) as i64))
                } else {
                    Tensor::I64(a.clone())
                }
            }
        }
    }

    /// Same values, new shape (element count must match).
    pub fn reshaped(&self, shape: &[usize]) -> Result<Tensor> {
        match self {
            Tensor::F32(a) => Tensor::f32(shape, a.iter().copied().collect()),
            Tensor::I64(a) => Tensor::i64(shape, a.iter().copied().collect()),
        }
    }
}
