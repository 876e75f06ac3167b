//! `--plot DIR`: SVG charts of the latency distribution and of the
//! throughput over time during a drain, drawn with plotters.

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::drain::DrainReport;
use super::latency::LatencyReport;

const SIZE: (u32, u32) = (960, 480);

/// Line colours of the drain chart: raw first, then each relay count.
const SERIES_COLORS: [RGBColor; 5] = [
    RGBColor(40, 40, 40),
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

fn create_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the plot directory {}", dir.display()))
}

/// Writes `latency.svg`: a histogram and the cumulative distribution of
/// commit -> delivered, p50 and p99 marked. Returns the file written.
pub fn latency(dir: &Path, report: &LatencyReport) -> anyhow::Result<PathBuf> {
    create_dir(dir)?;
    let path = dir.join("latency.svg");
    let mut samples = report.samples_ms.clone();
    samples.sort_by(f64::total_cmp);
    // Far outliers would squash the body: the axis ends at 2x p999 (the
    // maximum is in the caption).
    let x_max = (report.p999_ms * 2.0)
        .min(report.max_ms)
        .max(report.p99_ms * 1.2)
        .max(0.1)
        * 1.05;
    let bins = 60usize;
    let width = x_max / bins as f64;
    let mut counts = vec![0u32; bins];
    for &value in &samples {
        let bin = (value / width).floor();
        if bin >= 0.0 && (bin as usize) < bins {
            counts[bin as usize] += 1;
        }
    }
    let y_max = f64::from(counts.iter().copied().max().unwrap_or(1).max(1)) * 1.1;

    let root = SVGBackend::new(&path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "commit -> delivered, {} events at {:.0}/s: p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, max {:.2} ms",
            report.events, report.achieved_rate, report.p50_ms, report.p99_ms, report.p999_ms, report.max_ms
        ),
        ("sans-serif", 20),
    )?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);

    let mut histogram = ChartBuilder::on(&left)
        .caption("histogram", ("sans-serif", 17))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(65)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    histogram
        .configure_mesh()
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .x_desc("latency (ms)")
        .y_desc("events")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    histogram.draw_series(counts.iter().enumerate().map(|(i, &count)| {
        let x0 = i as f64 * width;
        Rectangle::new(
            [(x0, 0.0), (x0 + width, f64::from(count))],
            BLUE.mix(0.6).filled(),
        )
    }))?;
    mark(&mut histogram, report.p50_ms, y_max, &GREEN, "p50")?;
    mark(&mut histogram, report.p99_ms, y_max, &RED, "p99")?;
    legend(&mut histogram, SeriesLabelPosition::UpperRight)?;

    let mut cdf = ChartBuilder::on(&right)
        .caption("cumulative distribution", ("sans-serif", 17))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(65)
        .build_cartesian_2d(0f64..x_max, 0f64..1.0f64)?;
    cdf.configure_mesh()
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .x_desc("latency (ms)")
        .y_desc("fraction of events")
        .draw()?;
    let n = samples.len().max(1) as f64;
    cdf.draw_series(LineSeries::new(
        samples
            .iter()
            .enumerate()
            .filter(|(_, value)| **value <= x_max)
            .map(|(i, value)| (*value, (i + 1) as f64 / n)),
        &BLUE,
    ))?
    .label("CDF")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    mark(&mut cdf, report.p50_ms, 1.0, &GREEN, "p50")?;
    mark(&mut cdf, report.p99_ms, 1.0, &RED, "p99")?;
    legend(&mut cdf, SeriesLabelPosition::LowerRight)?;
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path.clone())
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The series' legend box at `position`.
fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, position: SeriesLabelPosition) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// A vertical line at `x` labelled `name x ms`.
fn mark(
    chart: &mut Chart<'_, '_>,
    x: f64,
    y_max: f64,
    color: &'static RGBColor,
    name: &str,
) -> anyhow::Result<()> {
    chart
        .draw_series(LineSeries::new(vec![(x, 0.0), (x, y_max)], color.stroke_width(2)))
        .with_context(|| format!("cannot draw the {name} mark"))?
        .label(format!("{name} {x:.2} ms"))
        .legend(move |(lx, ly)| PathElement::new(vec![(lx, ly), (lx + 20, ly)], color.stroke_width(2)));
    Ok(())
}

/// Events/s between consecutive (seconds, count) samples at least 90 ms
/// apart, at each interval's end.
fn rates(progress: &[(f64, u64)]) -> Vec<(f64, f64)> {
    let mut previous = (0.0, 0u64);
    let mut out = vec![(0.0, 0.0)];
    for &(t, count) in progress {
        let dt = t - previous.0;
        // A stub interval (the final sample comes right after the one
        // before) would show a spike; it joins the next or is left out.
        if dt >= 0.09 {
            out.push((t, count.saturating_sub(previous.1) as f64 / dt));
            previous = (t, count);
        }
    }
    out
}

/// Writes `drain.svg`: events/s over time, every ~100 ms, for the raw
/// publisher and each relay count. Returns the file written.
pub fn drain(dir: &Path, report: &DrainReport) -> anyhow::Result<PathBuf> {
    create_dir(dir)?;
    let path = dir.join("drain.svg");
    let mut series = vec![(
        "raw lapin publish + confirms".to_owned(),
        rates(&report.raw_progress),
    )];
    for run in &report.runs {
        series.push((format!("outbox relay x{}", run.relays), rates(&run.progress)));
    }
    let x_max = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.0))
        .fold(0.1f64, f64::max)
        * 1.02;
    let y_max = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.1;
    let root = SVGBackend::new(&path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "drain of {} events on {} aggregates: throughput over time",
                report.events, report.aggregates
            ),
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(75)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .x_desc("seconds since start")
        .y_desc("events/s (broker-confirmed)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (i, (name, points)) in series.into_iter().enumerate() {
        let color = SERIES_COLORS[i % SERIES_COLORS.len()];
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path.clone())
}
