//! Depthwise convolution (one input channel per group) as direct loops: a GEMM with an inner
//! dimension of `kh*kw` would be all overhead.
//!
//! Two layouts. Large stride-1 planes run per channel over "flat taps" (one long contiguous pass
//! per tap, vectorised along the row). Small planes and strided convs run on tiles of
//! [`LANES`] channels interleaved (`[row][col][lane]`): every tap is then a contiguous
//! `LANES`-wide multiply-add whatever the plane size or stride. EfficientNet-B0 and MobileNet at
//! 64x64 input have most of their depthwise channels on 4x4 and 2x2 planes, where a per-channel
//! row is 2 to 4 floats and the flat taps spent most of their time in loop overhead and junk
//! columns, and strided convs gathered element by element.

/// Channels per tile of the interleaved path: two SSE vectors (the crate builds for baseline
/// x86-64), and the channel counts of the MobileNets and EfficientNets are multiples of 8.
const LANES: usize = 8;

/// The first [`LANES`] floats of `s` as an array, so the lane loops compile to vector ops
/// without a bounds check per lane.
#[inline(always)]
fn lanes(s: &[f32]) -> &[f32; LANES] {
    s[..LANES].try_into().expect("LANES floats")
}

/// `a + b * c` lane by lane (a multiply and an add, no FMA: results must not depend on the
/// CPU). By value: with all loads before the stores the compiler sees no aliasing and emits
/// vector ops; through references it kept the lanes scalar.
#[inline(always)]
fn mul_add(a: [f32; LANES], b: [f32; LANES], c: [f32; LANES]) -> [f32; LANES] {
    std::array::from_fn(|l| a[l] + b[l] * c[l])
}

#[inline(always)]
fn lanes_mut(s: &mut [f32]) -> &mut [f32; LANES] {
    (&mut s[..LANES]).try_into().expect("LANES floats")
}

use super::Geom;
use crate::engine::ops::simd::simd_dispatch;

simd_dispatch! {
    /// [`Geom::depthwise_forward_flat`] built for AVX2 (see there).
    fn forward_flat(g: &Geom, x: &[f32], w: &[f32], y: &mut [f32])
        => Geom::forward_flat_body, (g, x, w, y); ["avx2"]
}

simd_dispatch! {
    /// [`Geom::depthwise_backward_flat`] built for AVX2.
    fn backward_flat(
        g: &Geom,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
    ) => Geom::backward_flat_body, (g, x, w, dy, dx, dw); ["avx2"]
}
use crate::engine::ops::{dot, valid_range};

impl Geom {
    /// Visits every tap `(ki, kj)` and valid output row `oy` of a depthwise plane, handing over
    /// the input row index and the valid output column range, so the three depthwise kernels
    /// share one piece of window arithmetic.
    pub(super) fn for_each_tap_row(
        &self,
        mut f: impl FnMut(usize, usize, usize, (usize, usize), isize),
    ) {
        for ki in 0..self.kh {
            for kj in 0..self.kw {
                let (yoff, xoff) = self.tap_offsets(ki, kj);
                let (ylo, yhi) = valid_range(self.oh, self.h, self.sh, yoff);
                let xr = valid_range(self.ow, self.w, self.sw, xoff);
                if xr.0 >= xr.1 {
                    // The tap misses the input in every output column (a dilated tap beyond a
                    // narrow input): nothing to add, and `xlo + xoff` would index before the row.
                    continue;
                }
                for oy in ylo..yhi {
                    let iy = ((oy * self.sh) as isize + yoff) as usize;
                    f(ki * self.kw + kj, oy, iy, xr, xoff);
                }
            }
        }
    }

    /// Padded width and height of a stride-1 plane, and the length of one flat tap: with the
    /// input zero-padded to `hp x wp` and the output computed at width `wp` (its last `wp - ow`
    /// columns are junk, dropped when cropping), tap `(ki, kj)` is the contiguous slice starting at
    /// `ki*dh*wp + kj*dw`. One long axpy per tap instead of `oh` short row loops: on 8x8 planes
    /// the row loops are all overhead.
    pub(super) fn flat_geometry(&self) -> (usize, usize, usize) {
        let hp = self.oh + (self.kh - 1) * self.dh;
        let wp = self.ow + (self.kw - 1) * self.dw;
        (hp, wp, (self.oh - 1) * wp + self.ow)
    }

    pub(super) fn flat_shift(&self, t: usize, wp: usize) -> usize {
        (t / self.kw) * self.dh * wp + (t % self.kw) * self.dw
    }

    /// Copies `plane` into the interior of `padded`; the border is never written, so it stays 0.
    #[inline(always)]
    pub(super) fn pad_plane(&self, plane: &[f32], wp: usize, padded: &mut [f32]) {
        for (iy, row) in plane.chunks(self.w).enumerate() {
            padded[(iy + self.pt) * wp + self.pl..][..self.w].copy_from_slice(row);
        }
    }

    /// Stride-1 depthwise forward for one image via flat taps; `y` holds the bias on entry.
    /// Compiled for AVX2 where the CPU has it (the same f32 operations in the same order at any
    /// width, so the same bits): `conv_kernels depthwise/3x3_s1_144ch_16px` 4.1-4.4 -> 3.7-3.8
    /// ms. AVX-512 was slower (5.6 ms): the 16-float rows of a 16x16 plane are one vector, and
    /// the remainder loops run on the rest.
    pub(super) fn depthwise_forward_flat(&self, x: &[f32], w: &[f32], y: &mut [f32]) {
        forward_flat(self, x, w, y)
    }

    #[inline(always)]
    fn forward_flat_body(&self, x: &[f32], w: &[f32], y: &mut [f32]) {
        self.depthwise_forward_flat_with(x, w, y, true)
    }

    /// [`Self::depthwise_forward_flat`]; `fused: false` keeps to the generic per-tap passes (the
    /// test oracle of [`Self::depthwise_rows`]).
    #[inline(always)]
    pub(super) fn depthwise_forward_flat_with(
        &self,
        x: &[f32],
        w: &[f32],
        y: &mut [f32],
        fused: bool,
    ) {
        let (hw, ohw, taps) = (self.h * self.w, self.oh * self.ow, self.kh * self.kw);
        let (hp, wp, len) = self.flat_geometry();
        let mut xpad = vec![0.0f32; hp * wp];
        let mut wide = vec![0.0f32; len];
        for (ic, plane) in x.chunks(hw).enumerate() {
            self.pad_plane(plane, wp, &mut xpad);
            for oc in ic * self.cog..(ic + 1) * self.cog {
                let (wk, yp) = (&w[oc * taps..][..taps], &mut y[oc * ohw..][..ohw]);
                match taps {
                    _ if !fused => {}
                    3 => {
                        self.depthwise_rows::<3>(&xpad, wp, wk, yp);
                        continue;
                    }
                    9 => {
                        self.depthwise_rows::<9>(&xpad, wp, wk, yp);
                        continue;
                    }
                    _ => {}
                }
                wide.fill(0.0);
                for (t, &wv) in w[oc * taps..][..taps].iter().enumerate() {
                    let src = &xpad[self.flat_shift(t, wp)..][..len];
                    wide.iter_mut().zip(src).for_each(|(o, &i)| *o += wv * i);
                }
                for (oy, yrow) in y[oc * ohw..][..ohw].chunks_mut(self.ow).enumerate() {
                    yrow.iter_mut()
                        .zip(&wide[oy * wp..])
                        .for_each(|(o, &v)| *o += v);
                }
            }
        }
    }

    /// One output channel of [`Self::depthwise_forward_flat`] for a kernel of `T` taps (3: CP's
    /// kx1 and 1xk factors; 9: 3x3) in one pass, straight into `y`'s rows: the generic path
    /// makes a pass over a wide buffer per tap, then one more to copy it out, which for three
    /// taps is as much traffic as arithmetic. Adds the taps in the same order, from 0, before
    /// adding to `y`, so results are bitwise those of the generic path.
    #[inline(always)]
    pub(super) fn depthwise_rows<const T: usize>(
        &self,
        xpad: &[f32],
        wp: usize,
        wk: &[f32],
        yp: &mut [f32],
    ) {
        let wv: [f32; T] = std::array::from_fn(|t| wk[t]);
        let shifts: [usize; T] = std::array::from_fn(|t| self.flat_shift(t, wp));
        let ow = self.ow;
        for (oy, yrow) in yp.chunks_exact_mut(ow).enumerate() {
            let src: [&[f32]; T] = std::array::from_fn(|t| &xpad[oy * wp + shifts[t]..][..ow]);
            for (ox, o) in yrow.iter_mut().enumerate() {
                let mut acc = 0.0f32;
                for t in 0..T {
                    acc += wv[t] * src[t][ox];
                }
                *o += acc;
            }
        }
    }

    /// Stride-1 depthwise backward for one image via flat taps: adds to `dw`, writes `dx`.
    /// Compiled for AVX2 where the CPU has it, as the forward.
    pub(super) fn depthwise_backward_flat(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
    ) {
        backward_flat(self, x, w, dy, dx, dw)
    }

    #[inline(always)]
    pub(super) fn backward_flat_body(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        mut dx: Option<&mut [f32]>,
        dw: &mut [f32],
    ) {
        let (hw, ohw, taps) = (self.h * self.w, self.oh * self.ow, self.kh * self.kw);
        let (hp, wp, len) = self.flat_geometry();
        let mut xpad = vec![0.0f32; hp * wp];
        // Junk columns of the wide gradient are never written, so they stay 0 and add nothing.
        let mut dy_wide = vec![0.0f32; len];
        let mut dxpad = vec![0.0f32; if dx.is_some() { hp * wp } else { 0 }];
        for (ic, plane) in x.chunks(hw).enumerate() {
            self.pad_plane(plane, wp, &mut xpad);
            dxpad.fill(0.0);
            for oc in ic * self.cog..(ic + 1) * self.cog {
                for (oy, row) in dy[oc * ohw..][..ohw].chunks(self.ow).enumerate() {
                    dy_wide[oy * wp..][..self.ow].copy_from_slice(row);
                }
                for t in 0..taps {
                    let shift = self.flat_shift(t, wp);
                    dw[oc * taps + t] += dot(&dy_wide, &xpad[shift..][..len]);
                    if dx.is_some() {
                        let wv = w[oc * taps + t];
                        dxpad[shift..][..len]
                            .iter_mut()
                            .zip(&dy_wide)
                            .for_each(|(d, &g)| *d += wv * g);
                    }
                }
            }
            if let Some(dx) = dx.as_deref_mut() {
                for (iy, row) in dx[ic * hw..][..hw].chunks_mut(self.w).enumerate() {
                    row.copy_from_slice(&dxpad[(iy + self.pt) * wp + self.pl..][..self.w]);
                }
            }
        }
    }

    /// Whether [`Self::depthwise_forward`] and [`Self::depthwise_backward`] run on channel
    /// tiles (the same layers now run channels-last, `depthwise_cl.rs`, 1.3-2.5x faster again;
    /// the tiles stay as its test oracle and benchmark baseline, and when it is switched off): strided convs (the per-channel row loops gather element by element), and planes
    /// narrower than 8 outputs, or 8 with a kernel above 3x3, where a per-channel pass is too
    /// short to vectorise. Measured on one thread, 32 images, forward + backward, per-channel
    /// -> tiled (interleaved in one process, 2026-12-02; `cargo bench --bench conv_kernels --
    /// depthwise` times the shapes as they run now): 96 channels 3x3 stride 2
    /// on 32x32 11.7 -> 4.8 ms, 672 5x5 stride 1 on 4x4 9.6 -> 5.0, 1152 5x5 on 2x2 8.8 -> 3.6,
    /// 240 5x5 on 8x8 7.0 -> 5.3; but 192 3x3 on 8x8 1.9 -> 2.2 and 144 3x3 on 16x16 3.7 ->
    /// 5.0, where the flat taps' rows are long enough and the tile's transposes cost more.
    pub(super) fn depthwise_tiles(&self) -> bool {
        let taps = self.kh * self.kw;
        self.sh != 1 || self.sw != 1 || self.ow < 8 || (self.ow == 8 && taps > 9)
    }

    /// Depthwise forward for one image; `y` holds the bias (or zeros) on entry.
    pub(super) fn depthwise_forward(&self, x: &[f32], w: &[f32], y: &mut [f32]) {
        if self.depthwise_tiles() {
            return self.depthwise_forward_tiled(x, w, y);
        }
        self.depthwise_forward_per_channel(x, w, y)
    }

    /// The per-channel forward: flat taps for stride 1, else row loops. The tiled path's test
    /// oracle for strided convs.
    pub(super) fn depthwise_forward_per_channel(&self, x: &[f32], w: &[f32], y: &mut [f32]) {
        if self.sh == 1 && self.sw == 1 {
            return self.depthwise_forward_flat(x, w, y);
        }
        let (hw, ohw, taps) = (self.h * self.w, self.oh * self.ow, self.kh * self.kw);
        for (oc, yp) in y.chunks_mut(ohw).enumerate() {
            let xp = &x[(oc / self.cog) * hw..][..hw];
            let wk = &w[oc * taps..][..taps];
            self.for_each_tap_row(|t, oy, iy, (xlo, xhi), xoff| {
                let wv = wk[t];
                let xrow = &xp[iy * self.w..][..self.w];
                let yrow = &mut yp[oy * self.ow..][..self.ow];
                if self.sw == 1 {
                    let start = (xlo as isize + xoff) as usize;
                    yrow[xlo..xhi]
                        .iter_mut()
                        .zip(&xrow[start..])
                        .for_each(|(o, &i)| *o += wv * i);
                } else {
                    for (ox, o) in yrow.iter_mut().enumerate().take(xhi).skip(xlo) {
                        *o += wv * xrow[((ox * self.sw) as isize + xoff) as usize];
                    }
                }
            });
        }
    }

    /// Depthwise backward for one image: adds to `dw`, writes `dx` (zeroed) when given.
    pub(super) fn depthwise_backward(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
    ) {
        if self.depthwise_tiles() {
            return self.depthwise_backward_tiled(x, w, dy, dx, dw);
        }
        self.depthwise_backward_per_channel(x, w, dy, dx, dw)
    }

    /// The per-channel backward (flat taps for stride 1, else row loops); `dx` zeroed on entry.
    pub(super) fn depthwise_backward_per_channel(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        mut dx: Option<&mut [f32]>,
        dw: &mut [f32],
    ) {
        if self.sh == 1 && self.sw == 1 {
            return self.depthwise_backward_flat(x, w, dy, dx, dw);
        }
        let (hw, ohw, taps) = (self.h * self.w, self.oh * self.ow, self.kh * self.kw);
        for (oc, dyp) in dy.chunks(ohw).enumerate() {
            let ic = oc / self.cog;
            let xp = &x[ic * hw..][..hw];
            let wk = &w[oc * taps..][..taps];
            let dwk = &mut dw[oc * taps..][..taps];
            let mut dxp = dx.as_deref_mut().map(|d| &mut d[ic * hw..][..hw]);
            self.for_each_tap_row(|t, oy, iy, (xlo, xhi), xoff| {
                let dyrow = &dyp[oy * self.ow..][..self.ow];
                let xrow = &xp[iy * self.w..][..self.w];
                if self.sw == 1 {
                    let start = (xlo as isize + xoff) as usize;
                    let n = xhi - xlo;
                    dwk[t] += dot(&dyrow[xlo..xhi], &xrow[start..start + n]);
                    if let Some(dxp) = dxp.as_deref_mut() {
                        let wv = wk[t];
                        dxp[iy * self.w + start..][..n]
                            .iter_mut()
                            .zip(&dyrow[xlo..xhi])
                            .for_each(|(d, &g)| *d += wv * g);
                    }
                } else {
                    let mut acc = 0.0f32;
                    for (ox, &g) in dyrow.iter().enumerate().take(xhi).skip(xlo) {
                        let ix = ((ox * self.sw) as isize + xoff) as usize;
                        acc += g * xrow[ix];
                        if let Some(dxp) = dxp.as_deref_mut() {
                            dxp[iy * self.w + ix] += wk[t] * g;
                        }
                    }
                    dwk[t] += acc;
                }
            });
        }
    }

    /// Rows and columns of a tile: the padded input, and far enough for every tap of every
    /// output (a stride that does not divide the padded size leaves input beyond the last
    /// window, a dilated kernel can reach past the bottom pad).
    fn tile_geometry(&self) -> (usize, usize) {
        let hp = (self.pt + self.h).max((self.oh - 1) * self.sh + (self.kh - 1) * self.dh + 1);
        let wp = (self.pl + self.w).max((self.ow - 1) * self.sw + (self.kw - 1) * self.dw + 1);
        (hp, wp)
    }

    /// Output channels `c0..c0 + nc` of one image: their input planes into the interior of
    /// `xt` (`[row][col][lane]`, the border never written so it stays 0) and their weights into
    /// `wt` (`[tap][lane]`, lanes past `nc` zeroed; their `xt` lanes hold stale values that
    /// only reach lanes nobody reads).
    #[allow(clippy::too_many_arguments)]
    fn gather_tile(
        &self,
        x: &[f32],
        w: &[f32],
        c0: usize,
        nc: usize,
        wp: usize,
        xt: &mut [f32],
        wt: &mut [f32],
    ) {
        let (hw, taps) = (self.h * self.w, self.kh * self.kw);
        for lane in 0..nc {
            let plane = &x[((c0 + lane) / self.cog) * hw..][..hw];
            for (iy, row) in plane.chunks_exact(self.w).enumerate() {
                let base = ((iy + self.pt) * wp + self.pl) * LANES + lane;
                for (ix, &v) in row.iter().enumerate() {
                    xt[base + ix * LANES] = v;
                }
            }
        }
        wt.fill(0.0);
        for lane in 0..nc {
            for (t, &v) in w[(c0 + lane) * taps..][..taps].iter().enumerate() {
                wt[t * LANES + lane] = v;
            }
        }
    }

    /// Offset in a tile of tap `(ki, kj)`'s input for output row `oy`, column 0.
    fn tile_tap(&self, oy: usize, ki: usize, kj: usize, wp: usize) -> usize {
        ((oy * self.sh + ki * self.dh) * wp + kj * self.dw) * LANES
    }

    /// Forward for one image on channel tiles; `y` holds the bias (or zeros) on entry. Each
    /// output sums its taps in order from 0 (padding included) and then adds to `y`, as the
    /// flat and rows paths do, so at stride 1 the results are bitwise theirs.
    pub(super) fn depthwise_forward_tiled(&self, x: &[f32], w: &[f32], y: &mut [f32]) {
        let (ohw, sw) = (self.oh * self.ow, self.sw * LANES);
        let (hp, wp) = self.tile_geometry();
        let mut xt = vec![0.0f32; hp * wp * LANES];
        let mut wt = vec![0.0f32; self.kh * self.kw * LANES];
        let mut acc = vec![0.0f32; self.ow * LANES];
        for c0 in (0..self.co).step_by(LANES) {
            let nc = LANES.min(self.co - c0);
            self.gather_tile(x, w, c0, nc, wp, &mut xt, &mut wt);
            for oy in 0..self.oh {
                acc.fill(0.0);
                for ki in 0..self.kh {
                    for kj in 0..self.kw {
                        let t = ki * self.kw + kj;
                        let wv = *lanes(&wt[t * LANES..]);
                        let src = &xt[self.tile_tap(oy, ki, kj, wp)..];
                        for (ox, a) in acc.chunks_exact_mut(LANES).enumerate() {
                            let a = lanes_mut(a);
                            *a = mul_add(*a, wv, *lanes(&src[ox * sw..]));
                        }
                    }
                }
                for lane in 0..nc {
                    let yrow = &mut y[(c0 + lane) * ohw + oy * self.ow..][..self.ow];
                    for (ox, o) in yrow.iter_mut().enumerate() {
                        *o += acc[ox * LANES + lane];
                    }
                }
            }
        }
    }

    /// Backward for one image on channel tiles: adds to `dw` and to `dx` (zeroed on entry; a
    /// channel multiplier above 1 sends several lanes to one input plane). One pass over the
    /// output per tap gives both the weight gradient (summed over the plane in row order per
    /// lane, then added to `dw`) and the input gradient.
    pub(super) fn depthwise_backward_tiled(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        mut dx: Option<&mut [f32]>,
        dw: &mut [f32],
    ) {
        let (hw, ohw, taps, sw) = (
            self.h * self.w,
            self.oh * self.ow,
            self.kh * self.kw,
            self.sw * LANES,
        );
        let (hp, wp) = self.tile_geometry();
        let mut xt = vec![0.0f32; hp * wp * LANES];
        let mut wt = vec![0.0f32; taps * LANES];
        let mut dxt = vec![0.0f32; if dx.is_some() { hp * wp * LANES } else { 0 }];
        let mut dwt = vec![0.0f32; taps * LANES];
        let mut g = vec![0.0f32; self.ow * LANES];
        for c0 in (0..self.co).step_by(LANES) {
            let nc = LANES.min(self.co - c0);
            self.gather_tile(x, w, c0, nc, wp, &mut xt, &mut wt);
            dwt.fill(0.0);
            dxt.fill(0.0);
            for oy in 0..self.oh {
                for lane in 0..nc {
                    let dyrow = &dy[(c0 + lane) * ohw + oy * self.ow..][..self.ow];
                    for (ox, &v) in dyrow.iter().enumerate() {
                        g[ox * LANES + lane] = v;
                    }
                }
                for ki in 0..self.kh {
                    for kj in 0..self.kw {
                        let t = ki * self.kw + kj;
                        let at = self.tile_tap(oy, ki, kj, wp);
                        let mut a = *lanes(&dwt[t * LANES..]);
                        for (ox, gv) in g.chunks_exact(LANES).enumerate() {
                            a = mul_add(a, *lanes(gv), *lanes(&xt[at + ox * sw..]));
                        }
                        *lanes_mut(&mut dwt[t * LANES..]) = a;
                        if dx.is_some() {
                            let wv = *lanes(&wt[t * LANES..]);
                            for (ox, gv) in g.chunks_exact(LANES).enumerate() {
                                let d = lanes_mut(&mut dxt[at + ox * sw..]);
                                *d = mul_add(*d, wv, *lanes(gv));
                            }
                        }
                    }
                }
            }
            for lane in 0..nc {
                let dwk = &mut dw[(c0 + lane) * taps..][..taps];
                for (t, d) in dwk.iter_mut().enumerate() {
                    *d += dwt[t * LANES + lane];
                }
            }
            if let Some(dx) = dx.as_deref_mut() {
                for lane in 0..nc {
                    let plane = &mut dx[((c0 + lane) / self.cog) * hw..][..hw];
                    for (iy, row) in plane.chunks_exact_mut(self.w).enumerate() {
                        let base = ((iy + self.pt) * wp + self.pl) * LANES + lane;
                        for (ix, d) in row.iter_mut().enumerate() {
                            *d += dxt[base + ix * LANES];
                        }
                    }
                }
            }
        }
    }
}
