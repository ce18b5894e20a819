//! Samples, their median and p99, and the report's markdown tables.

use std::fmt::Write as _;
use std::time::Duration;

/// Median and p99 of a set of samples (nearest rank).
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub median: f64,
    pub p99: f64,
    pub n: usize,
}

/// Summarises durations in milliseconds.
pub fn millis(samples: &[Duration]) -> Summary {
    let values: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    of(&values)
}

/// Summarises plain values.
pub fn of(values: &[f64]) -> Summary {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() as f64 - 1.0) * q).round() as usize]
    };
    Summary {
        median: at(0.5),
        p99: at(0.99),
        n: v.len(),
    }
}

/// A markdown table accumulating rows.
pub struct Table {
    text: String,
}

impl Table {
    /// A table with a caption line and column headers.
    pub fn new(caption: &str, headers: &[&str]) -> Self {
        let mut text = format!("{caption}\n\n| {} |\n|", headers.join(" | "));
        for _ in headers {
            text.push_str("---|");
        }
        text.push('\n');
        Self { text }
    }

    /// Appends a row.
    pub fn row(&mut self, cells: &[String]) {
        let _ = writeln!(self.text, "| {} |", cells.join(" | "));
    }

    /// The finished table.
    pub fn finish(self) -> String {
        self.text
    }
}

/// `x` as a ratio to `floor`, e.g. `1.04×`.
pub fn ratio(x: f64, floor: f64) -> String {
    if x.is_finite() && floor.is_finite() && floor > 0.0 {
        format!("{:.2}×", x / floor)
    } else {
        "–".into()
    }
}

/// A number with `digits` decimals, or `–` when it is not one.
pub fn num(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        "–".into()
    }
}
