//! A trainable model: the simplified graph plus a compiled session for one batch size.

use std::path::Path;

use anyhow::{Context, Result};
use ndarray::ArrayD;

use super::backend::{Backend, CpuBackend};
use super::exec::{Mode, Session};
use super::program::Program;
use crate::ir::fold::{simplify, FoldOptions};
use crate::ir::shape::default_input_shapes;
use crate::ir::Graph;

/// `B` is the backend the session computes on (the CPU unless said otherwise).
pub struct Model<B: Backend = CpuBackend> {
    /// The graph as trained (constants folded, Identity removed, Dropout kept).
    pub graph: Graph,
    pub session: Session<B>,
    /// Input shape `[N, C, H, W]` the program was compiled for.
    pub input_shape: Vec<usize>,
    pub classes: usize,
}

impl Model<CpuBackend> {
    pub fn load(path: &Path, batch: usize) -> Result<Model> {
        let g = crate::onnx::read_file(path)?;
        Model::from_graph(g, batch).with_context(|| path.display().to_string())
    }

    pub fn from_graph(graph: Graph, batch: usize) -> Result<Model> {
        Model::from_graph_on(CpuBackend, graph, batch)
    }
}

impl<B: Backend> Model<B> {
    /// The model compiled for `batch` images, its session on `backend`.
    pub fn from_graph_on(backend: B, mut graph: Graph, batch: usize) -> Result<Model<B>> {
        one_image_input(&graph)?;
        let mut shapes = default_input_shapes(&graph)?;
        if let Some(s) = shapes.first_mut() {
            s[0] = batch;
        }
        let facts = simplify(
            &mut graph,
            &shapes,
            FoldOptions {
                remove_dropout: false,
            },
        )?;
        let program = Program::compile(&graph, &facts)?;
        let classes = program.classes(&facts, &graph);
        Ok(Model {
            input_shape: shapes[0].clone(),
            session: Session::with_backend(backend, program),
            graph,
            classes,
        })
    }

    /// The logits (before a final Softmax the file may have, see [`super::program::Head`]).
    pub fn forward(&mut self, x: ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>> {
        self.session.forward(x, mode)
    }

    /// What the file outputs: the logits with the file's final Softmax, if any, applied.
    pub fn forward_output(&mut self, x: ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>> {
        let logits = self.session.forward(x, mode)?;
        Ok(self.session.program.file_output(logits))
    }

    /// The graph with the current weights and statistics.
    pub fn trained_graph(&self) -> Graph {
        let mut g = self.graph.clone();
        let backend = &self.session.backend;
        self.session
            .program
            .store_with(&mut g, |t| backend.download(t));
        g
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        crate::onnx::write_file(&self.trained_graph(), path)
    }
}

/// elrt trains and runs classifiers of one image input: a graph with more is refused naming
/// its inputs, before shape inference fails inside it less clearly.
pub fn one_image_input(graph: &Graph) -> Result<()> {
    if graph.inputs.len() != 1 {
        anyhow::bail!(
            "the model has {} inputs ({}); elrt trains and runs image classifiers with one image input",
            graph.inputs.len(),
            graph
                .inputs
                .iter()
                .map(|i| format!("'{}'", i.name))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
