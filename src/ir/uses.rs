//! Where the uses of a node's output lead. Two questions share this walk: whether a BatchNorm's
//! shift absorbs a conv's bias (the dynamo reader's bias restore) and whether a normalization
//! rescales a conv's output (the choice of Kaiming's fan).

use std::collections::{HashMap, HashSet};

use super::Node;

/// Answers "does every use of node `i`'s output end at a node that `ends` accepts, possibly
/// through nodes that `carries` lets the walk pass?" for any `i`, memoised: one walk per
/// question (the memo holds that question's answers).
pub struct UseWalk<'a, E, C> {
    nodes: &'a [Node],
    consumers: HashMap<&'a str, Vec<usize>>,
    outputs: HashSet<&'a str>,
    /// `ends(next, value)`: the use of `value` by `next` ends the walk well.
    ends: E,
    /// `carries(from, next)`: the walk goes on from `from`'s output through `next`'s.
    carries: C,
    memo: HashMap<usize, bool>,
}

impl<'a, E, C> UseWalk<'a, E, C>
where
    E: Fn(&Node, &str) -> bool,
    C: Fn(&Node, &Node) -> bool,
{
    /// `outputs`: the graph's output names (a graph output is a use that ends nowhere).
    pub fn new(
        nodes: &'a [Node],
        outputs: impl IntoIterator<Item = &'a str>,
        ends: E,
        carries: C,
    ) -> Self {
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in nodes.iter().enumerate() {
            for v in n.inputs.iter().filter(|v| !v.is_empty()) {
                consumers.entry(v.as_str()).or_default().push(i);
            }
        }
        UseWalk {
            nodes,
            consumers,
            outputs: outputs.into_iter().collect(),
            ends,
            carries,
            memo: HashMap::new(),
        }
    }

    /// Whether node `i`'s first output is used, is no graph output, and every use of it ends
    /// well, directly or through carrying nodes.
    pub fn all_reach(&mut self, i: usize) -> bool {
        if let Some(&r) = self.memo.get(&i) {
            return r;
        }
        // Provisional answer: a graph has no cycles, and this ends any walk that meets one.
        self.memo.insert(i, false);
        let nodes = self.nodes;
        let v = nodes[i].outputs[0].as_str();
        let uses = self.consumers.get(v).cloned().unwrap_or_default();
        let r = !self.outputs.contains(v)
            && !uses.is_empty()
            && uses.iter().all(|&c| {
                (self.ends)(&nodes[c], v)
                    || ((self.carries)(&nodes[i], &nodes[c]) && self.all_reach(c))
            });
        self.memo.insert(i, r);
        r
    }
}
