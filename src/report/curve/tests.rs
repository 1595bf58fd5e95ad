use super::font::TITLE_FONT;
use super::layout::{epoch_ticks, layout, nice_ticks, padded_range, tick_label, Rect};
use super::raster::Mask;
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

/// Pixels of exactly `colour` inside `r` (its frame included).
fn count_in(img: &RgbImage, r: Rect, colour: Rgb<u8>) -> usize {
    img.enumerate_pixels()
        .filter(|(x, y, p)| **p == colour && r.contains(f64::from(*x), f64::from(*y)))
        .count()
}

/// Pixels of exactly `colour` outside every rect of `rs`.
fn count_outside(img: &RgbImage, rs: &[Rect], colour: Rgb<u8>) -> usize {
    img.enumerate_pixels()
        .filter(|(x, y, p)| {
            **p == colour && !rs.iter().any(|r| r.contains(f64::from(*x), f64::from(*y)))
        })
        .count()
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
    let title = "resnet20 on cifar10";
    let pts = typical(30);
    let img = roundtrip(title, &pts);
    let l = layout(title, &pts);
    let rects = [l.panels[0].rect, l.panels[1].rect];
    // Both curves are drawn in both panels (loss on the left, accuracy on the right), and
    // nothing of their colours leaks out of the panels.
    for (r, panel) in rects.iter().zip(["loss", "accuracy"]) {
        assert!(
            count_in(&img, *r, TRAIN) > 200,
            "{panel}: train curve missing"
        );
        assert!(
            count_in(&img, *r, TEST) > 200,
            "{panel}: test curve missing"
        );
    }
    assert_eq!(count_outside(&img, &rects, TRAIN), 0);
    assert_eq!(count_outside(&img, &rects, TEST), 0);
    // Each epoch's dot is where the layout put it: the pixel under its centre has the series'
    // colour (a few may lie under the other curve or the legend).
    for p in &l.panels {
        for s in p.series.iter().filter(|s| !s.secondary) {
            let hit = s
                .markers
                .iter()
                .filter(|(x, y)| *img.get_pixel(*x as u32, *y as u32) == s.colour)
                .count();
            assert!(hit >= 25, "{}/{}: {hit} of 30 dots found", p.title, s.label);
        }
    }
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
    let title = "ünïcödé — ✓ title that is far too long to fit ".repeat(10);
    let img = render(&title, &odd);
    assert_eq!((img.width(), img.height()), (WIDTH, HEIGHT));
    let l = layout(&title, &odd);
    // The title is shortened to the picture, and the far-off values are clipped to the panels.
    assert!(l.headline.ends_with("...") && TITLE_FONT.width(&l.headline) <= WIDTH as i32 - 20);
    let rects = [l.panels[0].rect, l.panels[1].rect];
    assert_eq!(count_outside(&img, &rects, TRAIN), 0);
    assert_eq!(count_outside(&img, &rects, TEST), 0);
    for p in &l.panels {
        assert!(
            p.y_range.0.is_finite() && p.y_range.1 > p.y_range.0,
            "{}",
            p.title
        );
        for s in &p.series {
            assert!(s.pixels.iter().all(|(x, y)| x.is_finite() && y.is_finite()));
        }
    }
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
