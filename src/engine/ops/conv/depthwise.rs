//! Depthwise convolution (one input channel per group) as direct loops: a GEMM with an inner
//! dimension of `kh*kw` would be all overhead.

use super::Geom;
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
    pub(super) fn pad_plane(&self, plane: &[f32], wp: usize, padded: &mut [f32]) {
        for (iy, row) in plane.chunks(self.w).enumerate() {
            padded[(iy + self.pt) * wp + self.pl..][..self.w].copy_from_slice(row);
        }
    }

    /// Stride-1 depthwise forward for one image via flat taps; `y` holds the bias on entry.
    pub(super) fn depthwise_forward_flat(&self, x: &[f32], w: &[f32], y: &mut [f32]) {
        self.depthwise_forward_flat_with(x, w, y, true)
    }

    /// [`Self::depthwise_forward_flat`]; `fused: false` keeps to the generic per-tap passes (the
    /// test oracle of [`Self::depthwise_rows`]).
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
    pub(super) fn depthwise_backward_flat(
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

    /// Depthwise forward for one image; `y` holds the bias (or zeros) on entry.
    pub(super) fn depthwise_forward(&self, x: &[f32], w: &[f32], y: &mut [f32]) {
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
}
