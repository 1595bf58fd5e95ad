//! What a run leaves for people to read: the training curve (`curve`).

pub mod curve;
