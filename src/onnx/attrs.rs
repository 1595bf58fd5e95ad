//! Typed access to a node's attributes, with errors that name the attribute.

use anyhow::{bail, Result};
use onnx_protobuf::{attribute_proto::AttributeType, AttributeProto, NodeProto};

use super::tensor;
use crate::ir::Tensor;

/// A node's attributes by name.
pub struct Attrs<'a> {
    list: &'a [AttributeProto],
}

impl<'a> Attrs<'a> {
    pub fn new(node: &'a NodeProto) -> Self {
        Attrs {
            list: &node.attribute,
        }
    }

    fn get(&self, name: &str) -> Option<&'a AttributeProto> {
        self.list.iter().find(|a| a.name == name)
    }

    fn kind(a: &AttributeProto) -> Option<AttributeType> {
        a.type_.enum_value().ok()
    }

    pub fn int(&self, name: &str) -> Result<Option<i64>> {
        match self.get(name) {
            None => Ok(None),
            Some(a) => match Self::kind(a) {
                Some(AttributeType::INT) | Some(AttributeType::UNDEFINED) => Ok(Some(a.i)),
                _ => bail!("attribute '{name}' should be an int"),
            },
        }
    }

    pub fn int_or(&self, name: &str, default: i64) -> Result<i64> {
        Ok(self.int(name)?.unwrap_or(default))
    }

    pub fn float(&self, name: &str) -> Result<Option<f32>> {
        match self.get(name) {
            None => Ok(None),
            Some(a) => match Self::kind(a) {
                Some(AttributeType::FLOAT) | Some(AttributeType::UNDEFINED) => Ok(Some(a.f)),
                _ => bail!("attribute '{name}' should be a float"),
            },
        }
    }

    pub fn float_or(&self, name: &str, default: f32) -> Result<f32> {
        Ok(self.float(name)?.unwrap_or(default))
    }

    pub fn ints(&self, name: &str) -> Result<Option<Vec<i64>>> {
        match self.get(name) {
            None => Ok(None),
            Some(a) => match Self::kind(a) {
                Some(AttributeType::INTS) | Some(AttributeType::UNDEFINED) => {
                    Ok(Some(a.ints.clone()))
                }
                _ => bail!("attribute '{name}' should be a list of ints"),
            },
        }
    }

    /// Non-negative ints (kernel sizes, strides, pads, dilations).
    pub fn usizes(&self, name: &str) -> Result<Option<Vec<usize>>> {
        match self.ints(name)? {
            None => Ok(None),
            Some(v) => v
                .iter()
                .map(|&x| {
                    usize::try_from(x)
                        .map_err(|_| anyhow::anyhow!("attribute '{name}' has a negative value {x}"))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
        }
    }

    pub fn string(&self, name: &str) -> Result<Option<String>> {
        match self.get(name) {
            None => Ok(None),
            Some(a) => match Self::kind(a) {
                Some(AttributeType::STRING) | Some(AttributeType::UNDEFINED) => {
                    Ok(Some(String::from_utf8_lossy(&a.s).into_owned()))
                }
                _ => bail!("attribute '{name}' should be a string"),
            },
        }
    }

    pub fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        match self.get(name) {
            None => Ok(None),
            Some(a) => match a.t.as_ref() {
                Some(t) => Ok(Some(tensor::from_proto(t)?)),
                None => bail!("attribute '{name}' should be a tensor"),
            },
        }
    }

    pub fn names(&self) -> impl Iterator<Item = &'a str> {
        self.list.iter().map(|a| a.name.as_str())
    }
}

/// Attribute constructors for the writer.
pub mod make {
    use super::*;

    fn base(name: &str, t: AttributeType) -> AttributeProto {
        let mut a = AttributeProto::new();
        a.name = name.to_string();
        a.type_ = t.into();
        a
    }

    pub fn int(name: &str, v: i64) -> AttributeProto {
        let mut a = base(name, AttributeType::INT);
        a.i = v;
        a
    }

    pub fn float(name: &str, v: f32) -> AttributeProto {
        let mut a = base(name, AttributeType::FLOAT);
        a.f = v;
        a
    }

    pub fn ints(name: &str, v: &[i64]) -> AttributeProto {
        let mut a = base(name, AttributeType::INTS);
        a.ints = v.to_vec();
        a
    }

    pub fn usizes(name: &str, v: &[usize]) -> AttributeProto {
        ints(name, &v.iter().map(|&x| x as i64).collect::<Vec<_>>())
    }

    pub fn string(name: &str, v: &str) -> AttributeProto {
        let mut a = base(name, AttributeType::STRING);
        a.s = v.as_bytes().to_vec();
        a
    }

    pub fn tensor(name: &str, v: &Tensor) -> AttributeProto {
        let mut a = base(name, AttributeType::TENSOR);
        a.t = Some(super::tensor::to_proto("", v)).into();
        a
    }
}
