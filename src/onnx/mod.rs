//! ONNX in and out: protobuf ([`onnx_protobuf`]) <-> [`crate::ir::Graph`].

pub(crate) mod act_fuse;
mod attrs;
mod dynamo_restore;
pub mod external;
mod group_norm;
pub mod read;
mod stochastic_depth;
mod tensor;
mod untie;
pub mod write;

pub use read::{read_bytes, read_bytes_in, read_file};
pub use write::{write_bytes, write_file};
