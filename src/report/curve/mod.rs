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
//! The code: `layout` (ranges, ticks, pixel positions, legend texts), `draw` (panels, legends,
//! the learning rate's axis), `raster` (canvas, anti-aliased lines, dots and dashes), `font`
//! (the embedded bitmap font).
//!
//! # Why it is drawn by hand: a measured comparison with plotters
//!
//! The curve must render on a fresh Debian machine with no fonts and no extra system libraries.
//! The same figure (1000x466, both panels, the dashed learning rate on a secondary axis, a dot
//! per epoch, legends, title and subtitle) was drawn with plotters 0.3.7 in a scratch crate
//! beside this renderer, on the 2-core build machine under load from other jobs (load average
//! 7 to 8), release builds, each added to a baseline crate that already has image 0.25:
//!
//! | | this renderer | plotters |
//! |---|---|---|
//! | crates added | 1 (noto-sans-mono-bitmap) | 7 (plotters, -backend, -bitmap, ab_glyph, ab_glyph_rasterizer, owned_ttf_parser, ttf-parser) |
//! | build time added | 6.0 s | 36.2 s |
//! | binary size added (stripped) | 0.18 MB | 1.92 MB (0.46 MB code + 1.47 MB for the two TTF weights) |
//! | render + PNG encode, 30 epochs (median of 30, 3 rounds) | 3.8 to 7.8 ms | 3.6 to 4.7 ms |
//! | same, 200 epochs | 3.9 to 4.1 ms | 5.5 to 9.2 ms |
//!
//! plotters with `default-features = false` and `bitmap_backend` + `line_series` builds from the
//! registry, but draws no text at all: without a font feature its text is a layout estimate
//! only. Text needs either `ttf` (font-kit, which links fontconfig and freetype, so their `-dev`
//! packages and a system font on every build machine) or `ab_glyph` plus a TTF registered from
//! bytes (the measurement embedded DejaVu Sans regular and bold, 0.7 MB each, a file to carry in
//! the repository). Its `bitmap_encoder` feature also pulls image 0.24 and png 0.17 beside our
//! image 0.25 (avoided above by drawing into a buffer and encoding with image 0.25). Render
//! times are the same within the machine's noise, so plotters would buy nothing at run time and
//! cost six times the build time, ten times the binary growth and a font file; and its layout
//! is not open to the tests, which here check the layout itself (a dot per epoch, ranges,
//! ticks). Decision: keep the hand-drawn renderer.
//!
//! This module draws lines (anti-aliased by distance-to-segment coverage), markers, frames and
//! text into an [`image::RgbImage`] and encodes it with image's PNG encoder. The only crate it
//! adds is noto-sans-mono-bitmap (MIT; the font is under the SIL Open Font License), with only
//! the regular and bold weights at 16 and 20 px raster height and basic Latin enabled; other
//! characters in a title are drawn as '?'.
//!
//! # Drawn after every epoch: measured to be free
//!
//! The training loop re-draws the curve after every epoch, so that a running run, and one killed
//! with SIGKILL, has its curve up to date. `cargo bench --bench curve` (same machine and load):
//! render 3.3 ms (30 epochs) / 3.7 ms (200), with PNG encoding 5.8 / 5.1 ms, the whole atomic
//! write with its fsync 19.7 / 12.6 ms. The smallest real run, the main job (`scripts/main.sh`:
//! ResNet-20 Tucker-2 on the synthetic set, 4 epochs of 62 steps), took 20 to 22 s an epoch on
//! this machine under the same load; even at a quarter of that (its whole quiet run is 35 s,
//! export and benchmark included) a 20 ms redraw is 0.4% of an epoch, under the 1% that would
//! justify drawing only at the end of the run and on Ctrl-C.

mod draw;
mod font;
mod layout;
mod raster;
#[cfg(test)]
mod tests;

use std::io::Cursor;
use std::path::Path;

use anyhow::{Context, Result};
use image::{ImageEncoder, Rgb, RgbImage};

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
    draw::draw(&layout::layout(title, points))
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
