//! Line plots as PNG files, drawn with the bitmap font of multilabel-data so
//! that no system font is needed.

use std::path::Path;

use anyhow::Context;
use image::{Rgb, RgbImage};
use multilabel_data::font::{draw_text, text_width};
use multilabel_train::metrics::SweepPoint;

const WIDTH: u32 = 640;
const HEIGHT: u32 = 420;
const LEFT: u32 = 70;
const RIGHT: u32 = 20;
const TOP: u32 = 40;
const BOTTOM: u32 = 50;
const INK: [u8; 3] = [30, 30, 30];
const GRID: [u8; 3] = [225, 225, 225];
const LINE: [u8; 3] = [31, 119, 180];
const MARK: [u8; 3] = [214, 39, 40];

/// accuracy_multi against threshold, with the best point marked.
pub fn sweep_plot(sweep: &[SweepPoint], best: SweepPoint, path: &Path) -> anyhow::Result<()> {
    let points: Vec<(f64, f64)> = sweep
        .iter()
        .map(|p| (f64::from(p.thresh), p.accuracy_multi))
        .collect();
    let title = format!(
        "accuracy_multi vs threshold (best {:.3} at {:.2})",
        best.accuracy_multi, best.thresh
    );
    let plot = Plot::new(&points, false, &title, "threshold", "accuracy_multi");
    let mut image = plot.draw(&points);
    plot.marker(&mut image, (f64::from(best.thresh), best.accuracy_multi));
    save(&image, path)
}

/// Smoothed loss against learning rate (log scale), with the suggestion marked.
pub fn lr_find_plot(
    lrs: &[f64],
    losses: &[f64],
    suggestion: Option<f64>,
    path: &Path,
) -> anyhow::Result<()> {
    let points: Vec<(f64, f64)> = lrs
        .iter()
        .zip(losses)
        .filter(|(lr, loss)| **lr > 0.0 && loss.is_finite())
        .map(|(lr, loss)| (lr.log10(), *loss))
        .collect();
    if points.len() < 2 {
        anyhow::bail!("too few finite losses to plot");
    }
    let title = match suggestion {
        Some(lr) => format!("lr_find: loss vs learning rate (valley {lr:.2e})"),
        None => "lr_find: loss vs learning rate".to_string(),
    };
    let plot = Plot::new(&points, true, &title, "learning rate (log10)", "loss");
    let mut image = plot.draw(&points);
    if let Some(lr) = suggestion
        && let Some(&(x, y)) = points.iter().min_by(|a, b| {
            (a.0 - lr.log10())
                .abs()
                .total_cmp(&(b.0 - lr.log10()).abs())
        })
    {
        plot.marker(&mut image, (x, y));
    }
    save(&image, path)
}

fn save(image: &RgbImage, path: &Path) -> anyhow::Result<()> {
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .context("encoding the plot")?;
    multilabel_train::atomic_write(path, &bytes)
        .with_context(|| format!("writing {}", path.display()))
}

struct Plot<'a> {
    x_range: (f64, f64),
    y_range: (f64, f64),
    log_x: bool,
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
}

impl<'a> Plot<'a> {
    fn new(
        points: &[(f64, f64)],
        log_x: bool,
        title: &'a str,
        x_label: &'a str,
        y_label: &'a str,
    ) -> Self {
        let range = |values: &mut dyn Iterator<Item = f64>| {
            let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
            if !lo.is_finite() || !hi.is_finite() {
                (0.0, 1.0)
            } else if hi - lo < 1e-12 {
                (lo - 0.5, hi + 0.5)
            } else {
                let pad = (hi - lo) * 0.05;
                (lo - pad, hi + pad)
            }
        };
        Self {
            x_range: range(&mut points.iter().map(|p| p.0)),
            y_range: range(&mut points.iter().map(|p| p.1)),
            log_x,
            title,
            x_label,
            y_label,
        }
    }

    fn to_pixel(&self, (x, y): (f64, f64)) -> (f64, f64) {
        let plot_w = f64::from(WIDTH - LEFT - RIGHT);
        let plot_h = f64::from(HEIGHT - TOP - BOTTOM);
        let px =
            f64::from(LEFT) + (x - self.x_range.0) / (self.x_range.1 - self.x_range.0) * plot_w;
        let py = f64::from(TOP)
            + (1.0 - (y - self.y_range.0) / (self.y_range.1 - self.y_range.0)) * plot_h;
        (px, py)
    }

    fn draw(&self, points: &[(f64, f64)]) -> RgbImage {
        let mut image = RgbImage::from_pixel(WIDTH, HEIGHT, Rgb([255, 255, 255]));
        // Grid and tick labels: five ticks per axis.
        for i in 0..=4 {
            let f = f64::from(i) / 4.0;
            let x = self.x_range.0 + f * (self.x_range.1 - self.x_range.0);
            let y = self.y_range.0 + f * (self.y_range.1 - self.y_range.0);
            let (px, _) = self.to_pixel((x, self.y_range.0));
            let (_, py) = self.to_pixel((self.x_range.0, y));
            for yy in TOP..HEIGHT - BOTTOM {
                put(&mut image, px as i64, i64::from(yy), GRID);
            }
            for xx in LEFT..WIDTH - RIGHT {
                put(&mut image, i64::from(xx), py as i64, GRID);
            }
            let x_text = if self.log_x {
                format!("1e{x:.1}")
            } else {
                format!("{x:.2}")
            };
            let tw = text_width(&x_text, 1);
            draw_text(
                &mut image,
                (px as u32).saturating_sub(tw / 2),
                HEIGHT - BOTTOM + 6,
                &x_text,
                1,
                INK,
            );
            let y_text = format!("{y:.3}");
            let tw = text_width(&y_text, 1);
            draw_text(
                &mut image,
                LEFT.saturating_sub(tw + 6),
                (py as u32).saturating_sub(3),
                &y_text,
                1,
                INK,
            );
        }
        // Axes.
        for xx in LEFT..WIDTH - RIGHT {
            put(&mut image, i64::from(xx), i64::from(HEIGHT - BOTTOM), INK);
        }
        for yy in TOP..=HEIGHT - BOTTOM {
            put(&mut image, i64::from(LEFT), i64::from(yy), INK);
        }
        // The curve.
        for pair in points.windows(2) {
            let a = self.to_pixel(pair[0]);
            let b = self.to_pixel(pair[1]);
            line(&mut image, a, b, LINE);
        }
        let tw = text_width(self.title, 2);
        draw_text(
            &mut image,
            (WIDTH.saturating_sub(tw)) / 2,
            10,
            self.title,
            2,
            INK,
        );
        let tw = text_width(self.x_label, 1);
        draw_text(
            &mut image,
            (WIDTH.saturating_sub(tw)) / 2,
            HEIGHT - 22,
            self.x_label,
            1,
            INK,
        );
        draw_text(&mut image, 4, TOP - 14, self.y_label, 1, INK);
        image
    }

    fn marker(&self, image: &mut RgbImage, point: (f64, f64)) {
        let (px, py) = self.to_pixel(point);
        for dy in -4i64..=4 {
            for dx in -4i64..=4 {
                if dx * dx + dy * dy <= 16 {
                    put(image, px as i64 + dx, py as i64 + dy, MARK);
                }
            }
        }
    }
}

fn put(image: &mut RgbImage, x: i64, y: i64, colour: [u8; 3]) {
    if x >= 0 && y >= 0 && (x as u32) < image.width() && (y as u32) < image.height() {
        image.put_pixel(x as u32, y as u32, Rgb(colour));
    }
}

/// A two-pixel-wide line by sampling along its length.
fn line(image: &mut RgbImage, a: (f64, f64), b: (f64, f64), colour: [u8; 3]) {
    let steps = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for s in 0..=steps {
        let t = s as f64 / steps as f64;
        let x = a.0 + (b.0 - a.0) * t;
        let y = a.1 + (b.1 - a.1) * t;
        put(image, x as i64, y as i64, colour);
        put(image, x as i64, y as i64 + 1, colour);
    }
}
