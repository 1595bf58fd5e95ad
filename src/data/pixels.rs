//! Conversions of one `u8` CHW image to the model's input shape: channel count and size.
//!
//! Every source goes through here, so CIFAR images resized for a 64x64 model and folder images
//! resized from their file size are treated alike.

use anyhow::{bail, Result};
use image::imageops::{self, FilterType};
use image::GrayImage;

/// Resizes each plane of a CHW `u8` image from `h x w` to `nh x nw`, bilinear.
///
/// Uses the `image` crate's triangle (bilinear) filter with pixel centres at half-integers, as
/// PyTorch's `align_corners=False`. When enlarging it is plain bilinear interpolation; when
/// shrinking the filter widens with the scale factor (as PIL's `BILINEAR`), so a large photo
/// reduced to 32x32 is averaged instead of aliased.
pub fn resize_chw(src: &[u8], [c, h, w]: [usize; 3], nh: usize, nw: usize) -> Vec<u8> {
    assert_eq!(
        src.len(),
        c * h * w,
        "resize_chw: buffer does not match shape"
    );
    if (h, w) == (nh, nw) {
        return src.to_vec();
    }
    let mut out = Vec::with_capacity(c * nh * nw);
    for plane in src.chunks_exact(h * w) {
        let img = GrayImage::from_raw(w as u32, h as u32, plane.to_vec())
            .expect("plane size matches its dimensions");
        let r = imageops::resize(&img, nw as u32, nh as u32, FilterType::Triangle);
        out.extend_from_slice(r.as_raw());
    }
    out
}

/// Luma of an sRGB pixel (ITU-R BT.601 weights, as PIL's `convert("L")`).
fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((299 * r as u32 + 587 * g as u32 + 114 * b as u32 + 500) / 1000) as u8
}

/// Converts a CHW image of shape `from` to shape `to` into `dst`: 3 channels to 1 by luma, 1 to
/// 3 by repetition, any size by [`resize_chw`]. Other channel changes are an error.
pub fn convert(src: &[u8], from: [usize; 3], to: [usize; 3], dst: &mut [u8]) -> Result<()> {
    let [fc, fh, fw] = from;
    let [tc, th, tw] = to;
    let resized = resize_chw(src, from, th, tw);
    let plane = th * tw;
    debug_assert_eq!(dst.len(), tc * plane);
    match (fc, tc) {
        (a, b) if a == b => dst.copy_from_slice(&resized),
        (3, 1) => {
            let (r, rest) = resized.split_at(plane);
            let (g, b) = rest.split_at(plane);
            for (i, d) in dst.iter_mut().enumerate() {
                *d = luma(r[i], g[i], b[i]);
            }
        }
        (1, 3) => {
            for ch in dst.chunks_exact_mut(plane) {
                ch.copy_from_slice(&resized);
            }
        }
        _ => bail!(
            "cannot turn {fc}-channel {fh}x{fw} images into {tc}-channel ones (only 3 <-> 1 and same-channel resizing are supported)"
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_keeps_constants_and_interpolates() {
        let src = vec![100u8; 2 * 4 * 4];
        assert!(resize_chw(&src, [2, 4, 4], 8, 6).iter().all(|&v| v == 100));
        // A horizontal ramp enlarged 2x stays monotone and keeps its end values near the ends.
        let ramp: Vec<u8> = (0..4).flat_map(|_| [0u8, 80, 160, 240]).collect();
        let r = resize_chw(&ramp, [1, 4, 4], 4, 8);
        let row = &r[..8];
        assert!(row.windows(2).all(|w| w[0] <= w[1]), "{row:?}");
        assert_eq!(row[0], 0);
        assert_eq!(row[7], 240);
        // Half-pixel centres: output pixel 1 sits at input x = 0.25 -> 20.
        assert!((row[1] as i32 - 20).abs() <= 1, "{row:?}");
    }

    #[test]
    fn channel_conversion() {
        let rgb = [255u8, 0, 0, 255, 0, 0];
        let mut gray = [0u8; 2];
        convert(&rgb, [3, 1, 2], [1, 1, 2], &mut gray).unwrap();
        assert_eq!(gray, [76, 150]);
        let mut back = [0u8; 6];
        convert(&gray, [1, 1, 2], [3, 1, 2], &mut back).unwrap();
        assert_eq!(back, [76, 150, 76, 150, 76, 150]);
        let mut four = [0u8; 8];
        let e = convert(&rgb, [3, 1, 2], [4, 1, 2], &mut four).unwrap_err();
        assert!(e.to_string().contains("3-channel"), "{e}");
    }
}
