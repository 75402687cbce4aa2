//! report.html: one self-contained page (inline SVG, no scripts, no external files) with the
//! run's throughput and latency over time, the faults marked on both, and the verifier's table.

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::run::RunResult;

const WIDTH: u32 = 900;
const HEIGHT: u32 = 320;

/// One line on a chart: name, colour, (second, value) points.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// How a chart's y axis is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scale {
    Linear,
    /// Latencies: a spike during a fault must not flatten everything else.
    Log,
}

/// A line chart over the run's seconds with the faults as labelled vertical lines.
fn chart(
    title: &str,
    y_label: &str,
    series: &[Series<'_>],
    result: &RunResult,
    scale: Scale,
) -> Result<String> {
    let y_max = series
        .iter()
        .flat_map(|(_, _, points)| points.iter().map(|(_, y)| *y))
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.15;
    match scale {
        Scale::Linear => draw(title, y_label, series, result, 0.0..y_max, (0.0, y_max)),
        Scale::Log => {
            let y_min = series
                .iter()
                .flat_map(|(_, _, points)| points.iter().map(|(_, y)| *y))
                .filter(|y| *y > 0.0)
                .fold(f64::MAX, f64::min)
                .min(y_max / 10.0)
                / 2.0;
            draw(
                title,
                y_label,
                series,
                result,
                (y_min..y_max).log_scale(),
                (y_min, y_max),
            )
        }
    }
}

fn draw<Y>(
    title: &str,
    y_label: &str,
    series: &[Series<'_>],
    result: &RunResult,
    y_range: Y,
    (y_low, y_max): (f64, f64),
) -> Result<String>
where
    Y: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
    Y::CoordDescType: plotters::coord::ranged1d::ValueFormatter<f64>,
{
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let x_max = result.duration_s.floor().max(1.0);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_max, y_range)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds since load started")
            .y_desc(y_label)
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (name, colour, points) in series {
            let colour = *colour;
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(|e| anyhow!("{e}"))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
        }
        let fault_colour = RGBColor(200, 40, 40);
        for (i, fault) in result.faults.iter().enumerate() {
            let x = fault.at_ms as f64 / 1000.0;
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x, y_low), (x, y_max)],
                    fault_colour.mix(0.6).stroke_width(1),
                )))
                .map_err(|e| anyhow!("{e}"))?;
            // Labels alternate height so neighbouring faults stay readable.
            let y = match i % 2 {
                0 => y_max * 0.97,
                _ => y_low + (y_max - y_low) * 0.55,
            };
            chart
                .draw_series(std::iter::once(Text::new(
                    short(&fault.fault),
                    (x, y),
                    ("sans-serif", 11).into_font().color(&fault_colour),
                )))
                .map_err(|e| anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    Ok(svg)
}

/// "kill -9 broker [2] (leader:demo/0)" → "kill -9 broker [2]".
fn short(fault: &str) -> String {
    fault.split(" (").next().unwrap_or(fault).to_owned()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn render(result: &RunResult) -> Result<String> {
    // Whole seconds only: the last, partial second would look like a collapse.
    let whole = result.duration_s.floor() as usize;
    let seconds = |values: &[u64]| -> Vec<(f64, f64)> {
        values
            .iter()
            .take(whole)
            .enumerate()
            .map(|(i, v)| (i as f64 + 0.5, *v as f64))
            .collect()
    };
    let throughput = chart(
        "Acknowledged records per second",
        "records/s",
        &[(
            "acknowledged",
            RGBColor(31, 119, 180),
            seconds(&result.throughput_per_second),
        )],
        result,
        Scale::Linear,
    )?;
    let latency_points = |pick: fn(&(f64, f64)) -> f64| -> Vec<(f64, f64)> {
        result
            .publish_latency_per_second
            .iter()
            .take(whole)
            .enumerate()
            .filter(|(_, p)| p.0 > 0.0)
            .map(|(i, p)| (i as f64 + 0.5, pick(p)))
            .collect()
    };
    let mut latency_series = vec![
        (
            "publish p50",
            RGBColor(44, 160, 44),
            latency_points(|p| p.0),
        ),
        (
            "publish p99",
            RGBColor(255, 127, 14),
            latency_points(|p| p.1),
        ),
    ];
    let e2e: Vec<(f64, f64)> = result
        .end_to_end_latency_per_second
        .iter()
        .take(whole)
        .enumerate()
        .filter(|(_, p)| p.1 > 0.0)
        .map(|(i, p)| (i as f64 + 0.5, p.1))
        .collect();
    if !e2e.is_empty() {
        latency_series.push(("end-to-end p99", RGBColor(148, 103, 189), e2e));
    }
    let latency = chart(
        "Latency percentiles per second (log scale)",
        "milliseconds",
        &latency_series,
        result,
        Scale::Log,
    )?;

    let p = &result.publish_latency_ms;
    let v = &result.verdict;
    let mut faults = String::new();
    for w in &result.faults {
        let unavailable = w.describe();
        faults.push_str(&format!(
            "<tr><td>{:.1} s</td><td>{}</td><td>{unavailable}</td></tr>\n",
            w.at_ms as f64 / 1000.0,
            escape(&w.fault)
        ));
    }
    let e2e_row = match &result.end_to_end_latency_ms {
        Some(e) => format!(
            "<tr><th>end-to-end latency</th><td>p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} records)</td></tr>",
            e.p50, e.p90, e.p99, e.p999, e.max, e.count
        ),
        None => String::new(),
    };
    let examples: String = v
        .examples
        .iter()
        .map(|e| format!("<li>{}</li>", escape(e)))
        .collect();
    let (verdict_class, verdict_text) = if v.is_clean() {
        (
            "pass",
            "PASS: every acknowledged record is stored once, where it was acknowledged",
        )
    } else {
        (
            "fail",
            "FAIL: acknowledged records were lost, duplicated or moved",
        )
    };
    Ok(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>PubG1 loadgen: {scenario}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 960px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
.pass {{ color: #1a7f37; font-weight: bold; }} .fail {{ color: #c62828; font-weight: bold; }}
figure {{ margin: 1em 0; }}
</style></head><body>
<h1>PubG1 loadgen: {scenario}</h1>
<p class="{verdict_class}">{verdict_text}</p>
<table>
<tr><th>load</th><td>{duration:.1} s on {brokers} brokers, topic {topic}</td></tr>
<tr><th>acknowledged</th><td>{acked} records ({rate:.0} records/s); {ok} requests ok, {failed} failed</td></tr>
<tr><th>publish latency</th><td>p50 {p50:.2} ms, p90 {p90:.2} ms, p99 {p99:.2} ms, p99.9 {p999:.2} ms, max {max:.2} ms</td></tr>
{e2e_row}
</table>
<figure>{throughput}</figure>
<figure>{latency}</figure>
<h2>Faults</h2>
<p>Unavailability: from the first failed publish after a fault to the next successful one.</p>
<table><tr><th>at</th><th>fault</th><th>unavailable</th></tr>
{faults}</table>
<h2>Verifier</h2>
<table>
<tr><th>acknowledged</th><td>{v_acked}</td></tr>
<tr><th>stored</th><td>{v_stored}</td></tr>
<tr><th>lost</th><td>{lost}</td></tr>
<tr><th>duplicated</th><td>{dup}</td></tr>
<tr><th>moved (acknowledged at another offset)</th><td>{moved}</td></tr>
<tr><th>reordered (per producer, per partition)</th><td>{reordered}</td></tr>
<tr><th>stored but never acknowledged (allowed)</th><td>{unacked}</td></tr>
</table>
<ul>{examples}</ul>
</body></html>
"#,
        scenario = escape(&result.scenario),
        duration = result.duration_s,
        brokers = result.brokers,
        topic = escape(&result.topic),
        acked = result.records_acknowledged,
        rate = result.records_per_second,
        ok = result.requests_ok,
        failed = result.requests_failed,
        p50 = p.p50,
        p90 = p.p90,
        p99 = p.p99,
        p999 = p.p999,
        max = p.max,
        v_acked = v.acknowledged,
        v_stored = v.stored,
        lost = v.lost,
        dup = v.duplicated,
        moved = v.moved,
        reordered = v.reordered,
        unacked = v.unacknowledged_stored,
    ))
}
