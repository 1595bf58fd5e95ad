//! The intermediate representation every stage reads: a graph of typed ops over named values,
//! with shape inference ([`shape`]), constant folding ([`fold`]) and cost ([`cost`]).

mod graph;
pub mod ops;
mod tensor;

pub use graph::{Dim, Graph, ModelMeta, Node, ValueInfo};
pub use ops::Op;
pub use tensor::{ElemType, Tensor};
pub mod batch;
pub mod bn_insert;
pub mod cost;
pub mod fold;
pub mod head;
pub mod params;
pub mod shape;
pub mod uses;
