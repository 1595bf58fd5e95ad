//! The figure drawn from its layout: title, panels (grid, ticks, curves with their dots,
//! frame), legends and the learning rate's axis.

use image::RgbImage;

use super::font::{Align, MEDIUM, SMALL, TITLE_FONT};
use super::layout::{
    epoch_ticks, nice_ticks, scale, tick_label, Layout, PanelLayout, Rect, SeriesLayout,
};
use super::raster::{Canvas, Mask};
use super::{BACKGROUND, FRAME, GRID, HEIGHT, LEGEND_BORDER, LR, TEXT, WIDTH};

pub(super) fn draw(l: &Layout) -> RgbImage {
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

pub(super) fn draw_panel(c: &mut Canvas, p: &PanelLayout) {
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
pub(super) fn draw_legend(c: &mut Canvas, r: Rect, drawn: &[SeriesLayout]) {
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
pub(super) fn draw_secondary_axis(c: &mut Canvas, r: &Rect, range: (f64, f64)) {
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
