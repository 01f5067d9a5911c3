//! Aggregators: how the replies of one round combine into one set of weights. The mean streams
//! (one running sum whatever the number of clients); the robust rules need every reply of the
//! round by definition and buffer them.

use crate::Weights;
use crate::strategy::FitRes;

/// One round's combination of client weights. `finish` is None when nothing was added.
pub trait Aggregator: Send {
    fn begin(&mut self, current: &Weights);
    fn add(&mut self, res: FitRes);
    fn finish(&mut self) -> Option<Weights>;
}

/// FedAvg's weighted mean: a running sum of `w * num_examples` in f32, then divided by the
/// total — numpy's order of operations in Flower's `aggregate`, so results agree bit for bit
/// with Flower when replies are added in client order.
#[derive(Default)]
pub struct Mean {
    sum: Option<Weights>,
    total: u64,
}

impl Aggregator for Mean {
    fn begin(&mut self, current: &Weights) {
        self.sum = Some(current.zeros_like());
        self.total = 0;
    }

    fn add(&mut self, res: FitRes) {
        if let Some(sum) = self.sum.as_mut() {
            add_weighted(sum, &res.weights, res.num_examples);
            self.total += res.num_examples;
        }
    }

    fn finish(&mut self) -> Option<Weights> {
        let mut sum = self.sum.take()?;
        if self.total == 0 {
            return None;
        }
        divide(&mut sum, self.total);
        Some(sum)
    }
}

fn add_weighted(sum: &mut Weights, w: &Weights, n: u64) {
    let nf = n as f32;
    for (s, x) in sum.iter_data_mut().zip(w.iter_data()) {
        *s += *x * nf;
    }
}

fn divide(sum: &mut Weights, total: u64) {
    let t = total as f32;
    sum.iter_data_mut().for_each(|s| *s /= t);
}

fn weighted_mean(results: &[&FitRes]) -> Weights {
    let mut sum = results[0].weights.zeros_like();
    let mut total = 0u64;
    for r in results {
        add_weighted(&mut sum, &r.weights, r.num_examples);
        total += r.num_examples;
    }
    divide(&mut sum, total);
    sum
}

/// A rule over all of a round's replies at once.
pub trait RobustRule: Send {
    fn combine(&self, results: &[FitRes]) -> Weights;
}

/// Buffers the round's replies for a [`RobustRule`].
pub struct Buffered<R> {
    rule: R,
    replies: Vec<FitRes>,
}

impl<R: RobustRule> Buffered<R> {
    pub fn new(rule: R) -> Self {
        Self {
            rule,
            replies: Vec::new(),
        }
    }
}

impl<R: RobustRule> Aggregator for Buffered<R> {
    fn begin(&mut self, _: &Weights) {
        self.replies.clear();
    }

    fn add(&mut self, res: FitRes) {
        self.replies.push(res);
    }

    fn finish(&mut self) -> Option<Weights> {
        let replies = std::mem::take(&mut self.replies);
        (!replies.is_empty()).then(|| self.rule.combine(&replies))
    }
}

/// Applies `f` to every coordinate's column of values (one per reply, sorted ascending).
fn coordinatewise(results: &[FitRes], f: impl Fn(&[f32]) -> f32) -> Weights {
    let mut out = results[0].weights.clone();
    let mut col = vec![0f32; results.len()];
    for (ti, t) in out.tensors.iter_mut().enumerate() {
        for (j, v) in t.data.iter_mut().enumerate() {
            for (k, r) in results.iter().enumerate() {
                col[k] = r.weights.tensors[ti].data[j];
            }
            col.sort_by(f32::total_cmp);
            *v = f(&col);
        }
    }
    out
}

/// Coordinate-wise median (mean of the two middle values for an even count), as numpy's median.
pub struct Median;

impl RobustRule for Median {
    fn combine(&self, results: &[FitRes]) -> Weights {
        coordinatewise(results, |col| {
            let n = col.len();
            if n % 2 == 1 {
                col[n / 2]
            } else {
                (col[n / 2 - 1] + col[n / 2]) / 2.0
            }
        })
    }
}

/// Coordinate-wise trimmed mean cutting `floor(beta * n)` values from each end (scipy's trim_mean).
pub struct TrimmedMean {
    pub beta: f32,
}

impl RobustRule for TrimmedMean {
    fn combine(&self, results: &[FitRes]) -> Weights {
        let n = results.len();
        let cut = (self.beta as f64 * n as f64).floor() as usize;
        coordinatewise(results, |col| {
            let kept = &col[cut..n - cut];
            kept.iter().sum::<f32>() / kept.len() as f32
        })
    }
}

/// Krum: the reply whose `n - f - 2` nearest neighbours are closest (sum of squared distances);
/// Multi-Krum (`keep > 0`) averages the best `keep` by examples.
pub struct Krum {
    pub num_malicious_clients: usize,
    pub num_clients_to_keep: usize,
}

impl RobustRule for Krum {
    fn combine(&self, results: &[FitRes]) -> Weights {
        let n = results.len();
        let mut d = vec![vec![0f64; n]; n];
        for i in 0..n {
            for j in i + 1..n {
                let x = results[i].weights.dist2(&results[j].weights);
                d[i][j] = x;
                d[j][i] = x;
            }
        }
        let closest = n.saturating_sub(self.num_malicious_clients + 2).max(1);
        let scores: Vec<f64> = (0..n)
            .map(|i| {
                let mut row: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| d[i][j]).collect();
                row.sort_by(f64::total_cmp);
                row.iter().take(closest).sum()
            })
            .collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        if self.num_clients_to_keep > 0 {
            let best: Vec<&FitRes> = order
                .iter()
                .take(self.num_clients_to_keep.min(n))
                .map(|&i| &results[i])
                .collect();
            weighted_mean(&best)
        } else {
            results[order[0]].weights.clone()
        }
    }
}
