//! ONNX `Gemm`: `Y = alpha * A' * B' + beta * C`, the classifier layer of most CNNs.
//!
//! Products go through ndarray's `general_mat_mul`, which hands transposed views to sgemm as
//! transpose flags, so `transA`/`transB` never copy. Large products are split into fixed
//! ranges of output columns (or rows) run in parallel ([`par_mat_mul`]): BLAS runs on one
//! thread here (see [`crate::engine::init`]), and a classifier's products were the one part of
//! MobileNetV3-Small's step that two threads did not speed up at all (1T 3.5 ms/step, 2T 3.7).

use super::contiguous;
use crate::engine::{init, shape_err, Result};
use ndarray::linalg::general_mat_mul;
use ndarray::{
    s, Array2, ArrayD, ArrayView2, ArrayViewD, ArrayViewMut2, Axis, Ix2, IxDyn, NdFloat,
};
use rayon::prelude::*;

const OP: &str = "Gemm";

/// Output columns (or rows) per task of a split product: a fixed split, so that every output
/// is the same sum whatever the thread count (OpenBLAS's sums for a column can depend on the
/// matrix's width, so the split must not follow the thread count).
const SPLIT: usize = 128;
/// Fewest multiply-adds for a split: below this the product is one call.
const MIN_SPLIT_MACS: usize = 1 << 20;
/// Narrowest range of a split product: a product whose output is under twice this on both
/// sides is one call.
const MIN_SPLIT_LEN: usize = 16;

/// `c = alpha * a . b (+ beta * addend)` (every entry of `c` overwritten, zeros for an empty
/// inner dimension), in fixed ranges of columns of `c` ([`split_bounds`]) in parallel, or of
/// rows when `c` has more rows than columns. The addend (`C` broadcast to `c`'s shape) is added
/// range by range after each range's product: added after the whole product, it was a serial
/// pass over the output with the other threads idle (squeeze-excitation's biases).
fn par_mat_mul(
    alpha: f32,
    a: &ArrayView2<f32>,
    b: &ArrayView2<f32>,
    c: &mut ArrayViewMut2<f32>,
    addend: Option<(f32, ArrayView2<f32>)>,
) {
    let ((m, k), n) = (a.dim(), b.ncols());
    let product = |a: &ArrayView2<f32>, b: &ArrayView2<f32>, c: &mut ArrayViewMut2<f32>| {
        if k == 0 {
            // An empty sum: callers hand `c` unzeroed, and no product may be left to clear it.
            c.fill(0.0);
        } else {
            general_mat_mul(alpha, a, b, 0.0, c);
        }
    };
    let add = |c: &mut ArrayViewMut2<f32>, r: Option<(Axis, std::ops::Range<usize>)>| {
        if let Some((beta, cb)) = &addend {
            let cb = match r {
                Some((axis, r)) => cb.slice_axis(axis, r.into()),
                None => cb.view(),
            };
            c.zip_mut_with(&cb, |y, &v| *y += beta * v);
        }
    };
    if k == 0 || m * n * k < MIN_SPLIT_MACS || m.max(n) < 2 * MIN_SPLIT_LEN {
        product(a, b, c);
        add(c, None);
        return;
    }
    let by_cols = n >= m;
    let axis = Axis(usize::from(by_cols));
    let bounds = split_bounds(if by_cols { n } else { m });
    let mut parts = Vec::with_capacity(bounds.len() - 1);
    let mut rest = c.view_mut();
    for w in bounds.windows(2) {
        let (part, tail) = rest.split_at(axis, w[1] - w[0]);
        parts.push((w[0]..w[1], part));
        rest = tail;
    }
    parts
        .into_par_iter()
        .with_max_len(1)
        .for_each(|(r, mut part)| {
            if by_cols {
                product(a, &b.slice(s![.., r.clone()]), &mut part);
            } else {
                product(&a.slice(s![r.clone(), ..]), b, &mut part);
            }
            add(&mut part, Some((axis, r)));
        });
}

/// Bounds of the column (or row) ranges of a split product of `len` (at least
/// `2 * MIN_SPLIT_LEN`): an even number of ranges of at most [`SPLIT`], their bounds on
/// multiples of 16 (the kernels' block) but the last. In plain chunks of 128,
/// MobileNet-V3-Small's 576-wide squeeze-excitation products split 4 x 128 + 64, and the fifth
/// task ran alone (a fixed width rounded to 16 would still leave an odd count for many widths,
/// 769-896 among them).
fn split_bounds(len: usize) -> Vec<usize> {
    // At least two: EfficientNet-B0's squeeze-excitation reductions ([64, 1152] x [1152, 48]
    // at batch 64) have no side over 128, and as one call each their forward ran no faster on
    // two threads than on one (1.8 ms a step both).
    let tasks = len.div_ceil(SPLIT).max(2);
    let tasks = tasks + tasks % 2;
    let mut bounds: Vec<usize> = (0..tasks)
        .map(|i| (i * len / tasks).next_multiple_of(16).min(len))
        .collect();
    bounds.push(len);
    bounds.dedup();
    bounds
}

/// A `shape` matrix whose entries the caller overwrites before reading (NaN under `cfg(test)`,
/// see [`super::unzeroed`]).
fn uninit2(shape: (usize, usize)) -> Array2<f32> {
    Array2::from_shape_vec(shape, super::unzeroed(shape.0 * shape.1))
        .expect("the length follows from the shape")
}

/// Attributes of a Gemm (ONNX defaults: alpha 1, beta 1, no transposes).
#[derive(Clone, Debug, PartialEq)]
pub struct Gemm {
    pub alpha: f32,
    pub beta: f32,
    pub trans_a: bool,
    pub trans_b: bool,
}

impl Default for Gemm {
    fn default() -> Self {
        Gemm {
            alpha: 1.0,
            beta: 1.0,
            trans_a: false,
            trans_b: false,
        }
    }
}

/// Gradients of a Gemm; `dc` has `C`'s own (un-broadcast) shape.
#[derive(Clone, Debug)]
pub struct GemmGrads {
    pub da: Array2<f32>,
    pub db: Array2<f32>,
    pub dc: Option<ArrayD<f32>>,
}

impl Gemm {
    fn op_view<'a, T>(a: ArrayView2<'a, T>, trans: bool) -> ArrayView2<'a, T> {
        if trans {
            a.reversed_axes()
        } else {
            a
        }
    }

    /// `[M, N]` from `A`, `B` and optional `C` shapes; `C` must broadcast to `[M, N]` one way
    /// (rank <= 2, each dimension equal or 1, aligned to the right).
    pub fn output_shape(
        &self,
        a: &[usize],
        b: &[usize],
        c: Option<&[usize]>,
    ) -> Result<[usize; 2]> {
        let (&[a0, a1], &[b0, b1]) = (a, b) else {
            return Err(shape_err(
                OP,
                format!("A {a:?} and B {b:?} must both have rank 2"),
            ));
        };
        let (m, k) = if self.trans_a { (a1, a0) } else { (a0, a1) };
        let (k2, n) = if self.trans_b { (b1, b0) } else { (b0, b1) };
        if k != k2 {
            return Err(shape_err(
                OP,
                format!("inner dimensions differ: A' is {m}x{k}, B' is {k2}x{n}"),
            ));
        }
        if let Some(c) = c {
            Self::c_as_2d(c, m, n)?;
        }
        Ok([m, n])
    }

    /// `C`'s shape padded on the left to rank 2, after checking it broadcasts to `[m, n]`.
    fn c_as_2d(c: &[usize], m: usize, n: usize) -> Result<[usize; 2]> {
        let padded = match *c {
            [] => [1, 1],
            [x] => [1, x],
            [x, y] => [x, y],
            _ => return Err(shape_err(OP, format!("C {c:?} has rank above 2"))),
        };
        if (padded[0] != m && padded[0] != 1) || (padded[1] != n && padded[1] != 1) {
            return Err(shape_err(
                OP,
                format!("C {c:?} does not broadcast to the output [{m}, {n}]"),
            ));
        }
        Ok(padded)
    }

    pub fn forward(
        &self,
        a: ArrayView2<f32>,
        b: ArrayView2<f32>,
        c: Option<ArrayViewD<f32>>,
    ) -> Result<Array2<f32>> {
        let [m, n] = self.output_shape(a.shape(), b.shape(), c.as_ref().map(|c| c.shape()))?;
        init();
        // Not zeroed: the product overwrites every entry (beta 0).
        let mut y = uninit2((m, n));
        let cs = c.as_ref().map(contiguous);
        let c2 = match (&c, &cs) {
            (Some(c), Some(cs)) => {
                let shape = Self::c_as_2d(c.shape(), m, n)?;
                Some(ArrayView2::from_shape(shape, cs).expect("C's elements fill its 2-D shape"))
            }
            _ => None,
        };
        let addend = c2.as_ref().map(|c2| {
            let cb = c2.broadcast((m, n)).expect("checked by c_as_2d");
            (self.beta, cb)
        });
        par_mat_mul(
            self.alpha,
            &Self::op_view(a, self.trans_a),
            &Self::op_view(b, self.trans_b),
            &mut y.view_mut(),
            addend,
        );
        Ok(y)
    }

    /// `dA`, `dB` by two products with the upstream gradient; `dC` (when `c_shape` is given) is
    /// `beta * dY` summed over the axes `C` was broadcast along.
    pub fn backward(
        &self,
        a: ArrayView2<f32>,
        b: ArrayView2<f32>,
        c_shape: Option<&[usize]>,
        dy: ArrayView2<f32>,
    ) -> Result<GemmGrads> {
        let [m, n] = self.output_shape(a.shape(), b.shape(), c_shape)?;
        Self::check_dy(&dy, m, n)?;
        // Not zeroed (a serial memset of the weight-sized `dB`, 2.4 MB for MobileNet-V3's
        // 576 -> 1024 classifier layer, with the other threads idle): the products overwrite
        // every entry.
        let (mut da, mut db) = (uninit2(a.dim()), uninit2(b.dim()));
        self.grad_products(a, b, dy, Some(da.view_mut()), db.view_mut());
        let dc = match c_shape {
            None => None,
            Some(cs) => {
                let [c0, c1] = Self::c_as_2d(cs, m, n)?;
                let mut g = dy.mapv(|v| v * self.beta);
                if c0 == 1 && m != 1 {
                    g = g.sum_axis(Axis(0)).insert_axis(Axis(0));
                }
                if c1 == 1 && n != 1 {
                    g = g.sum_axis(Axis(1)).insert_axis(Axis(1));
                }
                Some(
                    g.into_shape_with_order(IxDyn(cs))
                        .expect("reduced gradient has C's size"),
                )
            }
        };
        Ok(GemmGrads { da, db, dc })
    }

    /// The output gradient must have the output's shape `[m, n]`.
    fn check_dy(dy: &ArrayView2<f32>, m: usize, n: usize) -> Result<()> {
        if dy.shape() != [m, n] {
            return Err(shape_err(
                OP,
                format!(
                    "output gradient has shape {:?}, expected [{m}, {n}]",
                    dy.shape()
                ),
            ));
        }
        Ok(())
    }

    /// [`Self::backward`] without `C`, into the caller's buffers: `da` (when given) and `db`,
    /// shaped as `a` and `b`, every entry overwritten. A conv on one-pixel planes (squeeze-
    /// excitation) takes its gradients so: copied out of fresh buffers, they were a serial
    /// pass over the weight gradient after the products, the other threads idle.
    pub fn backward_into(
        &self,
        a: ArrayView2<f32>,
        b: ArrayView2<f32>,
        dy: ArrayView2<f32>,
        da: Option<ArrayViewMut2<f32>>,
        db: ArrayViewMut2<f32>,
    ) -> Result<()> {
        let [m, n] = self.output_shape(a.shape(), b.shape(), None)?;
        Self::check_dy(&dy, m, n)?;
        if da.as_ref().is_some_and(|d| d.dim() != a.dim()) || db.dim() != b.dim() {
            return Err(shape_err(
                OP,
                "gradient buffers must have the shapes of A and B".to_string(),
            ));
        }
        self.grad_products(a, b, dy, da, db);
        Ok(())
    }

    /// `dA` (when wanted) and `dB`, shapes checked by the caller.
    fn grad_products(
        &self,
        a: ArrayView2<f32>,
        b: ArrayView2<f32>,
        dy: ArrayView2<f32>,
        da: Option<ArrayViewMut2<f32>>,
        mut db: ArrayViewMut2<f32>,
    ) {
        init();
        let (ap, bp) = (
            Self::op_view(a, self.trans_a),
            Self::op_view(b, self.trans_b),
        );
        // d(A') = alpha * dY * B'^T, and dA is its transpose when transA is set; computing the
        // transposed product directly keeps dA in standard layout.
        // Side by side: products under MIN_SPLIT_MACS (most squeeze-excitation ones) are one
        // call each, and one after the other they left the other threads idle (the same
        // products either way).
        rayon::join(
            || {
                let Some(mut da) = da else { return };
                if self.trans_a {
                    par_mat_mul(self.alpha, &bp, &dy.t(), &mut da, None);
                } else {
                    par_mat_mul(self.alpha, &dy, &bp.t(), &mut da, None);
                }
            },
            || {
                if self.trans_b {
                    par_mat_mul(self.alpha, &dy.t(), &ap, &mut db, None);
                } else {
                    par_mat_mul(self.alpha, &ap.t(), &dy, &mut db, None);
                }
            },
        );
    }

    /// Triple loop from the definition. Test oracle only.
    pub fn reference<T: NdFloat>(
        &self,
        a: ArrayView2<T>,
        b: ArrayView2<T>,
        c: Option<ArrayViewD<T>>,
    ) -> Result<Array2<T>> {
        let [m, n] = self.output_shape(a.shape(), b.shape(), c.as_ref().map(|c| c.shape()))?;
        let (ap, bp) = (
            Self::op_view(a, self.trans_a),
            Self::op_view(b, self.trans_b),
        );
        let (alpha, beta) = (
            T::from(self.alpha).expect("f32 fits"),
            T::from(self.beta).expect("f32 fits"),
        );
        let cb = c.map(|c| {
            let c2 = Self::c_as_2d(c.shape(), m, n).expect("checked");
            c.into_shape_with_order(IxDyn(&c2))
                .expect("same size")
                .into_dimensionality::<Ix2>()
                .expect("rank 2")
        });
        let mut y = Array2::zeros((m, n));
        for ((i, j), out) in y.indexed_iter_mut() {
            let mut s = T::zero();
            for k in 0..ap.ncols() {
                s += ap[[i, k]] * bp[[k, j]];
            }
            *out = alpha * s;
            if let Some(c) = &cb {
                *out += beta * c[[i.min(c.nrows() - 1), j.min(c.ncols() - 1)]];
            }
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::testutil::*;
    use crate::engine::EngineError;
    use ndarray::Array2;

    fn check(g: Gemm, m: usize, k: usize, n: usize, c_shape: Option<&[usize]>, seed: u64) {
        let mut rng = Rng::new(seed);
        let a = rand_array(&mut rng, if g.trans_a { (k, m) } else { (m, k) }, -1.0, 1.0);
        let b = rand_array(&mut rng, if g.trans_b { (n, k) } else { (k, n) }, -1.0, 1.0);
        let c = c_shape.map(|s| rand_array(&mut rng, IxDyn(s), -1.0, 1.0));
        let y = g
            .forward(a.view(), b.view(), c.as_ref().map(|c| c.view()))
            .unwrap();
        let yr = g
            .reference(a.view(), b.view(), c.as_ref().map(|c| c.view()))
            .unwrap();
        assert_eq!(y.shape(), &[m, n]);
        assert_close("forward", &y.view(), &yr.view(), 1e-5);

        let r = rand_array(&mut rng, (m, n), -1.0, 1.0);
        let gr = g.backward(a.view(), b.view(), c_shape, r.view()).unwrap();
        let (a64, b64, r64) = (to_f64(&a.view()), to_f64(&b.view()), to_f64(&r.view()));
        let c64 = c.as_ref().map(|c| to_f64(&c.view()));
        let loss = |a: &Array2<f64>, b: &Array2<f64>, c: Option<&ArrayD<f64>>| {
            dot_loss(
                &g.reference(a.view(), b.view(), c.map(|c| c.view()))
                    .unwrap(),
                &r64,
            )
        };
        assert_grad(
            "da",
            &gr.da.view(),
            &fd_grad(&a64, |a| loss(a, &b64, c64.as_ref())).view(),
        );
        assert_grad(
            "db",
            &gr.db.view(),
            &fd_grad(&b64, |b| loss(&a64, b, c64.as_ref())).view(),
        );
        if let Some(c64) = &c64 {
            let fd = fd_grad(c64, |c| loss(&a64, &b64, Some(c)));
            assert_grad("dc", &gr.dc.unwrap().view(), &fd.view());
        } else {
            assert!(gr.dc.is_none());
        }
    }

    fn gemm(alpha: f32, beta: f32, trans_a: bool, trans_b: bool) -> Gemm {
        Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        }
    }

    #[test]
    fn linear_layer_bias_row() {
        // PyTorch's nn.Linear export: transB = 1, C = bias [N].
        check(gemm(1.0, 1.0, false, true), 5, 9, 10, Some(&[10]), 1);
    }

    #[test]
    fn no_transposes_no_c() {
        check(Gemm::default(), 6, 11, 7, None, 2);
    }

    #[test]
    fn trans_a() {
        check(gemm(0.5, 2.0, true, false), 4, 9, 8, Some(&[4, 8]), 3);
    }

    #[test]
    fn trans_a_and_b_with_column_c() {
        check(gemm(1.5, -0.5, true, true), 7, 3, 9, Some(&[7, 1]), 4);
    }

    #[test]
    fn scalar_and_row_c() {
        check(gemm(1.0, 0.7, false, false), 3, 10, 12, Some(&[]), 5);
        check(gemm(1.0, 0.7, false, true), 3, 10, 12, Some(&[1, 12]), 6);
        check(gemm(1.0, 0.7, false, true), 3, 10, 12, Some(&[1]), 7);
    }

    #[test]
    fn large_enough_for_blas() {
        check(gemm(1.0, 1.0, false, true), 16, 64, 10, Some(&[10]), 8);
    }

    /// Products large enough to split ([`par_mat_mul`]: by columns, and by rows when the output
    /// is tall) against f64 products, under every transpose combination, and the same bits on
    /// 1 and 3 threads.
    #[test]
    fn split_products_match_f64_and_do_not_depend_on_threads() {
        // Wide, tall, and a squeeze-excitation reduction (no side over SPLIT: two row ranges).
        for (m, k, n) in [(64, 160, 300), (300, 160, 64), (64, 1152, 48)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let g = gemm(0.5, 0.7, ta, tb);
                let mut rng = Rng::new(3);
                let a = rand_array(&mut rng, if ta { (k, m) } else { (m, k) }, -1.0, 1.0);
                let b = rand_array(&mut rng, if tb { (n, k) } else { (k, n) }, -1.0, 1.0);
                let dy = rand_array(&mut rng, (m, n), -1.0, 1.0);
                // C, added range by range: a bias row, or a column when B is transposed.
                let c_shape = if tb { (m, 1) } else { (1, n) };
                let c = rand_array(&mut rng, c_shape, -1.0, 1.0);
                let run = |threads: usize| {
                    on_threads(threads, || {
                        let y = g
                            .forward(a.view(), b.view(), Some(c.view().into_dyn()))
                            .unwrap();
                        let gr = g.backward(a.view(), b.view(), None, dy.view()).unwrap();
                        (y, gr.da, gr.db)
                    })
                };
                let (one, three) = (run(1), run(3));
                assert_eq!(one, three, "{m}x{k}x{n} transA {ta} transB {tb}");
                let (a64, b64, dy64) = (to_f64(&a.view()), to_f64(&b.view()), to_f64(&dy.view()));
                let ap = if ta { a64.t().to_owned() } else { a64.clone() };
                let bp = if tb { b64.t().to_owned() } else { b64.clone() };
                let y64 = ap.dot(&bp) * 0.5 + to_f64(&c.view()) * 0.7;
                let dap = dy64.dot(&bp.t()) * 0.5;
                let dbp = ap.t().dot(&dy64) * 0.5;
                let da64 = if ta { dap.t().to_owned() } else { dap };
                let db64 = if tb { dbp.t().to_owned() } else { dbp };
                // Worst error over the largest exact entry: f32 sums of 64-300 products.
                let rel = |fast: &Array2<f32>, exact: &Array2<f64>| {
                    let scale = exact.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                    let worst = fast
                        .iter()
                        .zip(exact)
                        .fold(0.0f64, |m, (&f, &e)| m.max((f64::from(f) - e).abs()));
                    worst / scale
                };
                for (what, fast, exact) in [
                    ("y", &one.0, &y64),
                    ("da", &one.1, &da64),
                    ("db", &one.2, &db64),
                ] {
                    let e = rel(fast, exact);
                    assert!(
                        e < 1e-6,
                        "{what} {m}x{k}x{n} transA {ta} transB {tb}: {e:e}"
                    );
                }
            }
        }
    }

    /// An even number of ranges of at most [`SPLIT`], on multiples of 16 but the last,
    /// covering the product, for every width from `2 * MIN_SPLIT_LEN` to 20,000.
    #[test]
    fn split_ranges_are_even_in_count_and_cover_the_product() {
        for len in 2 * MIN_SPLIT_LEN..20_000 {
            let b = split_bounds(len);
            let tasks = b.len() - 1;
            assert_eq!((b[0], b[tasks]), (0, len), "{len}: {b:?}");
            assert_eq!(tasks % 2, 0, "{len}: {b:?}");
            for w in b.windows(2) {
                assert!(
                    w[0] % 16 == 0 && w[1] > w[0] && w[1] - w[0] <= SPLIT,
                    "{len}: {b:?}"
                );
            }
        }
        assert_eq!(split_bounds(576), [0, 96, 192, 288, 384, 480, 576]);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let g = Gemm::default();
        let err = |r: Result<[usize; 2]>| matches!(r, Err(EngineError::Shape { .. }));
        assert!(err(g.output_shape(&[2, 3], &[4, 5], None)));
        assert!(err(g.output_shape(&[2, 3, 1], &[3, 5], None)));
        assert!(err(g.output_shape(&[2, 3], &[3, 5], Some(&[3]))));
        assert!(err(g.output_shape(&[2, 3], &[3, 5], Some(&[2, 5, 1]))));
        assert!(g.output_shape(&[2, 3], &[3, 5], Some(&[2, 1])).is_ok());
        let (a, b) = (Array2::<f32>::zeros((2, 3)), Array2::<f32>::zeros((3, 5)));
        let dy = Array2::<f32>::zeros((5, 2));
        assert!(g.backward(a.view(), b.view(), None, dy.view()).is_err());
    }
}
