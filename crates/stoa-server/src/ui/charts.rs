//! Metric charts as inline SVG, drawn from the same series `/execution/{id}/metrics`
//! answers: CPU %, memory, and (for runs given GPUs) GPU utilisation, GPU memory and
//! power.

use maud::{Markup, html};
use serde_json::Value;

const W: f64 = 600.0;
const H: f64 = 150.0;
/// Room for the axis labels.
const PAD_L: f64 = 56.0;
const PAD_B: f64 = 18.0;

struct Chart {
    id: &'static str,
    title: &'static str,
    series: &'static str,
    /// The top of the scale when the values do not pass it (percentages: 100).
    floor_max: f64,
    unit: fn(f64) -> String,
}

fn percent(v: f64) -> String {
    format!("{v:.0} %")
}

fn mib(v: f64) -> String {
    if v >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", v / (1024.0 * 1024.0 * 1024.0))
    } else {
        format!("{:.0} MiB", v / (1024.0 * 1024.0))
    }
}

fn watts(v: f64) -> String {
    format!("{v:.0} W")
}

const CHARTS: [Chart; 5] = [
    Chart {
        id: "chart-cpu",
        title: "CPU",
        series: "systemCpuUsagePercent",
        floor_max: 100.0,
        unit: percent,
    },
    Chart {
        id: "chart-memory",
        title: "Memory",
        series: "systemRamUsedBytes",
        floor_max: 64.0 * 1024.0 * 1024.0,
        unit: mib,
    },
    Chart {
        id: "chart-gpu",
        title: "GPU utilisation",
        series: "gpuUtilizationPercent",
        floor_max: 100.0,
        unit: percent,
    },
    Chart {
        id: "chart-gpu-memory",
        title: "GPU memory",
        series: "gpuMemoryUtilizationPercent",
        floor_max: 100.0,
        unit: percent,
    },
    Chart {
        id: "chart-gpu-power",
        title: "GPU power",
        series: "gpuPowerWatt",
        floor_max: 50.0,
        unit: watts,
    },
];

/// The charts of a metrics reply. GPU charts only when the run has GPU samples.
pub fn render(m: &Value) -> Markup {
    let values = |name: &str| -> Vec<f64> {
        m.get(name)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.get("value").and_then(Value::as_f64))
                    .collect()
            })
            .unwrap_or_default()
    };
    html! {
        @for c in &CHARTS {
            @let v = values(c.series);
            @if !c.series.starts_with("gpu") || !v.is_empty() {
                (chart(c, &v))
            }
        }
    }
}

fn chart(c: &Chart, v: &[f64]) -> Markup {
    let max = v.iter().cloned().fold(c.floor_max, f64::max);
    let peak = v.iter().cloned().fold(0.0, f64::max);
    let last = v.last().copied();
    let x = |i: usize| {
        if v.len() <= 1 {
            PAD_L
        } else {
            PAD_L + (W - PAD_L - 4.0) * i as f64 / (v.len() - 1) as f64
        }
    };
    let y = |val: f64| 4.0 + (H - PAD_B - 4.0) * (1.0 - val / max);
    let points: Vec<String> = v
        .iter()
        .enumerate()
        .map(|(i, val)| format!("{:.1},{:.1}", x(i), y(*val)))
        .collect();
    let label = match last {
        Some(l) => format!(
            "{}: now {}, peak {}, {} samples",
            c.title,
            (c.unit)(l),
            (c.unit)(peak),
            v.len()
        ),
        None => format!("{}: no samples yet", c.title),
    };
    html! {
        figure.chart id=(c.id) data-points=(v.len()) {
            figcaption { (label) }
            svg viewBox={ "0 0 " (W) " " (H) } role="img" aria-label=(label) preserveAspectRatio="none" {
                line.axis x1=(PAD_L) y1=(H - PAD_B) x2=(W) y2=(H - PAD_B) {}
                line.axis x1=(PAD_L) y1="4" x2=(PAD_L) y2=(H - PAD_B) {}
                line.grid x1=(PAD_L) y1=(y(max / 2.0)) x2=(W) y2=(y(max / 2.0)) {}
                text.tick x=(PAD_L - 4.0) y="12" text-anchor="end" { ((c.unit)(max)) }
                text.tick x=(PAD_L - 4.0) y=(y(max / 2.0) + 4.0) text-anchor="end" { ((c.unit)(max / 2.0)) }
                text.tick x=(PAD_L - 4.0) y=(H - PAD_B) text-anchor="end" { ((c.unit)(0.0)) }
                @if v.len() == 1 {
                    circle.line cx=(x(0)) cy=(y(v[0])) r="3" {}
                } @else if !v.is_empty() {
                    polyline.line points=(points.join(" ")) {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn draws_cpu_and_memory_and_gpu_only_when_sampled() {
        let m = json!({
            "systemCpuUsagePercent": [{"value": 10.0}, {"value": 95.5}, {"value": 50.0}],
            "systemRamUsedBytes": [{"value": 1048576.0}],
            "gpuUtilizationPercent": [],
        });
        let h = render(&m).into_string();
        assert!(h.contains("id=\"chart-cpu\""));
        assert!(h.contains("<polyline"));
        assert!(h.contains("CPU: now 50 %, peak 96 %, 3 samples"));
        assert!(h.contains("id=\"chart-memory\""));
        assert!(!h.contains("chart-gpu"));
        let none = render(&json!({})).into_string();
        assert!(none.contains("CPU: no samples yet"));
    }
}
