//! Tensor decompositions of convolution kernels: Tucker-2 (HOSVD, HOOI) and CP (ALS), plus the
//! semi-orthogonal initialiser used for from-scratch factors.
//!
//! A conv weight `W` has shape `[C_out, C_in, kh, kw]`.
//!
//! * **Tucker-2** (modes 0 and 1 only; the small spatial modes are left whole, as in ELRT):
//!   `W[o,i,h,w] = sum_{b,a} U2[o,b] * G[b,a,h,w] * U1[i,a]` with `U1: [C_in, r_in]`,
//!   `G: [r_out, r_in, kh, kw]`, `U2: [C_out, r_out]`. It runs as a 1x1 conv with weight `U1^T`
//!   (`[r_in, C_in, 1, 1]`), the kxk core conv `G`, and a 1x1 conv with weight `U2`
//!   (`[C_out, r_out, 1, 1]`).
//! * **CP** of rank `r`: `W[o,i,h,w] = sum_a U2[o,a] * V[h,a] * H[w,a] * U1[i,a]` (the scale is
//!   absorbed into `U2`). It runs as 1x1 (`U1^T`) -> depthwise kx1 (`V^T` as `[r,1,kh,1]`) ->
//!   depthwise 1xk (`H^T` as `[r,1,1,kw]`) -> 1x1 (`U2`).
//!
//! Everything is computed in f64: the kernels arrive and leave as f32, but the SVDs, the Gram
//! matrices of CP-ALS and the error bookkeeping (`||W||^2 - ||G||^2`, which cancels) lose
//! several digits in f32, enough to break the "full-rank HOSVD reconstructs to 1e-5" contract.
//!
//! The functions return errors, not panics, for the inputs a converter can actually produce from
//! a user's model and flags: ranks of 0 or beyond the mode size, empty kernels, and non-finite
//! weights (a diverged checkpoint).

use anyhow::{bail, Context, Result};
use ndarray::{Array1, Array2, Array4, ArrayView2, ArrayView4, Axis, Zip};
use ndarray_linalg::{Cholesky, Diag, SolveTriangular, QR, SVD, UPLO};

use crate::rng::Rng;

/// Tucker-2 factors of a conv kernel: `W ~= G x_0 U2 x_1 U1`.
#[derive(Clone, Debug)]
pub struct Tucker2 {
    /// `[C_in, r_in]`, orthonormal columns when produced by [`hosvd`] / [`hooi`].
    pub u1: Array2<f32>,
    /// `[r_out, r_in, kh, kw]`.
    pub core: Array4<f32>,
    /// `[C_out, r_out]`, orthonormal columns when produced by [`hosvd`] / [`hooi`].
    pub u2: Array2<f32>,
}

impl Tucker2 {
    /// `(r_in, r_out)`.
    pub fn ranks(&self) -> (usize, usize) {
        (self.u1.ncols(), self.u2.ncols())
    }
}

/// CP factors of a conv kernel: `W[o,i,h,w] ~= sum_a u2[o,a] vert[h,a] horiz[w,a] u1[i,a]`.
#[derive(Clone, Debug)]
pub struct Cp {
    /// `[C_in, r]`, unit-norm columns.
    pub u1: Array2<f32>,
    /// `[kh, r]`, unit-norm columns.
    pub vert: Array2<f32>,
    /// `[kw, r]`, unit-norm columns.
    pub horiz: Array2<f32>,
    /// `[C_out, r]`; carries the component weights.
    pub u2: Array2<f32>,
}

impl Cp {
    pub fn rank(&self) -> usize {
        self.u1.ncols()
    }
}

/// How [`cp_als_with`] chooses its starting factors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpInit {
    /// Leading left singular vectors of each unfolding (Kolda's `nvecs`), seeded Gaussian unit
    /// columns where the rank exceeds the mode size (e.g. `kh = 3 < r`). Deterministic and
    /// usually far closer to the optimum than random factors.
    Svd,
    /// Seeded Gaussian factors with unit columns.
    Random,
}

// ----------------------------------------------------------------------------------------------
// Unfoldings and mode products (f64)
// ----------------------------------------------------------------------------------------------

/// Axis order that puts `mode` first and keeps the others in their original order.
fn mode_perm(mode: usize) -> [usize; 4] {
    let mut p = [mode, 0, 0, 0];
    let mut k = 1;
    for ax in 0..4 {
        if ax != mode {
            p[k] = ax;
            k += 1;
        }
    }
    p
}

fn unfold64(x: ArrayView4<f64>, mode: usize) -> Array2<f64> {
    assert!(mode < 4, "unfold: mode {mode} of a 4-way tensor");
    let rows = x.shape()[mode];
    let cols = x.len() / rows.max(1);
    let p = x.permuted_axes(mode_perm(mode));
    let flat: Vec<f64> = p.iter().copied().collect(); // logical (row-major) order
    Array2::from_shape_vec((rows, cols), flat).expect("unfold shape")
}

/// Inverse of [`unfold64`]: `m` is the mode-`mode` unfolding of a tensor of shape `shape`.
fn fold64(m: Array2<f64>, mode: usize, shape: [usize; 4]) -> Array4<f64> {
    let p = mode_perm(mode);
    let pshape = [shape[p[0]], shape[p[1]], shape[p[2]], shape[p[3]]];
    let m = m.as_standard_layout().into_owned();
    let t = m.into_shape_with_order(pshape).expect("fold shape");
    let mut inv = [0usize; 4];
    for (k, &ax) in p.iter().enumerate() {
        inv[ax] = k;
    }
    t.permuted_axes(inv).as_standard_layout().into_owned()
}

/// `x x_mode m`: `Y[.., j, ..] = sum_k m[j, k] X[.., k, ..]`.
fn mode_product(x: ArrayView4<f64>, m: ArrayView2<f64>, mode: usize) -> Array4<f64> {
    let mut shape = [0usize; 4];
    shape.copy_from_slice(x.shape());
    assert_eq!(m.ncols(), shape[mode], "mode product: inner dimension");
    shape[mode] = m.nrows();
    fold64(m.dot(&unfold64(x, mode)), mode, shape)
}

fn to64(w: ArrayView4<f32>) -> Array4<f64> {
    w.mapv(f64::from)
}

fn to32_2(a: &Array2<f64>) -> Array2<f32> {
    a.mapv(|x| x as f32)
}

fn sq_norm(x: ArrayView4<f64>) -> f64 {
    x.iter().map(|v| v * v).sum()
}

/// Mode-`mode` unfolding of `w` in f64: row index = the `mode` axis, column index = the other
/// axes in their original order, last fastest. Mode 0 is `[C_out, C_in*kh*kw]` (a plain
/// reshape), mode 1 is `[C_in, C_out*kh*kw]`; modes 2 and 3 (the spatial ones, used by CP) are
/// accepted too.
///
/// # Panics
/// If `mode > 3`: the mode is a compile-time choice of the caller, not user input.
pub fn unfold(w: ArrayView4<f32>, mode: usize) -> Array2<f64> {
    unfold64(to64(w).view(), mode)
}

/// Singular values (descending, `min(rows, cols)` of them) of the mode-`mode` unfolding.
/// Their squares sum to `||W||_F^2`; the tail is what truncation to a rank discards.
///
/// # Panics
/// If `mode > 3`, or if LAPACK fails, which it does not for finite input; callers that take
/// weights from a file should go through [`energy_ranks`] / [`hosvd`], which check finiteness.
pub fn mode_singular_values(w: ArrayView4<f32>, mode: usize) -> Vec<f64> {
    let m = unfold(w, mode);
    if m.is_empty() {
        return Vec::new();
    }
    let (_, s, _) = m.svd(false, false).expect("SVD of a finite unfolding");
    s.to_vec()
}

/// Smallest rank keeping at least `energy` of the total squared singular values (at least 1).
fn energy_rank(s: &[f64], energy: f64) -> usize {
    let total: f64 = s.iter().map(|v| v * v).sum();
    if s.is_empty() || total <= 0.0 {
        return 1;
    }
    // A relative slack so that energy = 1.0 does not demand the rounding noise in the tail.
    let target = energy * total - 1e-12 * total;
    let mut cum = 0.0;
    for (k, v) in s.iter().enumerate() {
        cum += v * v;
        if cum >= target {
            return k + 1;
        }
    }
    s.len()
}

/// Smallest `(r_in, r_out)` keeping at least `energy` of the squared singular values of the
/// mode-1 and mode-0 unfoldings (the "energy" rank policy for decomposed init). `energy` is
/// clamped to `[0, 1]` (NaN counts as 1); ranks are at least 1 and at most the mode size, and a
/// non-finite or all-zero kernel gives `(1, 1)`.
pub fn energy_ranks(w: ArrayView4<f32>, energy: f64) -> (usize, usize) {
    let energy = if energy.is_nan() {
        1.0
    } else {
        energy.clamp(0.0, 1.0)
    };
    if w.is_empty() || !w.iter().all(|v| v.is_finite()) {
        return (1, 1);
    }
    let r_in = energy_rank(&mode_singular_values(w, 1), energy);
    let r_out = energy_rank(&mode_singular_values(w, 0), energy);
    (r_in, r_out)
}

/// `r` leading left singular vectors of `m` (`[rows, r]`, orthonormal columns), each with its
/// largest-magnitude entry made positive so that results do not depend on LAPACK's sign choice.
/// `r` may exceed `min(rows, cols)` (up to `rows`): the full U of the SVD supplies an orthonormal
/// completion, which is as good as any since those directions carry no energy.
fn leading_left(m: &Array2<f64>, r: usize) -> Result<Array2<f64>> {
    let (u, _, _) = m.svd(true, false).context("SVD of a kernel unfolding")?;
    let u = u.context("SVD returned no U")?;
    let mut out = u.slice(ndarray::s![.., ..r]).to_owned();
    for mut col in out.columns_mut() {
        let big = col
            .iter()
            .copied()
            .fold(0.0f64, |b, v| if v.abs() > b.abs() { v } else { b });
        if big < 0.0 {
            col.mapv_inplace(|v| -v);
        }
    }
    Ok(out)
}

fn check_kernel(w: ArrayView4<f32>, what: &str) -> Result<()> {
    if w.is_empty() {
        bail!("{what}: empty kernel of shape {:?}", w.shape());
    }
    if let Some(k) = w.iter().position(|v| !v.is_finite()) {
        bail!(
            "{what}: kernel of shape {:?} has a non-finite weight ({} at flat index {k})",
            w.shape(),
            w.iter().nth(k).copied().unwrap_or(f32::NAN)
        );
    }
    Ok(())
}

fn check_tucker_ranks(w: ArrayView4<f32>, r_in: usize, r_out: usize, what: &str) -> Result<()> {
    check_kernel(w, what)?;
    let (c_out, c_in) = (w.shape()[0], w.shape()[1]);
    if r_in == 0 || r_in > c_in {
        bail!(
            "{what}: r_in = {r_in} must be in 1..={c_in} (C_in of kernel {:?})",
            w.shape()
        );
    }
    if r_out == 0 || r_out > c_out {
        bail!(
            "{what}: r_out = {r_out} must be in 1..={c_out} (C_out of kernel {:?})",
            w.shape()
        );
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// Tucker-2
// ----------------------------------------------------------------------------------------------

fn tucker_from64(u1: &Array2<f64>, core: &Array4<f64>, u2: &Array2<f64>) -> Tucker2 {
    Tucker2 {
        u1: to32_2(u1),
        core: core.mapv(|x| x as f32),
        u2: to32_2(u2),
    }
}

/// Truncated HOSVD over modes 0 and 1: `U2` = the `r_out` leading left singular vectors of the
/// mode-0 unfolding, `U1` = the `r_in` leading ones of the mode-1 unfolding, and the core is the
/// projection `G = W x_0 U2^T x_1 U1^T`. With orthonormal factors this core is the
/// least-squares optimum for those factors, and the error obeys
/// `||W - W~||^2 <= sum of discarded sigma^2 of mode 0 + those of mode 1`
/// (De Lathauwer et al. 2000), so at full rank the reconstruction is exact.
pub fn hosvd(w: ArrayView4<f32>, r_in: usize, r_out: usize) -> Result<Tucker2> {
    check_tucker_ranks(w, r_in, r_out, "hosvd")?;
    let x = to64(w);
    let (u1, core, u2) = hosvd64(&x, r_in, r_out)?;
    Ok(tucker_from64(&u1, &core, &u2))
}

fn hosvd64(
    x: &Array4<f64>,
    r_in: usize,
    r_out: usize,
) -> Result<(Array2<f64>, Array4<f64>, Array2<f64>)> {
    let u2 = leading_left(&unfold64(x.view(), 0), r_out)?;
    let u1 = leading_left(&unfold64(x.view(), 1), r_in)?;
    let core = project(x, &u1, &u2);
    Ok((u1, core, u2))
}

/// `G = X x_0 U2^T x_1 U1^T`.
fn project(x: &Array4<f64>, u1: &Array2<f64>, u2: &Array2<f64>) -> Array4<f64> {
    let y = mode_product(x.view(), u2.t(), 0);
    mode_product(y.view(), u1.t(), 1)
}

/// HOOI (higher-order orthogonal iteration) for Tucker-2, started from [`hosvd`].
///
/// Each sweep sets `U1` to the leading left singular vectors of `(W x_0 U2^T)` unfolded along
/// mode 1, then `U2` likewise from `(W x_1 U1^T)` along mode 0. Each half-step maximises
/// `||G||_F` over one factor with the other fixed, and with orthonormal factors
/// `||W - W~||^2 = ||W||^2 - ||G||^2`, so the error never increases and the result is never
/// worse than HOSVD (up to rounding).
///
/// Stopping rule: after at most `iters` sweeps, or as soon as a sweep lowers the relative
/// error `||W - W~|| / ||W||` by less than `tol` (absolute, e.g. `1e-6`). `iters = 0` returns
/// the HOSVD.
pub fn hooi(
    w: ArrayView4<f32>,
    r_in: usize,
    r_out: usize,
    iters: usize,
    tol: f64,
) -> Result<Tucker2> {
    hooi_with_history(w, r_in, r_out, iters, tol).map(|(t, _)| t)
}

/// [`hooi`], also returning the relative error after HOSVD and after each sweep.
pub fn hooi_with_history(
    w: ArrayView4<f32>,
    r_in: usize,
    r_out: usize,
    iters: usize,
    tol: f64,
) -> Result<(Tucker2, Vec<f64>)> {
    check_tucker_ranks(w, r_in, r_out, "hooi")?;
    let x = to64(w);
    let norm2 = sq_norm(x.view());
    let (mut u1, mut core, mut u2) = hosvd64(&x, r_in, r_out)?;
    // ||W - W~||^2 = ||W||^2 - ||G||^2 for orthonormal factors and the projected core.
    let rel = |g: &Array4<f64>| {
        if norm2 <= 0.0 {
            0.0
        } else {
            ((norm2 - sq_norm(g.view())).max(0.0) / norm2).sqrt()
        }
    };
    let mut hist = vec![rel(&core)];
    for _ in 0..iters {
        if norm2 <= 0.0 {
            break;
        }
        let y = mode_product(x.view(), u2.t(), 0);
        let nu1 = leading_left(&unfold64(y.view(), 1), r_in)?;
        let z = mode_product(x.view(), nu1.t(), 1);
        let nu2 = leading_left(&unfold64(z.view(), 0), r_out)?;
        let ncore = mode_product(z.view(), nu2.t(), 0);
        let err = rel(&ncore);
        let prev = *hist.last().expect("history starts non-empty");
        // Guard against a rounding-level increase: keep the better factors.
        if err <= prev {
            u1 = nu1;
            u2 = nu2;
            core = ncore;
        }
        hist.push(err.min(prev));
        if prev - err < tol {
            break;
        }
    }
    Ok((tucker_from64(&u1, &core, &u2), hist))
}

/// The kernel `W~ = G x_0 U2 x_1 U1` of Tucker-2 factors (the dense conv that the three-conv
/// chain is equivalent to).
pub fn tucker2_compose(t: &Tucker2) -> Array4<f32> {
    let g = t.core.mapv(f64::from);
    let u1 = t.u1.mapv(f64::from);
    let u2 = t.u2.mapv(f64::from);
    let y = mode_product(g.view(), u2.view(), 0);
    mode_product(y.view(), u1.view(), 1).mapv(|x| x as f32)
}

// ----------------------------------------------------------------------------------------------
// CP
// ----------------------------------------------------------------------------------------------

/// Khatri-Rao product (column-wise Kronecker) of `mats`, the first matrix's row index slowest:
/// `KR[(i_0, i_1, ..), a] = prod_k mats[k][i_k, a]`. Matches [`unfold64`]'s column order.
fn khatri_rao(mats: &[&Array2<f64>]) -> Array2<f64> {
    let r = mats[0].ncols();
    let mut kr = Array2::<f64>::ones((1, r));
    for m in mats {
        let (a, b) = (kr.nrows(), m.nrows());
        let mut next = Array2::<f64>::zeros((a * b, r));
        for i in 0..a {
            for j in 0..b {
                let mut row = next.row_mut(i * b + j);
                Zip::from(&mut row)
                    .and(kr.row(i))
                    .and(m.row(j))
                    .for_each(|o, &x, &y| *o = x * y);
            }
        }
        kr = next;
    }
    kr
}

fn gaussian64(rows: usize, cols: usize, rng: &mut Rng) -> Array2<f64> {
    Array2::from_shape_simple_fn((rows, cols), || f64::from(rng.normal()))
}

/// Normalises the columns of `a` to unit norm and returns the norms (a zero column is left
/// as is with norm 0).
fn normalise_columns(a: &mut Array2<f64>) -> Array1<f64> {
    let mut norms = Array1::<f64>::zeros(a.ncols());
    for (k, mut col) in a.columns_mut().into_iter().enumerate() {
        let n = col.iter().map(|v| v * v).sum::<f64>().sqrt();
        norms[k] = n;
        if n > 0.0 {
            col.mapv_inplace(|v| v / n);
        }
    }
    norms
}

/// Relative ridge of the proximal normal equations in CP-ALS, as a fraction of the mean
/// diagonal of the Gram-Hadamard matrix.
const CP_RIDGE: f64 = 1e-6;

/// Upper bound on a meaningful CP rank: every tensor is a sum of `prod(dims) / max(dims)`
/// rank-one terms (one per fibre of the longest mode), so more components only add degeneracy.
fn cp_max_rank(shape: &[usize]) -> usize {
    let prod: usize = shape.iter().product();
    prod / shape.iter().copied().max().unwrap_or(1).max(1)
}

/// CP-ALS on the 4-way kernel with the SVD-based start ([`CpInit::Svd`]); see [`cp_als_with`].
pub fn cp_als(w: ArrayView4<f32>, rank: usize, iters: usize, tol: f64, seed: u64) -> Result<Cp> {
    cp_als_with(w, rank, iters, tol, seed, CpInit::Svd).map(|(c, _)| c)
}

/// CP by alternating least squares on the 4-way tensor (all four modes, so the spatial factors
/// `V`, `H` are fitted too), returning the factors and the relative error after each sweep.
///
/// * Sweep order `U2, U1, V, H`. Each update solves the normal equations
///   `A_n (Gamma + lambda I) = X_(n) KR_n + lambda A_n^old`, where `KR_n` is the Khatri-Rao
///   product of the other factors and `Gamma` the Hadamard product of their Grams. This is
///   proximal (Tikhonov-towards-the-previous-iterate) regularisation with
///   `lambda = 1e-6 * trace(Gamma) / r`: when `Gamma` is singular or nearly so — the normal
///   case for the spatial modes, where `kh = 3 < r` — the unconstrained directions stay where
///   they were instead of blowing up, yet at a fixed point the term vanishes, so the fit is not
///   biased towards small factors the way a plain ridge would be. Each update still cannot
///   increase the error (it minimises error + proximal term, which is zero at the old factor).
/// * After each update the columns are normalised to unit norm, the norms kept as component
///   weights, so the scale does not drift between factors; at the end the weights go into `U2`.
/// * Solves go through a Cholesky factorisation of the SPD `Gamma + lambda I` in f64.
/// * Stops after `iters` sweeps or when a sweep lowers the relative error by less than `tol`.
/// * `seed` drives the random columns ([`CpInit::Random`] entirely, [`CpInit::Svd`] only where
///   the rank exceeds a mode's size); the result is deterministic given it.
///
/// Errors for rank 0, a rank above `prod(dims) / max(dims)` (every kernel has an exact CP of
/// that rank, so more is never needed), empty and non-finite kernels.
pub fn cp_als_with(
    w: ArrayView4<f32>,
    rank: usize,
    iters: usize,
    tol: f64,
    seed: u64,
    init: CpInit,
) -> Result<(Cp, Vec<f64>)> {
    check_kernel(w, "cp_als")?;
    let max_rank = cp_max_rank(w.shape());
    if rank == 0 || rank > max_rank {
        bail!(
            "cp_als: rank {rank} must be in 1..={max_rank} for kernel {:?} (prod(dims) / max(dims))",
            w.shape()
        );
    }
    let x = to64(w);
    let dims = [x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]];
    let unf: Vec<Array2<f64>> = (0..4).map(|m| unfold64(x.view(), m)).collect();
    let norm2 = sq_norm(x.view());
    let mut rng = Rng::derive(seed, &[0xC9, rank as u64]);

    // factors[n] is the mode-n factor: [U2, U1, V, H].
    let mut factors: Vec<Array2<f64>> = Vec::with_capacity(4);
    for (n, &d) in dims.iter().enumerate() {
        let mut a = match init {
            CpInit::Random => gaussian64(d, rank, &mut rng),
            CpInit::Svd => {
                let k = rank.min(d);
                let mut a = gaussian64(d, rank, &mut rng);
                let lead = leading_left(&unf[n], k)?;
                a.slice_mut(ndarray::s![.., ..k]).assign(&lead);
                a
            }
        };
        normalise_columns(&mut a);
        factors.push(a);
    }
    // A zero kernel has the zero CP; the loop below does nothing for it.
    let mut weights = if norm2 > 0.0 {
        Array1::<f64>::ones(rank)
    } else {
        Array1::<f64>::zeros(rank)
    };

    let rel_err = |factors: &[Array2<f64>], weights: &Array1<f64>| -> f64 {
        if norm2 <= 0.0 {
            return 0.0;
        }
        let kr = khatri_rao(&[&factors[1], &factors[2], &factors[3]]);
        let a0 = &factors[0] * &weights.view().insert_axis(Axis(0));
        let approx = a0.dot(&kr.t());
        let d2: f64 = Zip::from(&unf[0])
            .and(&approx)
            .fold(0.0, |s, &a, &b| s + (a - b) * (a - b));
        (d2 / norm2).sqrt()
    };

    let mut hist: Vec<f64> = Vec::new();
    let mut prev = rel_err(&factors, &weights);
    for _ in 0..iters {
        if norm2 <= 0.0 {
            break;
        }
        for n in 0..4 {
            let others: Vec<&Array2<f64>> =
                (0..4).filter(|&k| k != n).map(|k| &factors[k]).collect();
            let kr = khatri_rao(&others);
            let mut gamma = Array2::<f64>::ones((rank, rank));
            for o in &others {
                gamma *= &o.t().dot(*o);
            }
            let mttkrp = unf[n].dot(&kr); // [d_n, r]
            let lambda = CP_RIDGE * (gamma.diag().sum() / rank as f64).max(f64::MIN_POSITIVE);
            // The previous iterate in the same scale as the new one (weights absorbed).
            let prev_a = &factors[n] * &weights.view().insert_axis(Axis(0));
            for k in 0..rank {
                gamma[[k, k]] += lambda;
            }
            let rhs = (&mttkrp + &(prev_a * lambda)).reversed_axes(); // [r, d_n]
            let l = gamma
                .cholesky(UPLO::Lower)
                .context("cp_als: Cholesky of the regularised normal equations")?;
            let y = l
                .solve_triangular(UPLO::Lower, Diag::NonUnit, &rhs)
                .context("cp_als: triangular solve")?;
            let sol = l
                .t()
                .solve_triangular(UPLO::Upper, Diag::NonUnit, &y)
                .context("cp_als: triangular solve")?;
            let mut a = sol.reversed_axes();
            weights = normalise_columns(&mut a);
            factors[n] = a;
        }
        let err = rel_err(&factors, &weights);
        if !err.is_finite() {
            bail!("cp_als: the fit diverged (relative error {err}) at rank {rank}");
        }
        hist.push(err);
        let done = prev - err < tol;
        prev = err;
        if done {
            break;
        }
    }

    let u2 = &factors[0] * &weights.view().insert_axis(Axis(0));
    Ok((
        Cp {
            u1: to32_2(&factors[1]),
            vert: to32_2(&factors[2]),
            horiz: to32_2(&factors[3]),
            u2: to32_2(&u2),
        },
        hist,
    ))
}

/// The kernel `W~[o,i,h,w] = sum_a u2[o,a] vert[h,a] horiz[w,a] u1[i,a]` of CP factors.
///
/// # Panics
/// If the factors disagree on the rank (a programming error, not input).
pub fn cp_compose(c: &Cp) -> Array4<f32> {
    let r = c.u1.ncols();
    assert!(
        c.vert.ncols() == r && c.horiz.ncols() == r && c.u2.ncols() == r,
        "cp_compose: factors of different ranks"
    );
    let f = |a: &Array2<f32>| a.mapv(f64::from);
    let (u1, v, h, u2) = (f(&c.u1), f(&c.vert), f(&c.horiz), f(&c.u2));
    let kr = khatri_rao(&[&u1, &v, &h]);
    let m = u2.dot(&kr.t());
    fold64(m, 0, [u2.nrows(), u1.nrows(), v.nrows(), h.nrows()]).mapv(|x| x as f32)
}

/// `||W - W~||_F / ||W||_F`, accumulated in f64. 0 when both are zero, infinite when only `W`
/// is.
///
/// # Panics
/// If the shapes differ.
pub fn rel_error(w: ArrayView4<f32>, approx: ArrayView4<f32>) -> f64 {
    assert_eq!(w.shape(), approx.shape(), "rel_error: shapes differ");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    Zip::from(&w).and(&approx).for_each(|&a, &b| {
        let (a, b) = (f64::from(a), f64::from(b));
        num += (a - b) * (a - b);
        den += a * a;
    });
    if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (num / den).sqrt()
    }
}

// ----------------------------------------------------------------------------------------------
// Orthogonal init
// ----------------------------------------------------------------------------------------------

/// A semi-orthogonal `[rows, cols]` matrix: columns orthonormal if `rows >= cols`, rows
/// orthonormal otherwise. As `torch.nn.init.orthogonal_`: QR of a Gaussian matrix (transposed
/// when wide), with each column of Q multiplied by the sign of the matching diagonal entry of
/// R. Without that correction, Householder QR's sign convention would bias the distribution;
/// with it, Q is Haar-distributed. Deterministic given the state of `rng`.
///
/// # Panics
/// Only if LAPACK's QR fails, which it does not for a finite Gaussian matrix.
pub fn orthogonal(rows: usize, cols: usize, rng: &mut Rng) -> Array2<f32> {
    if rows == 0 || cols == 0 {
        return Array2::zeros((rows, cols));
    }
    let g = gaussian64(rows, cols, rng);
    let tall = if rows < cols { g.reversed_axes() } else { g };
    let tall = tall.as_standard_layout().into_owned();
    let (mut q, r) = tall.qr().expect("QR of a finite Gaussian matrix");
    for (k, mut col) in q.columns_mut().into_iter().enumerate() {
        if r[[k, k]] < 0.0 {
            col.mapv_inplace(|v| -v);
        }
    }
    let q = if rows < cols { q.reversed_axes() } else { q };
    q.as_standard_layout().mapv(|x| x as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn4(shape: [usize; 4], seed: u64) -> Array4<f32> {
        let mut rng = Rng::derive(seed, &[4]);
        Array4::from_shape_simple_fn(shape, || rng.normal())
    }

    fn randn2(rows: usize, cols: usize, rng: &mut Rng) -> Array2<f32> {
        Array2::from_shape_simple_fn((rows, cols), || rng.normal())
    }

    fn max_dev_from_identity(g: &Array2<f32>) -> f32 {
        let mut m = 0.0f32;
        for ((i, j), &v) in g.indexed_iter() {
            let t = if i == j { 1.0 } else { 0.0 };
            m = m.max((v - t).abs());
        }
        m
    }

    fn sq_frob_diff(a: &Array4<f32>, b: &Array4<f32>) -> f64 {
        Zip::from(a)
            .and(b)
            .fold(0.0, |s, &x, &y| s + (f64::from(x) - f64::from(y)).powi(2))
    }

    #[test]
    fn unfold_layout() {
        let w = Array4::from_shape_fn((2, 3, 2, 2), |(o, i, h, k)| {
            (o * 1000 + i * 100 + h * 10 + k) as f32
        });
        let m0 = unfold(w.view(), 0);
        assert_eq!(m0.dim(), (2, 12));
        let m1 = unfold(w.view(), 1);
        assert_eq!(m1.dim(), (3, 8));
        for o in 0..2 {
            for i in 0..3 {
                for h in 0..2 {
                    for k in 0..2 {
                        let v = f64::from(w[[o, i, h, k]]);
                        assert_eq!(m0[[o, i * 4 + h * 2 + k]], v);
                        assert_eq!(m1[[i, o * 4 + h * 2 + k]], v);
                    }
                }
            }
        }
        // fold inverts unfold in every mode
        let x = to64(randn4([3, 4, 2, 5], 1).view());
        for mode in 0..4 {
            let back = fold64(unfold64(x.view(), mode), mode, [3, 4, 2, 5]);
            assert_eq!(back, x);
        }
        // singular values carry the whole energy
        let w = randn4([5, 4, 3, 3], 2);
        let total: f64 = w.iter().map(|&v| f64::from(v).powi(2)).sum();
        for mode in 0..4 {
            let s: f64 = mode_singular_values(w.view(), mode)
                .iter()
                .map(|v| v * v)
                .sum();
            assert!(
                (s - total).abs() < 1e-9 * total,
                "mode {mode}: {s} vs {total}"
            );
        }
    }

    #[test]
    fn hosvd_full_rank_is_exact_and_factors_orthonormal() {
        for (shape, seed) in [([16, 8, 3, 3], 1), ([8, 16, 3, 3], 2), ([12, 3, 5, 5], 3)] {
            let w = randn4(shape, seed);
            let t = hosvd(w.view(), shape[1], shape[0]).unwrap();
            let err = rel_error(w.view(), tucker2_compose(&t).view());
            assert!(err < 1e-5, "{shape:?}: {err}");
            assert!(max_dev_from_identity(&t.u1.t().dot(&t.u1)) < 1e-5);
            assert!(max_dev_from_identity(&t.u2.t().dot(&t.u2)) < 1e-5);
        }
    }

    #[test]
    fn truncated_hosvd_obeys_bound_and_hooi_improves() {
        let w = randn4([24, 20, 3, 3], 7);
        let s0 = mode_singular_values(w.view(), 0);
        let s1 = mode_singular_values(w.view(), 1);
        let norm2: f64 = w.iter().map(|&v| f64::from(v).powi(2)).sum();
        for (r_in, r_out) in [(4, 6), (10, 10), (20, 3), (1, 24), (7, 1)] {
            let t = hosvd(w.view(), r_in, r_out).unwrap();
            assert_eq!(t.u1.dim(), (20, r_in));
            assert_eq!(t.u2.dim(), (24, r_out));
            assert_eq!(t.core.shape(), &[r_out, r_in, 3, 3]);
            assert!(max_dev_from_identity(&t.u1.t().dot(&t.u1)) < 1e-5);
            assert!(max_dev_from_identity(&t.u2.t().dot(&t.u2)) < 1e-5);
            let approx = tucker2_compose(&t);
            let err2 = sq_frob_diff(&w, &approx);
            let bound: f64 = s0[r_out..].iter().map(|v| v * v).sum::<f64>()
                + s1[r_in..].iter().map(|v| v * v).sum::<f64>();
            assert!(
                err2 <= bound * (1.0 + 1e-6) + 1e-9 * norm2,
                "({r_in},{r_out}): {err2} > {bound}"
            );
            let e_hosvd = rel_error(w.view(), approx.view());
            let (h, hist) = hooi_with_history(w.view(), r_in, r_out, 20, 1e-10).unwrap();
            let e_hooi = rel_error(w.view(), tucker2_compose(&h).view());
            assert!(
                e_hooi <= e_hosvd + 1e-6,
                "({r_in},{r_out}): {e_hooi} > {e_hosvd}"
            );
            assert!(hist.windows(2).all(|p| p[1] <= p[0]), "{hist:?}");
            // the bookkeeping error (||W||^2 - ||G||^2) matches the composed one
            assert!(
                (hist.last().unwrap() - e_hooi).abs() < 1e-5,
                "{hist:?} vs {e_hooi}"
            );
            assert!(max_dev_from_identity(&h.u1.t().dot(&h.u1)) < 1e-5);
            assert!(max_dev_from_identity(&h.u2.t().dot(&h.u2)) < 1e-5);
        }
        // on a random kernel with a real truncation, HOOI strictly helps a little
        let t = hosvd(w.view(), 6, 6).unwrap();
        let h = hooi(w.view(), 6, 6, 10, 0.0).unwrap();
        let (eh, eo) = (
            rel_error(w.view(), tucker2_compose(&t).view()),
            rel_error(w.view(), tucker2_compose(&h).view()),
        );
        assert!(eo < eh, "{eo} !< {eh}");
    }

    #[test]
    fn exact_tucker2_is_recovered_and_energy_ranks_find_it() {
        let mut rng = Rng::new(11);
        let (c_out, c_in, r_in, r_out) = (20, 16, 5, 7);
        let t = Tucker2 {
            u1: randn2(c_in, r_in, &mut rng),
            core: Array4::from_shape_simple_fn((r_out, r_in, 3, 3), || rng.normal()),
            u2: randn2(c_out, r_out, &mut rng),
        };
        let w = tucker2_compose(&t);
        let rec = hosvd(w.view(), r_in, r_out).unwrap();
        let err = rel_error(w.view(), tucker2_compose(&rec).view());
        assert!(err < 1e-5, "{err}");
        let rec = hooi(w.view(), r_in, r_out, 5, 1e-8).unwrap();
        assert!(rel_error(w.view(), tucker2_compose(&rec).view()) < 1e-5);
        let (ei, eo) = energy_ranks(w.view(), 0.999999);
        assert!(ei <= r_in && eo <= r_out, "({ei},{eo})");
        assert_eq!((ei, eo), (r_in, r_out));
        // energy policy monotone, clamped, at least 1
        assert_eq!(energy_ranks(w.view(), 0.0), (1, 1));
        let (a, b) = energy_ranks(w.view(), 0.5);
        assert!(a <= r_in && b <= r_out && a >= 1 && b >= 1);
        assert_eq!(
            energy_ranks(Array4::<f32>::zeros((4, 4, 3, 3)).view(), 0.9),
            (1, 1)
        );
        let wr = randn4([10, 6, 3, 3], 5);
        assert_eq!(energy_ranks(wr.view(), 1.0), (6, 10));
        assert_eq!(energy_ranks(wr.view(), 2.0), (6, 10));
    }

    fn cp_product(shape: [usize; 4], rank: usize, seed: u64) -> Array4<f32> {
        let mut rng = Rng::new(seed);
        let c = Cp {
            u2: randn2(shape[0], rank, &mut rng),
            u1: randn2(shape[1], rank, &mut rng),
            vert: randn2(shape[2], rank, &mut rng),
            horiz: randn2(shape[3], rank, &mut rng),
        };
        cp_compose(&c)
    }

    #[test]
    fn cp_compose_matches_definition() {
        let mut rng = Rng::new(3);
        let c = Cp {
            u2: randn2(4, 3, &mut rng),
            u1: randn2(5, 3, &mut rng),
            vert: randn2(3, 3, &mut rng),
            horiz: randn2(2, 3, &mut rng),
        };
        let w = cp_compose(&c);
        assert_eq!(w.shape(), &[4, 5, 3, 2]);
        for ((o, i, h, k), &v) in w.indexed_iter() {
            let r: f32 = (0..3)
                .map(|a| c.u2[[o, a]] * c.vert[[h, a]] * c.horiz[[k, a]] * c.u1[[i, a]])
                .sum();
            assert!((r - v).abs() < 1e-5, "{r} vs {v}");
        }
    }

    #[test]
    fn cp_als_recovers_exact_cp_and_error_decreases() {
        let w = cp_product([8, 6, 3, 3], 4, 21);
        for init in [CpInit::Svd, CpInit::Random] {
            let (c, hist) = cp_als_with(w.view(), 4, 1000, 1e-12, 5, init).unwrap();
            let err = rel_error(w.view(), cp_compose(&c).view());
            println!(
                "exact rank-4 CP, {init:?} init: rel err {err:.2e} after {} sweeps",
                hist.len()
            );
            assert!(err < 1e-3, "{init:?}: {err} after {} sweeps", hist.len());
            assert!(
                hist.windows(2).all(|p| p[1] <= p[0] + 1e-12),
                "{init:?}: not monotone {hist:?}"
            );
            assert!(hist[0] > *hist.last().unwrap());
            for a in [&c.u1, &c.vert, &c.horiz] {
                for col in a.columns() {
                    let n: f32 = col.iter().map(|v| v * v).sum::<f32>().sqrt();
                    assert!((n - 1.0).abs() < 1e-4, "{n}");
                }
            }
        }
        // deterministic given the seed
        let a = cp_als(w.view(), 3, 10, 0.0, 9).unwrap();
        let b = cp_als(w.view(), 3, 10, 0.0, 9).unwrap();
        assert_eq!(a.u2, b.u2);
        assert_eq!(a.vert, b.vert);
    }

    #[test]
    fn cp_als_higher_rank_fits_better_and_handles_rank_deficient_modes() {
        let w = randn4([16, 16, 3, 3], 31);
        let (lo, hlo) = cp_als_with(w.view(), 4, 50, 1e-9, 1, CpInit::Svd).unwrap();
        let (hi, hhi) = cp_als_with(w.view(), 48, 50, 1e-9, 1, CpInit::Svd).unwrap();
        let (elo, ehi) = (
            rel_error(w.view(), cp_compose(&lo).view()),
            rel_error(w.view(), cp_compose(&hi).view()),
        );
        println!("random [16,16,3,3]: rank 4 rel err {elo:.4}, rank 48 rel err {ehi:.4}");
        assert!(ehi < elo, "rank 48: {ehi}, rank 4: {elo}");
        assert!(ehi < 0.8, "{ehi}");
        for h in [&hlo, &hhi] {
            assert!(h.windows(2).all(|p| p[1] <= p[0] + 1e-12), "{h:?}");
        }
        assert!(cp_compose(&hi).iter().all(|v| v.is_finite()));
        // 1x1 kernels (kh = kw = 1): spatial factors are 1 x r, Gram rank 1
        let w1 = randn4([8, 8, 1, 1], 2);
        let c = cp_als(w1.view(), 8, 100, 1e-10, 0).unwrap();
        let e = rel_error(w1.view(), cp_compose(&c).view());
        assert!(e < 1e-2, "{e}");
    }

    #[test]
    fn orthogonal_is_semi_orthogonal_and_deterministic() {
        for (rows, cols) in [(16, 16), (32, 8), (8, 32), (1, 5), (5, 1), (64, 64)] {
            let mut rng = Rng::derive(42, &[rows as u64, cols as u64]);
            let q = orthogonal(rows, cols, &mut rng);
            assert_eq!(q.dim(), (rows, cols));
            let g = if rows >= cols {
                q.t().dot(&q)
            } else {
                q.dot(&q.t())
            };
            let dev = max_dev_from_identity(&g);
            assert!(dev < 1e-5, "({rows},{cols}): {dev}");
            let mut rng2 = Rng::derive(42, &[rows as u64, cols as u64]);
            assert_eq!(q, orthogonal(rows, cols, &mut rng2));
        }
        let mut a = Rng::new(1);
        let mut b = Rng::new(2);
        assert_ne!(orthogonal(4, 4, &mut a), orthogonal(4, 4, &mut b));
        assert_eq!(orthogonal(0, 3, &mut a).dim(), (0, 3));
        // sign correction: the first column is not always sign-biased; the distribution of
        // q[0][0] is symmetric. A cheap check over several draws.
        let mut rng = Rng::new(99);
        let pos = (0..200)
            .filter(|_| orthogonal(3, 3, &mut rng)[[0, 0]] > 0.0)
            .count();
        assert!((60..140).contains(&pos), "{pos}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        let w = randn4([8, 6, 3, 3], 1);
        for (ri, ro) in [(0, 4), (4, 0), (7, 4), (4, 9)] {
            let e = hosvd(w.view(), ri, ro).unwrap_err().to_string();
            assert!(e.contains("must be in"), "{e}");
            assert!(hooi(w.view(), ri, ro, 3, 1e-6).is_err());
        }
        assert!(cp_als(w.view(), 0, 5, 1e-6, 0).is_err());
        // prod(dims) / max(dims) = 6*3*3 = 54
        assert!(cp_als(w.view(), 54, 1, 1e-6, 0).is_ok());
        let e = cp_als(w.view(), 55, 5, 1e-6, 0).unwrap_err().to_string();
        assert!(e.contains("rank 55"), "{e}");
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut wb = w.clone();
            wb[[3, 2, 1, 0]] = bad;
            let e = hosvd(wb.view(), 2, 2).unwrap_err().to_string();
            assert!(e.contains("non-finite"), "{e}");
            assert!(hooi(wb.view(), 2, 2, 3, 1e-6).is_err());
            assert!(cp_als(wb.view(), 2, 3, 1e-6, 0).is_err());
            assert_eq!(energy_ranks(wb.view(), 0.9), (1, 1));
        }
        let empty = Array4::<f32>::zeros((0, 4, 3, 3));
        assert!(hosvd(empty.view(), 1, 1).is_err());
        assert!(cp_als(empty.view(), 1, 1, 0.0, 0).is_err());
        // an all-zero kernel is legal and decomposes to zero
        let z = Array4::<f32>::zeros((4, 4, 3, 3));
        let t = hooi(z.view(), 2, 2, 3, 1e-6).unwrap();
        assert!(tucker2_compose(&t).iter().all(|&v| v == 0.0));
        let c = cp_als(z.view(), 2, 3, 1e-6, 0).unwrap();
        assert!(cp_compose(&c).iter().all(|&v| v == 0.0));
    }
}
