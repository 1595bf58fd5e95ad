//! The raster: an RGB canvas with alpha blending, rectangles, text from the bitmap font, and
//! coverage masks for anti-aliased lines (distance to the segment), dots and dashes.

use image::{Rgb, RgbImage};
use noto_sans_mono_bitmap::get_raster;

use super::font::{Align, Font};
use super::layout::Rect;
use super::BACKGROUND;

pub(super) struct Canvas {
    pub(super) img: RgbImage,
}

impl Canvas {
    pub(super) fn new(w: u32, h: u32) -> Canvas {
        Canvas {
            img: RgbImage::from_pixel(w, h, BACKGROUND),
        }
    }

    /// Mixes `colour` into pixel (x, y) with opacity `alpha` in [0, 1]; outside is a no-op.
    pub(super) fn blend(&mut self, x: i32, y: i32, colour: Rgb<u8>, alpha: f64) {
        if x < 0 || y < 0 || x >= self.img.width() as i32 || y >= self.img.height() as i32 {
            return;
        }
        let a = alpha.clamp(0.0, 1.0);
        if a <= 0.0 {
            return;
        }
        let p = self.img.get_pixel_mut(x as u32, y as u32);
        for (dst, src) in p.0.iter_mut().zip(colour.0) {
            *dst = (f64::from(*dst) * (1.0 - a) + f64::from(src) * a).round() as u8;
        }
    }

    pub(super) fn fill_rect(
        &mut self,
        x0: i32,
        y0: i32,
        x1: i32,
        y1: i32,
        colour: Rgb<u8>,
        alpha: f64,
    ) {
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.blend(x, y, colour, alpha);
            }
        }
    }

    pub(super) fn hline(&mut self, x0: i32, x1: i32, y: i32, colour: Rgb<u8>) {
        self.fill_rect(x0, y, x1, y, colour, 1.0);
    }

    pub(super) fn vline(&mut self, x: i32, y0: i32, y1: i32, colour: Rgb<u8>) {
        self.fill_rect(x, y0, x, y1, colour, 1.0);
    }

    pub(super) fn stroke_rect(&mut self, r: Rect, colour: Rgb<u8>) {
        self.hline(r.x0, r.x1, r.y0, colour);
        self.hline(r.x0, r.x1, r.y1, colour);
        self.vline(r.x0, r.y0, r.y1, colour);
        self.vline(r.x1, r.y0, r.y1, colour);
    }

    /// Draws `s` with its top at `y`; `x` is its left edge, centre or right edge by `align`.
    /// Characters the font lacks are drawn as '?'.
    pub(super) fn text(
        &mut self,
        x: i32,
        y: i32,
        s: &str,
        font: Font,
        colour: Rgb<u8>,
        align: Align,
    ) {
        let w = font.width(s);
        let mut cx = match align {
            Align::Left => x,
            Align::Center => x - w / 2,
            Align::Right => x - w,
        };
        for ch in s.chars() {
            let raster = get_raster(ch, font.weight, font.size)
                .or_else(|| get_raster('?', font.weight, font.size));
            if let Some(r) = raster {
                for (gy, row) in r.rows().enumerate() {
                    for (gx, &v) in row.iter().enumerate() {
                        if v > 0 {
                            self.blend(cx + gx as i32, y + gy as i32, colour, f64::from(v) / 255.0);
                        }
                    }
                }
            }
            cx += font.char_width();
        }
    }

    /// Paints `colour` through a coverage mask laid over `r`.
    pub(super) fn paint(&mut self, mask: &Mask, colour: Rgb<u8>) {
        for y in 0..mask.h {
            for x in 0..mask.w {
                let a = mask.data[(y * mask.w + x) as usize];
                if a > 0.0 {
                    self.blend(mask.x0 + x, mask.y0 + y, colour, f64::from(a));
                }
            }
        }
    }
}

/// Per-pixel coverage in [0, 1] over a rectangle of the canvas; shapes take the maximum, so that
/// overlapping pieces of one curve do not darken its joints.
pub(super) struct Mask {
    pub(super) x0: i32,
    pub(super) y0: i32,
    pub(super) w: i32,
    pub(super) h: i32,
    pub(super) data: Vec<f32>,
}

impl Mask {
    pub(super) fn new(r: Rect) -> Mask {
        let w = r.x1 - r.x0 + 1;
        let h = r.y1 - r.y0 + 1;
        Mask {
            x0: r.x0,
            y0: r.y0,
            w,
            h,
            data: vec![0.0; (w * h) as usize],
        }
    }

    pub(super) fn cover(&mut self, x: i32, y: i32, a: f64) {
        let (lx, ly) = (x - self.x0, y - self.y0);
        if lx < 0 || ly < 0 || lx >= self.w || ly >= self.h {
            return;
        }
        let cell = &mut self.data[(ly * self.w + lx) as usize];
        *cell = cell.max(a.clamp(0.0, 1.0) as f32);
    }

    /// An anti-aliased segment of the given width between two points in pixel coordinates
    /// (pixel (x, y) covers [x, x+1) x [y, y+1)).
    pub(super) fn segment(&mut self, a: (f64, f64), b: (f64, f64), width: f64) {
        let hw = width / 2.0;
        let reach = hw + 1.0;
        let xmin = (a.0.min(b.0) - reach).floor().max((self.x0 - 1) as f64) as i32;
        let xmax = (a.0.max(b.0) + reach).ceil().min((self.x0 + self.w) as f64) as i32;
        let ymin = (a.1.min(b.1) - reach).floor().max((self.y0 - 1) as f64) as i32;
        let ymax = (a.1.max(b.1) + reach).ceil().min((self.y0 + self.h) as f64) as i32;
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let len2 = dx * dx + dy * dy;
        for y in ymin..=ymax {
            for x in xmin..=xmax {
                let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
                let t = if len2 > 0.0 {
                    (((px - a.0) * dx + (py - a.1) * dy) / len2).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let (qx, qy) = (a.0 + t * dx - px, a.1 + t * dy - py);
                let d = (qx * qx + qy * qy).sqrt();
                let cov = hw + 0.5 - d;
                if cov > 0.0 {
                    self.cover(x, y, cov);
                }
            }
        }
    }

    pub(super) fn disc(&mut self, c: (f64, f64), radius: f64) {
        self.segment(c, c, 2.0 * radius);
    }

    /// A polyline, solid or dashed with (on, off) lengths in pixels.
    pub(super) fn polyline(&mut self, pts: &[(f64, f64)], width: f64, dash: Option<(f64, f64)>) {
        let Some((on, off)) = dash.filter(|(on, off)| *on > 0.0 && *off >= 0.0) else {
            for w in pts.windows(2) {
                self.segment(w[0], w[1], width);
            }
            return;
        };
        // Dash k covers [k * period, k * period + on] of the distance along the whole line; each
        // segment draws the dashes that overlap it. Counting dashes (rather than stepping a
        // phase) cannot stall on rounding.
        let period = on + off;
        let mut start = 0.0;
        for w in pts.windows(2) {
            let (a, b) = (w[0], w[1]);
            let len = ((b.0 - a.0).powi(2) + (b.1 - a.1).powi(2)).sqrt();
            if !(len.is_finite() && len > 0.0) {
                continue;
            }
            let end = start + len;
            let at = |d: f64| {
                let t = ((d - start) / len).clamp(0.0, 1.0);
                (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t)
            };
            let first = (start / period).floor() as u64;
            let last = (end / period).floor() as u64;
            for k in first..=last {
                let d0 = (k as f64 * period).max(start);
                let d1 = (k as f64 * period + on).min(end);
                if d1 > d0 {
                    self.segment(at(d0), at(d1), width);
                }
            }
            start = end;
        }
    }
}
