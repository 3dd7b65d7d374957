//! Plots of a side-by-side run, as SVG and PNG. Labels need a TrueType font from the
//! system (Debian's fonts-dejavu-core, which ci/bench.sh installs); without one there
//! are no plots, and the error says why.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::Report;

#[derive(Debug, thiserror::Error)]
#[error("plot {path}: {message}")]
pub struct PlotError {
    pub path: PathBuf,
    pub message: String,
}

/// One line of a chart: a system and its points.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

const FONT_PATHS: [&str; 2] =
    ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf"];

/// Registers a system font for the labels; false when none is installed.
fn load_font() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| {
        FONT_PATHS.iter().any(|p| match std::fs::read(p) {
            // Leaked once per process: the font registry wants 'static bytes.
            Ok(bytes) => plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice())).is_ok(),
            Err(_) => false,
        })
    })
}

const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
];

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let points = series.iter().flat_map(|s| s.points.iter());
    let (mut x_min, mut x_max, mut y_min, mut y_max) = (f64::MAX, 0.0f64, f64::MAX, 0.0f64);
    for &(x, y) in points {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if y_max <= 0.0 {
        return Err("nothing to plot".into());
    }
    let y_range = (y_min.max(0.1) / 1.5)..(y_max * 1.5);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_min - 0.05 * (x_max - x_min).max(0.1)..x_max + 0.05 * (x_max - x_min).max(0.1), y_range.log_scale())
        .map_err(err)?;
    chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw().map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))
            .map_err(err)?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// Writes `<stem>.svg` and `<stem>.png`; returns the files.
pub fn chart(stem: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<Vec<PathBuf>, PlotError> {
    let svg = stem.with_extension("svg");
    let png = stem.with_extension("png");
    if !load_font() {
        return Err(PlotError {
            path: svg,
            message: format!("no font for the labels: install one of {FONT_PATHS:?} (Debian: fonts-dejavu-core)"),
        });
    }
    draw(SVGBackend::new(&svg, (900, 560)).into_drawing_area(), title, x_label, y_label, series)
        .map_err(|message| PlotError { path: svg.clone(), message })?;
    draw(BitMapBackend::new(&png, (900, 560)).into_drawing_area(), title, x_label, y_label, series)
        .map_err(|message| PlotError { path: png.clone(), message })?;
    Ok(vec![svg, png])
}

/// Latency at each percentile, x in "nines" (0.99 -> 2, 0.999 -> 3), one line per report.
pub fn percentile_series(reports: &[&Report]) -> Vec<Series> {
    reports
        .iter()
        .map(|r| Series {
            label: r.target.clone(),
            points: r.percentiles.iter().filter(|p| p[0] < 1.0).map(|p| (-(1.0 - p[0]).log10(), p[1])).collect(),
        })
        .collect()
}
