//! The factor naming contract, parsed and formatted here only.
//!
//! The rewrite names every factor after the layer it replaces: `<layer>/<kind>/<role>` for the
//! node, with `.weight` for its initializer and `_out` for the value it produces, e.g.
//! `layer1.0.conv1/tucker2/u1`, `layer1.0.conv1/tucker2/u1.weight`,
//! `layer1.0.conv1/tucker2/u1_out`. The kinds are `tucker2` (roles `u1`, `core`, `u2`), `cp`
//! (`u1`, `vertical`, `horizontal`, `u2`) and `svd` (`u1`, `u2`: a 1x1 conv's or a Gemm's two
//! factors). The export's merged forms of a Tucker-2 layer keep the layer and kind with a
//! merged role (`u1_core`, `core_u2`) and may add `.bias`.
//!
//! Readers: training (which weights keep the converter's init, which matrices DSO holds),
//! the export (a chain's source layer, the names of merged forms) and `inspect` (a converted
//! model's params grouped under the layer they replace).

use std::fmt;

/// The factorization a factor belongs to: the middle segment of its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FactorKind {
    Tucker2,
    Cp,
    /// Two factors of a 1x1 conv or a Gemm.
    Svd,
}

impl FactorKind {
    pub const ALL: [FactorKind; 3] = [FactorKind::Tucker2, FactorKind::Cp, FactorKind::Svd];

    /// The segment in names: `tucker2`, `cp`, `svd`.
    pub fn tag(self) -> &'static str {
        match self {
            FactorKind::Tucker2 => "tucker2",
            FactorKind::Cp => "cp",
            FactorKind::Svd => "svd",
        }
    }

    fn from_tag(tag: &str) -> Option<FactorKind> {
        FactorKind::ALL.into_iter().find(|k| k.tag() == tag)
    }

    /// The roles a name of this kind may carry (the rewrite's, then the export's merged ones).
    pub fn roles(self) -> &'static [FactorRole] {
        use FactorRole::*;
        match self {
            FactorKind::Tucker2 => &[U1, Core, U2, U1Core, CoreU2],
            FactorKind::Cp => &[U1, Vertical, Horizontal, U2],
            FactorKind::Svd => &[U1, U2],
        }
    }
}

/// A factor's place in its layer: the last segment of its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FactorRole {
    /// 1x1, C_in -> r (r_in for Tucker-2).
    U1,
    /// Tucker-2's kxk core, r_in -> r_out.
    Core,
    /// CP's kx1 depthwise factor.
    Vertical,
    /// CP's 1xk depthwise factor.
    Horizontal,
    /// 1x1, r -> C_out, with the layer's bias.
    U2,
    /// The export's merge of `core` into `u1` (form merge-first).
    U1Core,
    /// The export's merge of `core` into `u2` (form merge-last).
    CoreU2,
}

impl FactorRole {
    pub fn as_str(self) -> &'static str {
        match self {
            FactorRole::U1 => "u1",
            FactorRole::Core => "core",
            FactorRole::Vertical => "vertical",
            FactorRole::Horizontal => "horizontal",
            FactorRole::U2 => "u2",
            FactorRole::U1Core => "u1_core",
            FactorRole::CoreU2 => "core_u2",
        }
    }
}

/// What follows the role in an initializer's name.
pub const WEIGHT: &str = ".weight";
/// What follows the role in a bias initializer's name (the export's merged forms).
pub const BIAS: &str = ".bias";
/// What follows the role in the name of the value a factor produces.
pub const OUT: &str = "_out";

/// A name in the contract: `<layer>/<kind>/<role><rest>`, where `rest` is empty (a node),
/// [`WEIGHT`], [`BIAS`], [`OUT`], or such a suffix made unique (`.weight.1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FactorName<'a> {
    pub layer: &'a str,
    pub kind: FactorKind,
    pub role: FactorRole,
    pub rest: &'a str,
}

impl<'a> FactorName<'a> {
    /// The node name `<layer>/<kind>/<role>`.
    pub fn node(layer: &'a str, kind: FactorKind, role: FactorRole) -> Self {
        FactorName {
            layer,
            kind,
            role,
            rest: "",
        }
    }

    /// The same factor with another suffix ([`WEIGHT`], [`BIAS`], [`OUT`]).
    pub fn with(self, rest: &'a str) -> Self {
        FactorName { rest, ..self }
    }

    /// Parses a node, initializer or value name; `None` when it is not a factor's. The layer
    /// is everything before the last two segments, so a factor of a factor
    /// (`l/tucker2/core/tucker2/u1`) names the factor it replaces as its layer.
    pub fn parse(name: &'a str) -> Option<Self> {
        let (head, last) = name.rsplit_once('/')?;
        let (layer, tag) = head.rsplit_once('/')?;
        let kind = FactorKind::from_tag(tag)?;
        // Longest role first: `u1_core` is not `u1` followed by `_core`.
        let role = kind
            .roles()
            .iter()
            .copied()
            .filter(|r| last.starts_with(r.as_str()))
            .max_by_key(|r| r.as_str().len())?;
        let rest = &last[role.as_str().len()..];
        (rest.is_empty() || rest.starts_with('.') || rest.starts_with(OUT)).then_some(FactorName {
            layer,
            kind,
            role,
            rest,
        })
    }

    /// The layer a converted model's factor stands for in the source model: the layer, with
    /// the factor parts of a factor of a factor removed too.
    pub fn source_layer(&self) -> &'a str {
        let mut layer = self.layer;
        while let Some(f) = FactorName::parse(layer).filter(|f| f.rest.is_empty()) {
            layer = f.layer;
        }
        layer
    }

    /// Whether this is a factor's weight initializer.
    pub fn is_weight(&self) -> bool {
        self.rest == WEIGHT
    }
}

impl fmt::Display for FactorName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}{}",
            self.layer,
            self.kind.tag(),
            self.role.as_str(),
            self.rest
        )
    }
}

/// Whether an initializer is a low-rank factor weight written by the converter (or a merged
/// one written by the export): `<layer>/tucker2/{u1,core,u2}.weight`,
/// `<layer>/cp/{u1,vertical,horizontal,u2}.weight`, or the SVD factors `<layer>/svd/{u1,u2}.weight`
/// of a 1x1 conv or a Gemm.
pub fn is_factor_weight(name: &str) -> bool {
    FactorName::parse(name).is_some_and(|f| f.is_weight())
}

/// Whether a node is a factor that another factor of its layer follows (Tucker-2's `u1` and
/// `core`, CP's `u1` and depthwise pair, SVD's `u1`, or any factor of such a factor): the
/// layer's output is its `u2`'s. A BatchNormalization that belongs after the layer belongs
/// after the chain, never inside it.
pub fn is_inner_factor(node_name: &str) -> bool {
    let Some(f) = FactorName::parse(node_name).filter(|f| f.rest.is_empty()) else {
        return false;
    };
    !matches!(f.role, FactorRole::U2 | FactorRole::CoreU2) || is_inner_factor(f.layer)
}

#[cfg(test)]
mod tests {
    #[test]
    fn inner_factors_are_all_but_each_chains_last() {
        for inner in [
            "l/tucker2/u1",
            "l/tucker2/core",
            "l/cp/u1",
            "l/cp/vertical",
            "l/cp/horizontal",
            "l/svd/u1",
            "l/tucker2/u1_core",
            "l/tucker2/core/tucker2/u2",
        ] {
            assert!(is_inner_factor(inner), "{inner}");
        }
        for last in [
            "l/tucker2/u2",
            "l/cp/u2",
            "l/svd/u2",
            "l/tucker2/core_u2",
            "l/tucker2/u2/svd/u2",
            "layer1.0.conv1",
            "l/tucker2/u1.weight",
        ] {
            assert!(!is_inner_factor(last), "{last}");
        }
    }

    use super::*;

    #[test]
    fn every_kind_and_role_round_trips() {
        for kind in FactorKind::ALL {
            for &role in kind.roles() {
                for rest in ["", WEIGHT, BIAS, OUT, ".weight.1"] {
                    for layer in ["layer1.0.conv1", "/features/features.1/Conv", "", "a/b"] {
                        let f = FactorName::node(layer, kind, role).with(rest);
                        let s = f.to_string();
                        assert_eq!(FactorName::parse(&s), Some(f), "{s}");
                    }
                }
            }
        }
    }

    #[test]
    fn formats_the_converters_names() {
        let f = FactorName::node("layer1.0.conv1", FactorKind::Tucker2, FactorRole::U1);
        assert_eq!(f.to_string(), "layer1.0.conv1/tucker2/u1");
        assert_eq!(
            f.with(WEIGHT).to_string(),
            "layer1.0.conv1/tucker2/u1.weight"
        );
        assert_eq!(f.with(OUT).to_string(), "layer1.0.conv1/tucker2/u1_out");
        let m = FactorName::node("l", FactorKind::Tucker2, FactorRole::CoreU2).with(BIAS);
        assert_eq!(m.to_string(), "l/tucker2/core_u2.bias");
        let c = FactorName::node("fc", FactorKind::Svd, FactorRole::U2).with(WEIGHT);
        assert_eq!(c.to_string(), "fc/svd/u2.weight");
    }

    #[test]
    fn parses_roles_and_refuses_other_names() {
        let f = FactorName::parse("l/tucker2/u1_core_out").unwrap();
        assert_eq!((f.role, f.rest), (FactorRole::U1Core, OUT));
        let f = FactorName::parse("l/cp/horizontal.weight").unwrap();
        assert_eq!(
            (f.layer, f.kind, f.role),
            ("l", FactorKind::Cp, FactorRole::Horizontal)
        );
        for name in [
            "conv1.weight",
            "l/tucker2",
            "tucker2/u1",
            "l/dense.weight",
            "l/cp/core.weight",      // not a CP role
            "l/svd/u1_core.weight",  // a merged role of Tucker-2 only
            "l/tucker2/u1x.weight",  // a longer word, not the role
            "l/tucker2/x/u1.weight", // the kind is not the second-last segment
            "/layer1/cp/Conv",       // a scope named like a kind
            "l/TUCKER2/u1.weight",
        ] {
            assert_eq!(FactorName::parse(name), None, "{name}");
        }
    }

    #[test]
    fn factor_weights_and_source_layers() {
        assert!(is_factor_weight("l/tucker2/core.weight"));
        assert!(is_factor_weight("l/svd/u2.weight"));
        assert!(is_factor_weight("l/tucker2/u1_core.weight"));
        assert!(!is_factor_weight("l/tucker2/u1"));
        assert!(!is_factor_weight("l/tucker2/u1_out"));
        assert!(!is_factor_weight("l/tucker2/u2.bias"));
        assert!(!is_factor_weight("l/tucker2/u2.weight.1"));
        assert!(!is_factor_weight("conv.weight"));
        let nested = FactorName::parse("l.conv/tucker2/core/svd/u1.weight").unwrap();
        assert_eq!(nested.layer, "l.conv/tucker2/core");
        assert_eq!(nested.source_layer(), "l.conv");
    }
}
