//! The graph: nodes in topological order over named values, plus constant initializers.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{bail, Result};

use super::{ElemType, Op, Tensor};

/// One dimension of a declared input or output shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    /// A named symbolic dimension such as `batch`.
    Sym(String),
    /// A dimension the file leaves unnamed and unknown.
    Unknown,
}

/// A graph input or output as declared in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    pub elem: ElemType,
    /// None when the file declares no shape at all.
    pub shape: Option<Vec<Dim>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Unique; the reader names unnamed nodes `<op_type>_<index>`.
    pub name: String,
    pub op: Op,
    /// Value names; an empty string is an absent optional input.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

impl Node {
    /// The input at `i` if present and non-empty.
    pub fn input(&self, i: usize) -> Option<&str> {
        self.inputs
            .get(i)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }
}

/// Model-level facts carried through so a written file says where it came from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelMeta {
    pub ir_version: i64,
    pub producer_name: String,
    pub producer_version: String,
    pub domain: String,
    pub model_version: i64,
    pub doc_string: String,
    pub metadata_props: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    pub name: String,
    /// Opset of the default ONNX domain.
    pub opset: i64,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    pub nodes: Vec<Node>,
    pub initializers: BTreeMap<String, Tensor>,
    pub meta: ModelMeta,
}

impl Graph {
    /// Index of the node producing each value.
    pub fn producers(&self) -> HashMap<&str, usize> {
        let mut m = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for o in &n.outputs {
                if !o.is_empty() {
                    m.insert(o.as_str(), i);
                }
            }
        }
        m
    }

    /// Number of uses of each value (node inputs plus graph outputs).
    pub fn use_counts(&self) -> HashMap<&str, usize> {
        let mut m: HashMap<&str, usize> = HashMap::new();
        for n in &self.nodes {
            for i in n.inputs.iter().filter(|s| !s.is_empty()) {
                *m.entry(i.as_str()).or_default() += 1;
            }
        }
        for o in &self.outputs {
            *m.entry(o.name.as_str()).or_default() += 1;
        }
        m
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Checks the structural invariants every stage relies on: unique node names, each value
    /// defined once, every used value defined before use, outputs defined.
    pub fn check(&self) -> Result<()> {
        let mut defined: HashSet<&str> = HashSet::new();
        for i in &self.inputs {
            if !defined.insert(i.name.as_str()) {
                bail!("graph input '{}' is declared twice", i.name);
            }
        }
        for k in self.initializers.keys() {
            if !defined.insert(k.as_str()) {
                bail!("value '{k}' is both a graph input and an initializer");
            }
        }
        let mut names = HashSet::new();
        for n in &self.nodes {
            if !names.insert(n.name.as_str()) {
                bail!("node name '{}' is used twice", n.name);
            }
            for i in n.inputs.iter().filter(|s| !s.is_empty()) {
                if !defined.contains(i.as_str()) {
                    bail!(
                        "node '{}' ({}) reads '{}', which no initializer, graph input or earlier node provides",
                        n.name,
                        n.op.onnx_type(),
                        i
                    );
                }
            }
            for o in n.outputs.iter().filter(|s| !s.is_empty()) {
                if !defined.insert(o.as_str()) {
                    bail!("value '{}' is produced twice (node '{}')", o, n.name);
                }
            }
        }
        for o in &self.outputs {
            if !defined.contains(o.name.as_str()) {
                bail!("graph output '{}' is produced by no node", o.name);
            }
        }
        Ok(())
    }

    /// Removes nodes whose outputs nobody uses and initializers nobody reads.
    pub fn prune(&mut self) {
        loop {
            let used: HashSet<String> = self.use_counts().into_keys().map(String::from).collect();
            let before = self.nodes.len();
            self.nodes
                .retain(|n| n.outputs.iter().any(|o| !o.is_empty() && used.contains(o)));
            if self.nodes.len() == before {
                break;
            }
        }
        let used: HashSet<String> = self
            .nodes
            .iter()
            .flat_map(|n| n.inputs.iter().cloned())
            .chain(self.outputs.iter().map(|o| o.name.clone()))
            .collect();
        self.initializers.retain(|k, _| used.contains(k));
    }

    /// `want` if no initializer or node output has that name yet, else `want.1`, `want.2`...
    pub fn fresh_value_name(&self, want: &str) -> String {
        let taken = |n: &str| {
            self.initializers.contains_key(n)
                || self
                    .nodes
                    .iter()
                    .any(|node| node.outputs.iter().any(|o| o == n))
        };
        if !taken(want) {
            return want.to_string();
        }
        (1..)
            .map(|k| format!("{want}.{k}"))
            .find(|n| !taken(n))
            .expect("an unused name")
    }

    /// Replaces every use of value `from` by `to` (node inputs and graph outputs).
    pub fn rename_uses(&mut self, from: &str, to: &str) {
        for n in &mut self.nodes {
            for i in &mut n.inputs {
                if i == from {
                    *i = to.to_string();
                }
            }
        }
    }
}
