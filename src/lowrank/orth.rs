//! Double soft orthogonality (DSO), ELRT's regulariser on the factor matrices:
//! R(A) = rho / r * (||A^T A - I||_F^2 + ||A A^T - I||_F^2), on U1 and U2 of every Tucker-2
//! layer and the 1x1 factors of every CP layer. Its gradient is
//! dR/dA = rho / r * 4 (A (A^T A - I) + (A A^T - I) A).
//! Both terms are used because a factor matrix is tall or wide: only one of the two Gram
//! matrices can reach the identity, and the other keeps the spectrum from collapsing.

use ndarray::{Array2, ArrayD, ArrayView2, Ix2};

use super::naming::{FactorName, FactorRole};

/// One factor matrix under DSO: a parameter (its position among the parameters given to
/// [`terms`]) and its rank r.
#[derive(Clone, Debug, PartialEq)]
pub struct OrthTerm {
    pub param: usize,
    pub rank: usize,
}

/// The factor matrices among named parameters `(name, shape)`, found by their names
/// (`<layer>/tucker2/u1.weight`, `/u2.weight`, `<layer>/cp/u1.weight`, `/u2.weight`, and a 1x1
/// conv's SVD factors `<layer>/svd/u1.weight`, `/u2.weight`). The engine's parameters are
/// handed over by the training side (`crate::train::dso`), so that this module works on names
/// and plain arrays and does not depend on the engine.
pub fn terms<'a>(params: impl IntoIterator<Item = (&'a str, &'a [usize])>) -> Vec<OrthTerm> {
    params
        .into_iter()
        .enumerate()
        .filter_map(|(i, (name, s))| {
            let f = FactorName::parse(name).filter(FactorName::is_weight);
            let is_u1 = f.is_some_and(|f| f.role == FactorRole::U1);
            let is_u2 = f.is_some_and(|f| f.role == FactorRole::U2);
            if !(s.len() == 4 || s.len() == 2) || !(is_u1 || is_u2) {
                return None;
            }
            // U1 is [r, C_in, 1, 1]; U2 is [C_out, r, 1, 1]. A 2-D factor is a Gemm's ([r, in],
            // [out, r]) or a MatMul's ([in, r], [r, out]): r is its smaller side, as ranks
            // never exceed a layer's channels (and the penalty is the same for A and A^T).
            let rank = match (s.len(), is_u1) {
                (2, _) => s[0].min(s[1]),
                (_, true) => s[0],
                _ => s[1],
            };
            Some(OrthTerm { param: i, rank })
        })
        .collect()
}

/// The penalty of one matrix and its gradient.
pub fn penalty(a: ArrayView2<f32>, rho: f32, rank: usize) -> (f64, Array2<f32>) {
    let (m, n) = a.dim();
    let ata = a.t().dot(&a) - Array2::<f32>::eye(n);
    let aat = a.dot(&a.t()) - Array2::<f32>::eye(m);
    let c = rho / rank as f32;
    let value = c as f64
        * (ata.iter().map(|v| (*v as f64).powi(2)).sum::<f64>()
            + aat.iter().map(|v| (*v as f64).powi(2)).sum::<f64>());
    let grad = (a.dot(&ata) + aat.dot(&a)) * (4.0 * c);
    (value, grad)
}

/// DSO on one factor weight (a 1x1 factor `[r, C_in, 1, 1]` / `[C_out, r, 1, 1]`, or a Gemm's
/// 2-D factor) of rank `rank`: adds the gradient to `grad` (same shape); returns the penalty.
pub fn add_gradient(value: &ArrayD<f32>, grad: &mut ArrayD<f32>, rho: f32, rank: usize) -> f64 {
    let s = value.shape();
    let a = value
        .view()
        .into_shape_with_order((s[0], s[1]))
        .expect("a 1x1 factor is a matrix")
        .into_dimensionality::<Ix2>()
        .expect("2-D");
    let (v, g) = penalty(a, rho, rank);
    let g = g.into_shape_with_order(grad.raw_dim()).expect("same size");
    *grad += &g;
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn gradient_matches_finite_differences_and_orthogonal_is_a_minimum() {
        let mut r = Rng::new(5);
        for (m, n) in [(8, 5), (5, 8), (6, 6)] {
            let a = Array2::from_shape_fn((m, n), |_| 0.4 * r.normal());
            let (_, g) = penalty(a.view(), 0.7, 4);
            let eps = 1e-2f32;
            for i in 0..m {
                for j in 0..n {
                    let mut ap = a.clone();
                    ap[[i, j]] += eps;
                    let mut am = a.clone();
                    am[[i, j]] -= eps;
                    let fd = (penalty(ap.view(), 0.7, 4).0 - penalty(am.view(), 0.7, 4).0)
                        / (2.0 * eps as f64);
                    let an = g[[i, j]] as f64;
                    assert!(
                        (fd - an).abs() <= 1e-3 * fd.abs().max(an.abs()).max(1.0),
                        "{fd} vs {an}"
                    );
                }
            }
        }
        // A square orthogonal matrix has zero penalty and zero gradient.
        let q = crate::lowrank::decompose::orthogonal(6, 6, &mut r);
        let (v, g) = penalty(q.view(), 1.0, 6);
        assert!(v < 1e-8 && g.iter().all(|x| x.abs() < 1e-4), "{v}");
    }
}
