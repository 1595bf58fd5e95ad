//! Where everything of the figure goes, worked out before a pixel is drawn: the series in
//! pixels, each panel's ranges, the ticks and their labels, the legend's texts.

use super::font::{fit_text, SMALL, TITLE_FONT};
use super::{CurvePoint, LR, TEST, TRAIN, WIDTH};
use image::Rgb;

/// Where everything goes, worked out before a pixel is drawn (the tests read it).
pub(super) struct Layout {
    pub(super) headline: String,
    pub(super) subtitle: Option<String>,
    /// Loss (with the learning rate) on the left, accuracy on the right.
    pub(super) panels: [PanelLayout; 2],
    /// The learning rate's range on the loss panel's right axis, when it is shown.
    pub(super) lr_axis: Option<(f64, f64)>,
}

pub(super) struct PanelLayout {
    pub(super) rect: Rect,
    pub(super) title: &'static str,
    pub(super) x_range: (f64, f64),
    pub(super) y_range: (f64, f64),
    /// The series that have at least one point, in legend order.
    pub(super) series: Vec<SeriesLayout>,
}

pub(super) struct SeriesLayout {
    pub(super) label: String,
    pub(super) colour: Rgb<u8>,
    pub(super) width: f64,
    /// (on, off) lengths in pixels for a dashed line.
    pub(super) dash: Option<(f64, f64)>,
    /// On a y range of its own (the right axis); drawn under the others.
    pub(super) secondary: bool,
    /// The points in pixels, in epoch order.
    pub(super) pixels: Vec<(f64, f64)>,
    /// A dot on every point, so that each epoch shows (a one-epoch run is one visible dot).
    pub(super) markers: Vec<(f64, f64)>,
    pub(super) marker_radius: f64,
}

/// A series before layout: its values in data units.
pub(super) struct Series<'a> {
    pub(super) label: String,
    pub(super) colour: Rgb<u8>,
    pub(super) points: &'a [(f64, f64)],
    pub(super) width: f64,
    pub(super) dash: Option<(f64, f64)>,
    /// A y range of its own (a secondary axis) instead of the panel's.
    pub(super) y_range: Option<(f64, f64)>,
}

impl<'a> Series<'a> {
    pub(super) fn solid(label: String, colour: Rgb<u8>, points: &'a [(f64, f64)]) -> Self {
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

/// Top and bottom of both panels' frames.
pub(super) const PANEL_TOP: i32 = 84;
pub(super) const PANEL_BOTTOM: i32 = 406;

pub(super) fn layout(title: &str, points: &[CurvePoint]) -> Layout {
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
pub(super) fn layout_panel(
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
pub(super) fn marker_radius(pixels: &[(f64, f64)], width: f64) -> f64 {
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
pub(super) fn epoch_ticks(lo: f64, hi: f64) -> (Vec<f64>, f64) {
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

#[derive(Clone, Copy, Debug)]
pub(super) struct Rect {
    pub(super) x0: i32,
    pub(super) y0: i32,
    pub(super) x1: i32,
    pub(super) y1: i32,
}

impl Rect {
    pub(super) fn contains(&self, x: f64, y: f64) -> bool {
        x >= self.x0 as f64 && x <= self.x1 as f64 && y >= self.y0 as f64 && y <= self.y1 as f64
    }
}

/// The range to show for `values`: their span widened by `pad` of it on both sides, or
/// `flat_half` (relative to the value's magnitude when it is non-zero) on both sides of a flat
/// series, so that the span is never zero. With `floor_zero`, a range over non-negative values
/// does not go below zero. No values give (0, 1).
pub(super) fn padded_range(
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
pub(super) const VALUE_LIMIT: f64 = 1e300;

/// Maps `v` from `[lo, hi]` onto `[p0, p1]` in pixels; the result is finite and within a few
/// thousand pixels of the picture even for values far outside the range (NaN only for NaN).
pub(super) fn scale(v: f64, (lo, hi): (f64, f64), p0: f64, p1: f64) -> f64 {
    let v = v.clamp(-VALUE_LIMIT, VALUE_LIMIT);
    let t = (v / 2.0 - lo / 2.0) / (hi / 2.0 - lo / 2.0);
    (p0 + t.clamp(-4.0, 5.0) * (p1 - p0)).clamp(-1e4, 1e4)
}

/// "Nice" tick positions (1, 2 or 5 times a power of ten apart) inside `[lo, hi]`, about
/// `target` of them (up to a third more), and the step between them.
pub(super) fn nice_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, f64) {
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
pub(super) fn tick_label(v: f64, step: f64) -> String {
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
