//! Double soft orthogonality (DSO), ELRT's regulariser on the factor matrices:
//! R(A) = rho / r * (||A^T A - I||_F^2 + ||A A^T - I||_F^2), on U1 and U2 of every Tucker-2
//! layer and the 1x1 factors of every CP layer. Its gradient is
//! dR/dA = rho / r * 4 (A (A^T A - I) + (A A^T - I) A).
//! Both terms are used because a factor matrix is tall or wide: only one of the two Gram
//! matrices can reach the identity, and the other keeps the spectrum from collapsing.

use ndarray::{Array2, ArrayView2, Ix2};

use super::naming::{FactorName, FactorRole};
use crate::engine::program::Program;

/// One factor matrix under DSO: a parameter and its rank r.
#[derive(Clone, Debug, PartialEq)]
pub struct OrthTerm {
    pub param: usize,
    pub rank: usize,
}

/// The factor matrices of the program's low-rank layers, found by their names
/// (`<layer>/tucker2/u1.weight`, `/u2.weight`, `<layer>/cp/u1.weight`, `/u2.weight`, and a 1x1
/// conv's SVD factors `<layer>/svd/u1.weight`, `/u2.weight`).
pub fn terms(program: &Program) -> Vec<OrthTerm> {
    program
        .params
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let s = p.value.shape();
            let f = FactorName::parse(&p.name).filter(FactorName::is_weight);
            let is_u1 = f.is_some_and(|f| f.role == FactorRole::U1);
            let is_u2 = f.is_some_and(|f| f.role == FactorRole::U2);
            if !(s.len() == 4 || s.len() == 2) || !(is_u1 || is_u2) {
                return None;
            }
            // U1 is [r, C_in, 1, 1]; U2 is [C_out, r, 1, 1] (a Gemm's SVD: [r, in], [out, r]).
            let rank = if is_u1 { s[0] } else { s[1] };
            Some(OrthTerm { param: i, rank })
        })
        .collect()
}

/// Takes the matrices under DSO out of weight decay (`--orth-no-decay`): DSO already holds
/// their scale, and decay pulls their singular values below the 1 that DSO aims at. Cores and
/// every other weight keep their decay.
pub fn exempt_from_decay(program: &mut Program, terms: &[OrthTerm]) {
    for t in terms {
        program.params[t.param].decay = false;
    }
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

/// Adds DSO's gradient to the parameters' gradients; returns the total penalty.
pub fn apply(program: &mut Program, terms: &[OrthTerm], rho: f32) -> f64 {
    if rho == 0.0 {
        return 0.0;
    }
    let mut total = 0.0;
    for t in terms {
        let p = &mut program.params[t.param];
        let s = p.value.shape().to_vec();
        let a = p
            .value
            .view()
            .into_shape_with_order((s[0], s[1]))
            .expect("a 1x1 factor is a matrix")
            .into_dimensionality::<Ix2>()
            .expect("2-D");
        let (v, g) = penalty(a, rho, t.rank);
        total += v;
        let g = g
            .into_shape_with_order(p.grad.raw_dim())
            .expect("same size");
        p.grad += &g;
    }
    total
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
