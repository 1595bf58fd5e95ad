//! The PNG training curve that `elrt train` writes beside its output.
//!
//! The picture is 1000x466 px: on the left the train and test loss against the epoch, with the
//! learning rate as a dashed grey line on a secondary axis at the panel's right; on the right the
//! train and test top-1 accuracy in percent. Every series has a dot at each epoch (so a one-epoch
//! run shows one dot per series). Each panel has a frame, a grid, tick labels, a legend placed in
//! the corner where it covers the fewest curve pixels (with the last loss, the last train and
//! best test accuracy), and the figure has a bold headline and an optional subtitle (the
//! training loop writes the model file and the recipe there).
//!
//! The layout (ranges, pixel positions of every point and marker, labels) is computed first
//! (`Layout`) and then drawn, so that tests can check what the picture shows without reading
//! pixels.
//!
//! # Why it is drawn by hand
//!
//! The curve must render on a fresh Debian machine with no fonts and no extra system libraries,
//! so text cannot come from fontconfig/freetype. The options weighed:
//! - plotters: its text needs either the `ttf` feature (font-kit, which links fontconfig and
//!   freetype and needs a system font) or `ab_glyph` plus a TTF registered from bytes, which means
//!   a second new crate that ships a font, or a font file in the repository. Its bitmap encoder
//!   also pulls image 0.24 (and png 0.17) beside our image 0.25: a duplicate image stack.
//!   Measured here: plotters with `bitmap_backend`, `line_series` and `ab_glyph` is 9 crates and
//!   5.2 s of a 2-core debug build, still without a font.
//! - the `image` crate we already depend on, plus a small embedded bitmap font. font8x8 is 1 bit
//!   per pixel and 8 px tall (blocky at this size); `noto-sans-mono-bitmap` ships Noto Sans Mono
//!   pre-rasterised with anti-aliasing (one byte per pixel), has no dependencies and no build
//!   script, and its glyph tables are `include_bytes!` blobs: 1.3 s to build here, one crate.
//!
//! So this module draws lines (anti-aliased by distance-to-segment coverage), markers, frames and
//! text into an [`image::RgbImage`] and encodes it with image's PNG encoder. The only new crate is
//! noto-sans-mono-bitmap (MIT; the font is under the SIL Open Font License), with only the
//! regular and bold weights at 16 and 20 px raster height and basic Latin enabled; other
//! characters in a title are drawn as '?'.

use std::io::Cursor;
use std::path::Path;

use anyhow::{Context, Result};
use image::{ImageEncoder, Rgb, RgbImage};
use noto_sans_mono_bitmap::{get_raster, get_raster_width, FontWeight, RasterHeight};

/// One point of the training curve, normally one per epoch.
///
/// Accuracies are fractions in `[0, 1]` (as the training loop computes them); the picture shows
/// them in percent. Non-finite values (NaN, ±inf) are skipped, and a `None` test value leaves that
/// point out of the test series; the remaining points of a series are joined in epoch order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CurvePoint {
    pub epoch: f64,
    pub train_loss: f64,
    pub test_loss: Option<f64>,
    pub train_acc: f64,
    pub test_acc: Option<f64>,
    pub lr: f64,
}

/// Width of the picture in pixels.
pub const WIDTH: u32 = 1000;
/// Height of the picture in pixels.
pub const HEIGHT: u32 = 466;

/// Renders the curve and writes it atomically (crate::util::write_atomic(path, &png_bytes)).
pub fn write_png(path: &Path, title: &str, points: &[CurvePoint]) -> Result<()> {
    let png = render_png(title, points)?;
    crate::util::write_atomic(path, &png)
        .with_context(|| format!("{}: cannot write the training curve", path.display()))
}

/// Renders the curve and encodes it as PNG bytes.
pub fn render_png(title: &str, points: &[CurvePoint]) -> Result<Vec<u8>> {
    let img = render(title, points);
    let mut out = Cursor::new(Vec::new());
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .context("cannot encode the training curve as PNG")?;
    Ok(out.into_inner())
}

/// Renders the curve into a [`WIDTH`] x [`HEIGHT`] RGB image. The title's first line (up to a
/// '\n') is the headline, drawn bold; the rest, if any, is a smaller subtitle under it.
pub fn render(title: &str, points: &[CurvePoint]) -> RgbImage {
    draw(&layout(title, points))
}

/// Where everything goes, worked out before a pixel is drawn (the tests read it).
struct Layout {
    headline: String,
    subtitle: Option<String>,
    /// Loss (with the learning rate) on the left, accuracy on the right.
    panels: [PanelLayout; 2],
    /// The learning rate's range on the loss panel's right axis, when it is shown.
    lr_axis: Option<(f64, f64)>,
}

struct PanelLayout {
    rect: Rect,
    title: &'static str,
    x_range: (f64, f64),
    y_range: (f64, f64),
    /// The series that have at least one point, in legend order.
    series: Vec<SeriesLayout>,
}

struct SeriesLayout {
    label: String,
    colour: Rgb<u8>,
    width: f64,
    /// (on, off) lengths in pixels for a dashed line.
    dash: Option<(f64, f64)>,
    /// On a y range of its own (the right axis); drawn under the others.
    secondary: bool,
    /// The points in pixels, in epoch order.
    pixels: Vec<(f64, f64)>,
    /// A dot on every point, so that each epoch shows (a one-epoch run is one visible dot).
    markers: Vec<(f64, f64)>,
    marker_radius: f64,
}

/// A series before layout: its values in data units.
struct Series<'a> {
    label: String,
    colour: Rgb<u8>,
    points: &'a [(f64, f64)],
    width: f64,
    dash: Option<(f64, f64)>,
    /// A y range of its own (a secondary axis) instead of the panel's.
    y_range: Option<(f64, f64)>,
}

impl<'a> Series<'a> {
    fn solid(label: String, colour: Rgb<u8>, points: &'a [(f64, f64)]) -> Self {
        Series {
            label,
            colour,
            points,
            width: 2.0,
            dash: None,
            y_range: None,
        }
    }
}

const TITLE_FONT: Font = Font::new(FontWeight::Bold, RasterHeight::Size20);
/// Top and bottom of both panels' frames.
const PANEL_TOP: i32 = 84;
const PANEL_BOTTOM: i32 = 406;

fn layout(title: &str, points: &[CurvePoint]) -> Layout {
    let (head, sub) = match title.split_once('\n') {
        Some((h, s)) => (h, Some(s.replace('\n', " "))),
        None => (title, None),
    };
    let headline = fit_text(head.trim(), TITLE_FONT, WIDTH as i32 - 20);
    let subtitle = sub
        .map(|s| fit_text(s.trim(), SMALL, WIDTH as i32 - 20))
        .filter(|s| !s.is_empty());

    let series = |f: &dyn Fn(&CurvePoint) -> Option<f64>| -> Vec<(f64, f64)> {
        let mut s: Vec<(f64, f64)> = points
            .iter()
            .filter_map(|p| f(p).map(|v| (p.epoch, v)))
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
        s
    };
    let train_loss = series(&|p| Some(p.train_loss));
    let test_loss = series(&|p| p.test_loss);
    let train_acc = series(&|p| Some(100.0 * p.train_acc));
    let test_acc = series(&|p| p.test_acc.map(|a| 100.0 * a));
    let lr = series(&|p| Some(p.lr));

    // One epoch axis for both panels, so that they line up; one epoch either side of a single
    // point.
    let epochs = || points.iter().map(|p| p.epoch).filter(|e| e.is_finite());
    let mut x_range = padded_range(epochs(), 0.02, 1.0, false);
    let first_epoch = epochs().next();
    if let Some(e) = first_epoch.filter(|&e| epochs().all(|x| x == e)) {
        if e + 1.0 > e - 1.0 {
            x_range = (e - 1.0, e + 1.0);
        }
    }

    let loss_rect = Rect {
        x0: 74,
        y0: PANEL_TOP,
        x1: 454,
        y1: PANEL_BOTTOM,
    };
    let acc_rect = Rect {
        x0: 586,
        y0: PANEL_TOP,
        x1: 966,
        y1: PANEL_BOTTOM,
    };

    // Legends give the last loss and the last and best accuracy, so that a short run reads at a
    // glance.
    let loss_note = |name: &str, v: Option<f64>| match v.filter(|v| v.is_finite()) {
        Some(v) => format!("{name} (last {v:.3})"),
        None => name.to_string(),
    };
    let acc_note = |name: &str, what: &str, v: Option<f64>| match v.filter(|v| v.is_finite()) {
        Some(v) => format!("{name} ({what} {v:.1}%)"),
        None => name.to_string(),
    };
    let last = |s: &[(f64, f64)]| s.last().map(|p| p.1);
    let mut loss_series = vec![
        Series::solid(loss_note("train", last(&train_loss)), TRAIN, &train_loss),
        Series::solid(loss_note("test", last(&test_loss)), TEST, &test_loss),
    ];
    // The learning rate is shown from zero, so that a constant rate is a line near the top rather
    // than in the middle of a tiny range.
    let lr_max = lr.iter().map(|p| p.1).fold(f64::NAN, f64::max);
    let lr_range = if lr.iter().all(|p| p.1 >= 0.0) && lr_max > 0.0 && lr_max < VALUE_LIMIT {
        (0.0, lr_max * 1.05)
    } else {
        padded_range(lr.iter().map(|p| p.1), 0.05, 1.0, true)
    };
    if !lr.is_empty() {
        loss_series.push(Series {
            label: "lr (right axis)".to_string(),
            colour: LR,
            points: &lr,
            width: 1.6,
            dash: Some((7.0, 5.0)),
            y_range: Some(lr_range),
        });
    }
    let test_best = test_acc.iter().map(|p| p.1).fold(f64::NAN, f64::max);
    let acc_series = vec![
        Series::solid(
            acc_note("train", "last", last(&train_acc)),
            TRAIN,
            &train_acc,
        ),
        Series::solid(acc_note("test", "best", Some(test_best)), TEST, &test_acc),
    ];
    Layout {
        headline,
        subtitle,
        panels: [
            layout_panel(loss_rect, "loss", x_range, &loss_series, 0.05, false),
            layout_panel(
                acc_rect,
                "top-1 accuracy (%)",
                x_range,
                &acc_series,
                0.05,
                true,
            ),
        ],
        lr_axis: (!lr.is_empty()).then_some(lr_range),
    }
}

/// A panel's y range (over the series on its own axis) and every series in pixels.
fn layout_panel(
    rect: Rect,
    title: &'static str,
    x_range: (f64, f64),
    series: &[Series],
    pad: f64,
    floor_zero: bool,
) -> PanelLayout {
    let y_range = padded_range(
        series
            .iter()
            .filter(|s| s.y_range.is_none())
            .flat_map(|s| s.points.iter().map(|p| p.1)),
        pad,
        1.0,
        floor_zero,
    );
    let r = rect;
    let series = series
        .iter()
        .filter(|s| !s.points.is_empty())
        .map(|s| {
            let yr = s.y_range.unwrap_or(y_range);
            let pixels: Vec<(f64, f64)> = s
                .points
                .iter()
                .map(|&(x, y)| {
                    (
                        scale(x, x_range, r.x0 as f64, r.x1 as f64),
                        scale(y, yr, r.y1 as f64, r.y0 as f64),
                    )
                })
                .collect();
            SeriesLayout {
                label: s.label.clone(),
                colour: s.colour,
                width: s.width,
                dash: s.dash,
                secondary: s.y_range.is_some(),
                marker_radius: marker_radius(&pixels, s.width),
                markers: pixels.clone(),
                pixels,
            }
        })
        .collect();
    PanelLayout {
        rect,
        title,
        x_range,
        y_range,
        series,
    }
}

/// Dots of radius `width + 1.5` on a curve of that width, smaller where epochs lie closer than
/// about three dots apart (they then merge into the line rather than into a blob), and a larger
/// dot for a lone point.
fn marker_radius(pixels: &[(f64, f64)], width: f64) -> f64 {
    if pixels.len() == 1 {
        return 2.0 * width + 1.0;
    }
    let spacing = pixels
        .windows(2)
        .map(|w| (w[1].0 - w[0].0).abs())
        .filter(|d| *d > 0.5)
        .fold(f64::INFINITY, f64::min);
    let full = width + 1.5;
    if spacing.is_finite() {
        full.min((spacing * 0.3).max(width / 2.0 + 0.5))
    } else {
        full
    }
}

/// Epoch ticks: "nice" ones, but never closer than one epoch.
fn epoch_ticks(lo: f64, hi: f64) -> (Vec<f64>, f64) {
    let (ticks, step) = nice_ticks(lo, hi, 7);
    if step >= 1.0 || !(hi - lo).is_finite() {
        return (ticks, step);
    }
    let first = lo.ceil();
    let n = (hi.floor() - first).clamp(0.0, 100.0) as usize;
    let ticks = (0..=n)
        .map(|i| first + i as f64)
        .filter(|v| *v >= lo && *v <= hi)
        .collect();
    (ticks, 1.0)
}

fn draw(l: &Layout) -> RgbImage {
    let mut c = Canvas::new(WIDTH, HEIGHT);
    c.text(
        WIDTH as i32 / 2,
        6,
        &l.headline,
        TITLE_FONT,
        TEXT,
        Align::Center,
    );
    if let Some(s) = &l.subtitle {
        c.text(WIDTH as i32 / 2, 32, s, SMALL, TEXT, Align::Center);
    }
    for p in &l.panels {
        draw_panel(&mut c, p);
    }
    if let Some(range) = l.lr_axis {
        draw_secondary_axis(&mut c, &l.panels[0].rect, range);
    }
    c.img
}

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const TEXT: Rgb<u8> = Rgb([34, 34, 34]);
const FRAME: Rgb<u8> = Rgb([90, 90, 90]);
const GRID: Rgb<u8> = Rgb([228, 228, 228]);
const LEGEND_BORDER: Rgb<u8> = Rgb([200, 200, 200]);
/// matplotlib's first two default colours.
const TRAIN: Rgb<u8> = Rgb([31, 119, 180]);
const TEST: Rgb<u8> = Rgb([255, 127, 14]);
const LR: Rgb<u8> = Rgb([140, 140, 140]);

#[derive(Clone, Copy, Debug)]
struct Rect {
    x0: i32,
    y0: i32,
    x1: i32,
    y1: i32,
}

impl Rect {
    fn contains(&self, x: f64, y: f64) -> bool {
        x >= self.x0 as f64 && x <= self.x1 as f64 && y >= self.y0 as f64 && y <= self.y1 as f64
    }
}

/// The range to show for `values`: their span widened by `pad` of it on both sides, or
/// `flat_half` (relative to the value's magnitude when it is non-zero) on both sides of a flat
/// series, so that the span is never zero. With `floor_zero`, a range over non-negative values
/// does not go below zero. No values give (0, 1).
fn padded_range(
    values: impl Iterator<Item = f64>,
    pad: f64,
    flat_half: f64,
    floor_zero: bool,
) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .map(|v| v.clamp(-VALUE_LIMIT, VALUE_LIMIT))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return (0.0, 1.0);
    }
    // With values clamped to ±1e300 the span and the padding stay finite.
    let span = hi - lo;
    let big = hi.abs().max(lo.abs());
    let (mut a, b) = if span <= 1e-9 * big {
        let half = if big > 0.0 {
            (big * 0.1).min(flat_half).max(big * 1e-6)
        } else {
            flat_half
        };
        (lo - half, hi + half)
    } else {
        (lo - pad * span, hi + pad * span)
    };
    if floor_zero && lo >= 0.0 && a < 0.0 {
        a = 0.0;
    }
    if (b - a).is_finite() && b > a {
        (a, b)
    } else {
        (0.0, 1.0)
    }
}

/// Values are clamped to this magnitude before ranges are taken, so that spans stay finite.
const VALUE_LIMIT: f64 = 1e300;

/// Maps `v` from `[lo, hi]` onto `[p0, p1]` in pixels; the result is finite and within a few
/// thousand pixels of the picture even for values far outside the range (NaN only for NaN).
fn scale(v: f64, (lo, hi): (f64, f64), p0: f64, p1: f64) -> f64 {
    let v = v.clamp(-VALUE_LIMIT, VALUE_LIMIT);
    let t = (v / 2.0 - lo / 2.0) / (hi / 2.0 - lo / 2.0);
    (p0 + t.clamp(-4.0, 5.0) * (p1 - p0)).clamp(-1e4, 1e4)
}

/// "Nice" tick positions (1, 2 or 5 times a power of ten apart) inside `[lo, hi]`, about
/// `target` of them (up to a third more), and the step between them.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, f64) {
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) {
        return (vec![lo], 1.0);
    }
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw * 0.75)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil();
    let last = (hi / step).floor();
    let n = (last - first).clamp(0.0, 100.0) as usize;
    let ticks = (0..=n)
        .map(|i| {
            let v = (first + i as f64) * step;
            if v.abs() < step * 1e-9 {
                0.0
            } else {
                v
            }
        })
        .filter(|v| *v >= lo - step * 1e-9 && *v <= hi + step * 1e-9)
        .collect();
    (ticks, step)
}

/// Formats a tick value with as many decimals as the step needs.
fn tick_label(v: f64, step: f64) -> String {
    let v = if v.abs() < step.abs() * 1e-9 { 0.0 } else { v };
    if v.abs() >= 1e6 || step < 1e-4 {
        if v == 0.0 {
            return "0".to_string();
        }
        let s = format!("{v:.1e}");
        return s.replace(".0e", "e");
    }
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Align {
    Left,
    Center,
    Right,
}

#[derive(Clone, Copy, Debug)]
struct Font {
    weight: FontWeight,
    size: RasterHeight,
}

impl Font {
    const fn new(weight: FontWeight, size: RasterHeight) -> Font {
        Font { weight, size }
    }
    fn char_width(self) -> i32 {
        get_raster_width(self.weight, self.size) as i32
    }
    fn height(self) -> i32 {
        self.size.val() as i32
    }
    fn width(self, s: &str) -> i32 {
        s.chars().count() as i32 * self.char_width()
    }
}

const SMALL: Font = Font::new(FontWeight::Regular, RasterHeight::Size16);
const MEDIUM: Font = Font::new(FontWeight::Regular, RasterHeight::Size20);

/// Shortens `s` with "..." so that it fits in `max_width` pixels.
fn fit_text(s: &str, font: Font, max_width: i32) -> String {
    let max_chars = (max_width / font.char_width()).max(3) as usize;
    if s.chars().count() <= max_chars {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max_chars - 3).collect();
    out.push_str("...");
    out
}

struct Canvas {
    img: RgbImage,
}

impl Canvas {
    fn new(w: u32, h: u32) -> Canvas {
        Canvas {
            img: RgbImage::from_pixel(w, h, BACKGROUND),
        }
    }

    /// Mixes `colour` into pixel (x, y) with opacity `alpha` in [0, 1]; outside is a no-op.
    fn blend(&mut self, x: i32, y: i32, colour: Rgb<u8>, alpha: f64) {
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

    fn fill_rect(&mut self, x0: i32, y0: i32, x1: i32, y1: i32, colour: Rgb<u8>, alpha: f64) {
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.blend(x, y, colour, alpha);
            }
        }
    }

    fn hline(&mut self, x0: i32, x1: i32, y: i32, colour: Rgb<u8>) {
        self.fill_rect(x0, y, x1, y, colour, 1.0);
    }

    fn vline(&mut self, x: i32, y0: i32, y1: i32, colour: Rgb<u8>) {
        self.fill_rect(x, y0, x, y1, colour, 1.0);
    }

    fn stroke_rect(&mut self, r: Rect, colour: Rgb<u8>) {
        self.hline(r.x0, r.x1, r.y0, colour);
        self.hline(r.x0, r.x1, r.y1, colour);
        self.vline(r.x0, r.y0, r.y1, colour);
        self.vline(r.x1, r.y0, r.y1, colour);
    }

    /// Draws `s` with its top at `y`; `x` is its left edge, centre or right edge by `align`.
    /// Characters the font lacks are drawn as '?'.
    fn text(&mut self, x: i32, y: i32, s: &str, font: Font, colour: Rgb<u8>, align: Align) {
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
    fn paint(&mut self, mask: &Mask, colour: Rgb<u8>) {
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
struct Mask {
    x0: i32,
    y0: i32,
    w: i32,
    h: i32,
    data: Vec<f32>,
}

impl Mask {
    fn new(r: Rect) -> Mask {
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

    fn cover(&mut self, x: i32, y: i32, a: f64) {
        let (lx, ly) = (x - self.x0, y - self.y0);
        if lx < 0 || ly < 0 || lx >= self.w || ly >= self.h {
            return;
        }
        let cell = &mut self.data[(ly * self.w + lx) as usize];
        *cell = cell.max(a.clamp(0.0, 1.0) as f32);
    }

    /// An anti-aliased segment of the given width between two points in pixel coordinates
    /// (pixel (x, y) covers [x, x+1) x [y, y+1)).
    fn segment(&mut self, a: (f64, f64), b: (f64, f64), width: f64) {
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

    fn disc(&mut self, c: (f64, f64), radius: f64) {
        self.segment(c, c, 2.0 * radius);
    }

    /// A polyline, solid or dashed with (on, off) lengths in pixels.
    fn polyline(&mut self, pts: &[(f64, f64)], width: f64, dash: Option<(f64, f64)>) {
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

fn draw_panel(c: &mut Canvas, p: &PanelLayout) {
    let r = p.rect;
    let (x_ticks, x_step) = epoch_ticks(p.x_range.0, p.x_range.1);
    let (y_ticks, y_step) = nice_ticks(p.y_range.0, p.y_range.1, 6);

    // Grid, ticks and their labels.
    for &t in &x_ticks {
        let x = scale(t, p.x_range, r.x0 as f64, r.x1 as f64).round() as i32;
        c.vline(x, r.y0 + 1, r.y1 - 1, GRID);
        c.vline(x, r.y1 + 1, r.y1 + 4, FRAME);
        c.text(
            x,
            r.y1 + 7,
            &tick_label(t, x_step),
            SMALL,
            TEXT,
            Align::Center,
        );
    }
    for &t in &y_ticks {
        let y = scale(t, p.y_range, r.y1 as f64, r.y0 as f64).round() as i32;
        c.hline(r.x0 + 1, r.x1 - 1, y, GRID);
        c.hline(r.x0 - 4, r.x0 - 1, y, FRAME);
        c.text(
            r.x0 - 7,
            y - SMALL.height() / 2,
            &tick_label(t, y_step),
            SMALL,
            TEXT,
            Align::Right,
        );
    }
    c.text(
        (r.x0 + r.x1) / 2,
        r.y1 + 28,
        "epoch",
        SMALL,
        TEXT,
        Align::Center,
    );
    c.text(
        (r.x0 + r.x1) / 2,
        r.y0 - MEDIUM.height() - 6,
        p.title,
        MEDIUM,
        TEXT,
        Align::Center,
    );

    // Curves and their markers, clipped to the inside of the frame; secondary-axis series go
    // underneath (the legend keeps the given order).
    let inner = Rect {
        x0: r.x0 + 1,
        y0: r.y0 + 1,
        x1: r.x1 - 1,
        y1: r.y1 - 1,
    };
    let mut order: Vec<&SeriesLayout> = p.series.iter().collect();
    order.sort_by_key(|s| !s.secondary);
    for s in order {
        let mut mask = Mask::new(inner);
        mask.polyline(&s.pixels, s.width, s.dash);
        for &m in &s.markers {
            mask.disc(m, s.marker_radius);
        }
        c.paint(&mask, s.colour);
    }
    c.stroke_rect(r, FRAME);

    if p.series.is_empty() {
        c.text(
            (r.x0 + r.x1) / 2,
            (r.y0 + r.y1) / 2 - SMALL.height() / 2,
            "no data",
            SMALL,
            FRAME,
            Align::Center,
        );
        return;
    }
    draw_legend(c, r, &p.series);
}

/// The legend goes into the corner of the panel that the fewest curve samples fall into.
fn draw_legend(c: &mut Canvas, r: Rect, drawn: &[SeriesLayout]) {
    let line_h = SMALL.height() + 2;
    let sample_w = 24;
    let text_w = drawn
        .iter()
        .map(|s| SMALL.width(&s.label))
        .max()
        .unwrap_or(0);
    let w = 8 + sample_w + 6 + text_w + 8;
    let h = 6 + line_h * drawn.len() as i32 + 4;
    let margin = 8;
    let corners = [
        (r.x1 - margin - w, r.y0 + margin),
        (r.x0 + margin, r.y0 + margin),
        (r.x1 - margin - w, r.y1 - margin - h),
        (r.x0 + margin, r.y1 - margin - h),
    ];
    let covered = |x0: i32, y0: i32| -> usize {
        let b = Rect {
            x0,
            y0,
            x1: x0 + w,
            y1: y0 + h,
        };
        let mut n = 0;
        for s in drawn {
            let px = &s.pixels;
            if px.len() == 1 && b.contains(px[0].0, px[0].1) {
                n += 1;
            }
            for seg in px.windows(2) {
                let (a, bb) = (seg[0], seg[1]);
                let len = ((bb.0 - a.0).powi(2) + (bb.1 - a.1).powi(2)).sqrt();
                let steps = (len / 2.0).ceil().max(1.0) as usize;
                for i in 0..=steps {
                    let t = i as f64 / steps as f64;
                    if b.contains(a.0 + t * (bb.0 - a.0), a.1 + t * (bb.1 - a.1)) {
                        n += 1;
                    }
                }
            }
        }
        n
    };
    // First corner wins ties, so an empty picture gets the legend at the top right.
    let (lx, ly) = corners
        .iter()
        .copied()
        .min_by_key(|&(x, y)| covered(x, y))
        .unwrap_or(corners[0]);
    c.fill_rect(lx, ly, lx + w, ly + h, BACKGROUND, 0.88);
    c.stroke_rect(
        Rect {
            x0: lx,
            y0: ly,
            x1: lx + w,
            y1: ly + h,
        },
        LEGEND_BORDER,
    );
    for (i, s) in drawn.iter().enumerate() {
        let ty = ly + 6 + line_h * i as i32;
        let cy = ty as f64 + SMALL.height() as f64 / 2.0;
        let x0 = (lx + 8) as f64;
        let mut mask = Mask::new(Rect {
            x0: lx + 1,
            y0: ty,
            x1: lx + 8 + sample_w + 2,
            y1: ty + line_h,
        });
        mask.polyline(&[(x0, cy), (x0 + sample_w as f64, cy)], s.width, s.dash);
        // The sample carries the series' marker, as matplotlib's 'o-' legends do.
        mask.disc((x0 + sample_w as f64 / 2.0, cy), (s.width + 1.5).min(4.0));
        c.paint(&mask, s.colour);
        c.text(
            lx + 8 + sample_w + 6,
            ty,
            &s.label,
            SMALL,
            TEXT,
            Align::Left,
        );
    }
}

/// Tick marks and labels for a secondary y range on the right edge of `r`, in the learning-rate
/// colour.
fn draw_secondary_axis(c: &mut Canvas, r: &Rect, range: (f64, f64)) {
    let (ticks, step) = nice_ticks(range.0, range.1, 6);
    for &t in &ticks {
        let y = scale(t, range, r.y1 as f64, r.y0 as f64).round() as i32;
        c.hline(r.x1 + 1, r.x1 + 4, y, LR);
        c.text(
            r.x1 + 7,
            y - SMALL.height() / 2,
            &tick_label(t, step),
            SMALL,
            LR,
            Align::Left,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typical(n: usize) -> Vec<CurvePoint> {
        (1..=n)
            .map(|e| {
                let t = e as f64 / n as f64;
                CurvePoint {
                    epoch: e as f64,
                    train_loss: 2.3 * (-3.0 * t).exp() + 0.05,
                    test_loss: Some(2.3 * (-2.5 * t).exp() + 0.3),
                    train_acc: 1.0 - 0.9 * (-4.0 * t).exp(),
                    test_acc: Some(0.88 - 0.78 * (-3.5 * t).exp()),
                    // Linear warm-up over two epochs, then cosine.
                    lr: if e <= 2 {
                        0.05 * e as f64
                    } else {
                        0.05 * (1.0 + (std::f64::consts::PI * t).cos())
                    },
                }
            })
            .collect()
    }

    fn count(img: &RgbImage, colour: Rgb<u8>) -> usize {
        img.pixels().filter(|p| **p == colour).count()
    }

    /// Writes the curve through write_png and decodes the file again.
    fn roundtrip(title: &str, points: &[CurvePoint]) -> RgbImage {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curve.png");
        write_png(&path, title, points).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), (WIDTH, HEIGHT));
        img
    }

    #[test]
    fn typical_curve_decodes_with_both_colours_and_text() {
        let img = roundtrip("resnet20 on cifar10", &typical(30));
        assert!(count(&img, TRAIN) > 200, "train curve missing");
        assert!(count(&img, TEST) > 200, "test curve missing");
        let dark = img
            .pixels()
            .filter(|p| p.0.iter().all(|&v| v < 100))
            .count();
        assert!(dark > 1000, "text and frames missing: {dark} dark pixels");
        // The title is drawn in the top band.
        let title_dark = (0..30)
            .flat_map(|y| (0..WIDTH).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0[0] < 100)
            .count();
        assert!(title_dark > 50);
    }

    #[test]
    fn long_run_draws_both_curves() {
        let img = roundtrip("long", &typical(200));
        assert!(count(&img, TRAIN) > 200);
        assert!(count(&img, TEST) > 200);
    }

    #[test]
    fn single_point_shows_markers() {
        let img = roundtrip("one epoch", &typical(1));
        assert!(count(&img, TRAIN) > 10);
        assert!(count(&img, TEST) > 10);
    }

    #[test]
    fn missing_test_values() {
        let mut pts = typical(10);
        for p in &mut pts {
            p.test_loss = None;
            p.test_acc = None;
        }
        let img = roundtrip("no test set", &pts);
        assert!(count(&img, TRAIN) > 100);
        assert_eq!(count(&img, TEST), 0);
        // Test only every third epoch.
        let mut pts = typical(12);
        for (i, p) in pts.iter_mut().enumerate() {
            if i % 3 != 2 {
                p.test_loss = None;
                p.test_acc = None;
            }
        }
        let img = roundtrip("sparse test", &pts);
        assert!(count(&img, TEST) > 100);
    }

    #[test]
    fn nan_and_inf_values_are_skipped() {
        let mut pts = typical(10);
        pts[3].train_loss = f64::NAN;
        pts[4].test_loss = Some(f64::INFINITY);
        pts[5].train_acc = f64::NAN;
        pts[6].test_acc = Some(f64::NEG_INFINITY);
        pts[7].lr = f64::NAN;
        pts[8].epoch = f64::NAN;
        let img = roundtrip("with NaN", &pts);
        assert!(count(&img, TRAIN) > 100);
        assert!(count(&img, TEST) > 100);

        let all_nan: Vec<CurvePoint> = (0..5)
            .map(|e| CurvePoint {
                epoch: e as f64,
                train_loss: f64::NAN,
                test_loss: Some(f64::NAN),
                train_acc: f64::NAN,
                test_acc: None,
                lr: f64::NAN,
            })
            .collect();
        let img = roundtrip("all NaN", &all_nan);
        assert_eq!(count(&img, TRAIN), 0);
    }

    #[test]
    fn flat_curves_and_empty_input() {
        let flat: Vec<CurvePoint> = (0..8)
            .map(|e| CurvePoint {
                epoch: e as f64,
                train_loss: 0.0,
                test_loss: Some(0.7),
                train_acc: 1.0,
                test_acc: Some(0.25),
                lr: 0.01,
            })
            .collect();
        let img = roundtrip("flat", &flat);
        assert!(count(&img, TRAIN) > 100);
        assert!(count(&img, TEST) > 100);
        let img = roundtrip("empty", &[]);
        assert_eq!(count(&img, TRAIN), 0);
        // Huge, tiny and negative values and an odd title must not panic.
        let odd = [
            CurvePoint {
                epoch: -1e300,
                train_loss: 1e300,
                test_loss: Some(-1e-300),
                train_acc: -5.0,
                test_acc: Some(7.0),
                lr: 0.0,
            },
            CurvePoint {
                epoch: 1e300,
                train_loss: f64::MAX,
                test_loss: Some(f64::MIN),
                train_acc: 0.5,
                test_acc: Some(0.5),
                lr: 1e-9,
            },
        ];
        render(
            "ünïcödé — ✓ title that is far too long to fit "
                .repeat(10)
                .as_str(),
            &odd,
        );
    }

    #[test]
    fn ranges_and_ticks() {
        for (vals, floor) in [
            (vec![2.3], false),
            (vec![0.0, 0.0], true),
            (vec![-4.0, -4.0], true),
            (vec![1e-12, 1e-12], false),
        ] {
            let (a, b) = padded_range(vals.iter().copied(), 0.05, 1.0, floor);
            assert!(b > a, "{vals:?}: empty range {a}..{b}");
            assert!(a <= vals[0] && vals[0] <= b);
        }
        assert!((padded_range([0.2, 0.9].into_iter(), 0.05, 1.0, true).0 - 0.165).abs() < 1e-12);
        assert_eq!(padded_range([0.0, 1.0].into_iter(), 0.05, 1.0, true).0, 0.0);
        let (t, s) = nice_ticks(0.0, 30.0, 7);
        assert_eq!(s, 5.0);
        assert_eq!(t, vec![0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0]);
        let (t, s) = nice_ticks(0.83, 2.41, 6);
        assert!((s - 0.2).abs() < 1e-12);
        let labels: Vec<String> = t.iter().map(|v| tick_label(*v, s)).collect();
        assert_eq!(
            labels,
            ["1.0", "1.2", "1.4", "1.6", "1.8", "2.0", "2.2", "2.4"]
        );
        assert_eq!(tick_label(-0.0, 0.5), "0.0");
        assert_eq!(tick_label(2e-5, 1e-5), "2e-5");
        assert_eq!(tick_label(1.5e-4, 5e-5), "1.5e-4");
        assert_eq!(tick_label(0.0, 5e-5), "0");
        assert_eq!(tick_label(45.0, 5.0), "45");
    }

    #[test]
    fn dashes_cover_about_their_share_of_a_line() {
        // Awkward float lengths once made a phase-stepping dash loop stall on rounding.
        let r = Rect {
            x0: 0,
            y0: 0,
            x1: 999,
            y1: 99,
        };
        let pts: Vec<(f64, f64)> = (0..400)
            .map(|i| (i as f64 * 2.4571, 50.0 + (i as f64 * 0.37).sin() * 1e-13))
            .collect();
        let mut dashed = Mask::new(r);
        dashed.polyline(&pts, 2.0, Some((7.0, 5.0)));
        let mut solid = Mask::new(r);
        solid.polyline(&pts, 2.0, None);
        let ink = |m: &Mask| m.data.iter().map(|&v| f64::from(v)).sum::<f64>();
        let share = ink(&dashed) / ink(&solid);
        assert!((0.5..0.85).contains(&share), "dashed/solid ink {share}");
    }

    #[test]
    fn one_epoch_gives_one_visible_marker_per_series() {
        let l = layout("r20.onnx\ntucker2 params=0.4 | 1 epoch", &typical(1));
        assert_eq!(l.headline, "r20.onnx");
        assert_eq!(l.subtitle.as_deref(), Some("tucker2 params=0.4 | 1 epoch"));
        let labels: Vec<Vec<&str>> = l
            .panels
            .iter()
            .map(|p| p.series.iter().map(|s| s.label.as_str()).collect())
            .collect();
        let (loss, acc) = (typical(1)[0], 100.0 * typical(1)[0].train_acc);
        assert_eq!(
            labels[0],
            [
                format!("train (last {:.3})", loss.train_loss).as_str(),
                format!("test (last {:.3})", loss.test_loss.unwrap()).as_str(),
                "lr (right axis)"
            ]
        );
        assert_eq!(labels[1][0], format!("train (last {acc:.1}%)"));
        for p in &l.panels {
            for s in &p.series {
                assert_eq!(s.markers.len(), 1, "{}", s.label);
                let (x, y) = s.markers[0];
                assert!(
                    p.rect.contains(x, y),
                    "{}: marker outside the frame",
                    s.label
                );
                // In the middle of the epoch axis (epochs 0 to 2), and larger than the line.
                assert!((x - f64::from(p.rect.x0 + p.rect.x1) / 2.0).abs() < 1.0);
                assert!(s.marker_radius >= 2.0 * s.width, "{}", s.label);
            }
        }
        // The epoch axis of one epoch has whole-epoch ticks.
        assert_eq!(epoch_ticks(0.0, 2.0), (vec![0.0, 1.0, 2.0], 1.0));
        // And the dots are drawn.
        let img = render("one", &typical(1));
        assert!(count(&img, TRAIN) > 2 * 20, "train dots missing");
        assert!(count(&img, TEST) > 2 * 20, "test dots missing");
    }

    #[test]
    fn every_epoch_has_a_marker_on_every_series() {
        for n in [2, 30, 200] {
            let l = layout("t", &typical(n));
            assert_eq!(l.subtitle, None);
            assert_eq!(l.panels[0].series.len(), 3);
            assert_eq!(l.panels[1].series.len(), 2);
            for p in &l.panels {
                for s in &p.series {
                    assert_eq!(s.markers.len(), n, "{n} epochs, {}", s.label);
                    assert!(s.markers.windows(2).all(|w| w[1].0 > w[0].0));
                    // Close epochs get small dots that merge into the line, not blobs.
                    let spacing = s.markers[1].0 - s.markers[0].0;
                    assert!(s.marker_radius <= (s.width + 1.5).max(spacing * 0.3));
                }
            }
        }
        // A series with missing points marks only the points it has.
        let mut pts = typical(12);
        for (i, p) in pts.iter_mut().enumerate() {
            if i % 3 != 2 {
                p.test_acc = None;
            }
        }
        let l = layout("t", &pts);
        assert_eq!(l.panels[1].series[1].markers.len(), 4);
        // A long title is shortened to the picture's width.
        let l = layout(&"x".repeat(500), &typical(3));
        assert!(TITLE_FONT.width(&l.headline) <= WIDTH as i32 - 20);
        assert!(l.headline.ends_with("..."));
    }

    /// What re-drawing the curve after every epoch costs: `cargo test --release --lib
    /// render_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn render_cost_of_a_30_epoch_history() {
        let title = "resnet20.onnx\ntucker2 params=0.4 | 30 epochs, batch 128, lr 0.1 cosine";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        for epochs in [30, 200] {
            let pts = typical(epochs);
            write_png(&path, title, &pts).unwrap();
            let n = 20;
            let t0 = std::time::Instant::now();
            for _ in 0..n {
                std::hint::black_box(render(title, &pts));
            }
            let draw = t0.elapsed().as_secs_f64() / n as f64;
            let t0 = std::time::Instant::now();
            for _ in 0..n {
                write_png(&path, title, &pts).unwrap();
            }
            let all = t0.elapsed().as_secs_f64() / n as f64;
            println!(
                "{epochs}-epoch curve: draw {:.1} ms, draw + PNG encode + atomic write {:.1} ms, {} bytes",
                1e3 * draw,
                1e3 * all,
                std::fs::metadata(&path).unwrap().len()
            );
        }
    }

    #[test]
    fn write_png_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        write_png(&path, "a", &typical(3)).unwrap();
        write_png(&path, "b", &typical(5)).unwrap();
        let img = image::open(&path).unwrap();
        assert_eq!((img.width(), img.height()), (WIDTH, HEIGHT));
        assert!(write_png(&dir.path().join("missing/c.png"), "x", &typical(2)).is_err());
    }
}
