//! Small statistics helpers: mean, sample standard deviation, standard error, CSV cells.

use serde::{Deserialize, Serialize};

/// Mean, sample standard deviation (n - 1 denominator) and count of some values.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MeanStd {
    /// Arithmetic mean (NaN for no values).
    pub mean: f64,
    /// Sample standard deviation with Bessel's correction (NaN for fewer than two values).
    pub std: f64,
    /// Number of values.
    pub n: usize,
}

impl MeanStd {
    /// Of `values`.
    pub fn of(values: &[f64]) -> MeanStd {
        let n = values.len();
        let mean = if n == 0 { f64::NAN } else { values.iter().sum::<f64>() / n as f64 };
        let std = if n < 2 {
            f64::NAN
        } else {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        };
        MeanStd { mean, std, n }
    }
    /// Standard error of the mean, `std / sqrt(n)` (NaN for fewer than two values).
    pub fn standard_error(&self) -> f64 {
        self.std / (self.n as f64).sqrt()
    }
}

/// Welford's running mean and variance (numerically stable, one pass).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Running {
    n: usize,
    mean: f64,
    m2: f64,
}

impl Running {
    /// Adds one value.
    pub fn push(&mut self, x: f64) {
        self.n += 1;
        let d = x - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (x - self.mean);
    }
    /// Number of values.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Mean so far.
    pub fn mean(&self) -> f64 {
        if self.n == 0 {
            f64::NAN
        } else {
            self.mean
        }
    }
    /// Standard error of the mean so far (NaN below two values).
    pub fn standard_error(&self) -> f64 {
        if self.n < 2 {
            f64::NAN
        } else {
            (self.m2 / (self.n - 1) as f64 / self.n as f64).sqrt()
        }
    }
}

/// A number as a CSV cell: shortest round-trip form, empty for NaN.
pub fn cell(x: f64) -> String {
    if x.is_nan() {
        String::new()
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_std_by_hand() {
        // 2, 4, 4, 4, 5, 5, 7, 9: mean 5, sum of squares 32, sample variance 32/7.
        let m = MeanStd::of(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(m.mean, 5.0);
        assert!((m.std - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        assert!((m.standard_error() - (32.0f64 / 7.0 / 8.0).sqrt()).abs() < 1e-12);
        assert!(MeanStd::of(&[1.0]).std.is_nan());
        let mut r = Running::default();
        for x in [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0] {
            r.push(x);
        }
        assert!((r.mean() - 5.0).abs() < 1e-12);
        assert!((r.standard_error() - m.standard_error()).abs() < 1e-12);
    }
}
