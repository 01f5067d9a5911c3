//! Server optimizers: how the aggregate moves the global model (Flower's FedOpt family). Each
//! sees the round's global weights and the aggregate; the pseudo-gradient is their difference.

use std::collections::BTreeMap;

use crate::{FlError, Weights};

/// One server update per round; `state`/`load_state` carry moments through checkpoints.
pub trait ServerOptimizer: Send {
    fn apply(&mut self, round: u64, current: Weights, aggregated: Weights) -> Weights;
    fn state(&self) -> BTreeMap<String, Weights> {
        BTreeMap::new()
    }
    fn load_state(&mut self, state: BTreeMap<String, Weights>) -> Result<(), FlError> {
        Moments::default().load(state)
    }
}

/// First and second moments (`m`, `v`), created at zero on first use.
#[derive(Default)]
pub struct Moments {
    m: Option<Weights>,
    v: Option<Weights>,
}

impl Moments {
    fn state(&self) -> BTreeMap<String, Weights> {
        let mut s = BTreeMap::new();
        if let Some(m) = &self.m {
            s.insert("m".into(), m.clone());
        }
        if let Some(v) = &self.v {
            s.insert("v".into(), v.clone());
        }
        s
    }

    fn load(&mut self, mut state: BTreeMap<String, Weights>) -> Result<(), FlError> {
        self.m = state.remove("m");
        self.v = state.remove("v");
        match state.keys().next() {
            Some(k) => Err(FlError::Config(format!("unexpected strategy state {k:?}"))),
            None => Ok(()),
        }
    }

    fn both(&mut self, like: &Weights) -> (&mut Weights, &mut Weights) {
        (
            self.m.get_or_insert_with(|| like.zeros_like()),
            self.v.get_or_insert_with(|| like.zeros_like()),
        )
    }
}

macro_rules! moments_state {
    () => {
        fn state(&self) -> BTreeMap<String, Weights> {
            self.moments.state()
        }
        fn load_state(&mut self, state: BTreeMap<String, Weights>) -> Result<(), FlError> {
            self.moments.load(state)
        }
    };
}

/// The aggregate becomes the global model (FedAvg, FedMedian, ...).
pub struct Replace;

impl ServerOptimizer for Replace {
    fn apply(&mut self, _: u64, _: Weights, aggregated: Weights) -> Weights {
        aggregated
    }
}

/// FedAvgM: server SGD with momentum on the pseudo-gradient `current - aggregated`.
pub struct AvgM {
    pub server_learning_rate: f32,
    pub server_momentum: f32,
    pub moments: Moments,
}

impl ServerOptimizer for AvgM {
    fn apply(&mut self, _: u64, current: Weights, aggregated: Weights) -> Weights {
        let (lr, mu) = (self.server_learning_rate, self.server_momentum);
        if lr == 1.0 && mu == 0.0 {
            return aggregated;
        }
        let mut new = current.clone();
        let m = self.moments.m.get_or_insert_with(|| current.zeros_like());
        for ((x, a), v) in new
            .iter_data_mut()
            .zip(aggregated.iter_data())
            .zip(m.iter_data_mut())
        {
            let g = *x - *a;
            *v = if mu > 0.0 { mu * *v + g } else { g };
            *x -= lr * *v;
        }
        new
    }
    moments_state!();
}

/// The adaptive FedOpt step both FedAdam and FedYogi take, `second(v, d)` the rule of the second
/// moment: `m = b1 m + (1 - b1) d`, `v = second(v, d)`, `x += step * m / (sqrt(v) + tau)`, with
/// the pseudo-gradient `d = aggregated - current`.
fn adaptive_step(
    moments: &mut Moments,
    current: Weights,
    aggregated: &Weights,
    (beta1, step, tau): (f32, f32, f32),
    second: impl Fn(f32, f32) -> f32,
) -> Weights {
    let mut new = current.clone();
    let (m, v) = moments.both(&current);
    for (((x, a), mi), vi) in new
        .iter_data_mut()
        .zip(aggregated.iter_data())
        .zip(m.iter_data_mut())
        .zip(v.iter_data_mut())
    {
        let d = *a - *x;
        *mi = beta1 * *mi + (1.0 - beta1) * d;
        *vi = second(*vi, d);
        *x += step * *mi / (vi.sqrt() + tau);
    }
    new
}

/// FedAdam with Flower's bias-corrected step size (Kingma & Ba's alpha_t, t = round + 1).
pub struct Adam {
    pub eta: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub tau: f32,
    pub moments: Moments,
}

impl ServerOptimizer for Adam {
    fn apply(&mut self, round: u64, current: Weights, aggregated: Weights) -> Weights {
        let (b1, b2) = (self.beta1, self.beta2);
        let t = round as f64 + 1.0;
        let eta_norm = (self.eta as f64 * (1.0 - (b2 as f64).powf(t)).sqrt()
            / (1.0 - (b1 as f64).powf(t))) as f32;
        let second = |v: f32, d: f32| b2 * v + (1.0 - b2) * d * d;
        let hyper = (b1, eta_norm, self.tau);
        adaptive_step(&mut self.moments, current, &aggregated, hyper, second)
    }
    moments_state!();
}

/// FedYogi: Adam's first moment, Yogi's additive second moment, no bias correction (Flower).
pub struct Yogi {
    pub eta: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub tau: f32,
    pub moments: Moments,
}

impl ServerOptimizer for Yogi {
    fn apply(&mut self, _: u64, current: Weights, aggregated: Weights) -> Weights {
        let b2 = self.beta2;
        let second = |v: f32, d: f32| {
            let d2 = d * d;
            v - (1.0 - b2) * d2 * sign(v - d2)
        };
        let hyper = (self.beta1, self.eta, self.tau);
        adaptive_step(&mut self.moments, current, &aggregated, hyper, second)
    }
    moments_state!();
}

/// FedAdagrad: accumulated squared pseudo-gradients.
pub struct Adagrad {
    pub eta: f32,
    pub tau: f32,
    pub moments: Moments,
}

impl ServerOptimizer for Adagrad {
    fn apply(&mut self, _: u64, current: Weights, aggregated: Weights) -> Weights {
        let mut new = current.clone();
        let v = self.moments.v.get_or_insert_with(|| current.zeros_like());
        for ((x, a), vi) in new
            .iter_data_mut()
            .zip(aggregated.iter_data())
            .zip(v.iter_data_mut())
        {
            let d = *a - *x;
            *vi += d * d;
            *x += self.eta * d / (vi.sqrt() + self.tau);
        }
        new
    }
    moments_state!();
}

/// numpy's sign: 0 at 0.
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}
