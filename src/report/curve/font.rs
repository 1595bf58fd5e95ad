//! Text: the embedded bitmap font (noto-sans-mono-bitmap, monospaced, so a string's width is
//! its length in characters times one glyph's width) and shortening to a width.

use noto_sans_mono_bitmap::{get_raster_width, FontWeight, RasterHeight};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Align {
    Left,
    Center,
    Right,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Font {
    pub(super) weight: FontWeight,
    pub(super) size: RasterHeight,
}

impl Font {
    pub(super) const fn new(weight: FontWeight, size: RasterHeight) -> Font {
        Font { weight, size }
    }
    pub(super) fn char_width(self) -> i32 {
        get_raster_width(self.weight, self.size) as i32
    }
    pub(super) fn height(self) -> i32 {
        self.size.val() as i32
    }
    pub(super) fn width(self, s: &str) -> i32 {
        s.chars().count() as i32 * self.char_width()
    }
}

pub(super) const SMALL: Font = Font::new(FontWeight::Regular, RasterHeight::Size16);
pub(super) const MEDIUM: Font = Font::new(FontWeight::Regular, RasterHeight::Size20);

/// Shortens `s` with "..." so that it fits in `max_width` pixels.
pub(super) fn fit_text(s: &str, font: Font, max_width: i32) -> String {
    let max_chars = (max_width / font.char_width()).max(3) as usize;
    if s.chars().count() <= max_chars {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max_chars - 3).collect();
    out.push_str("...");
    out
}

pub(super) const TITLE_FONT: Font = Font::new(FontWeight::Bold, RasterHeight::Size20);
