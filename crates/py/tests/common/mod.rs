//! Shared by the stepped-round tests.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;

use fedhubert::{DistillServer, RoundServer, Upload};
use fedhubert_fl::{ClientPool, EvalRes, FitConfig, FitRes, Weights};

/// Clients whose update depends on everything the server decides: the global weights, the
/// client, the round and the per-client seed. Client 2 always fails.
pub struct Fake {
    pub n: usize,
}

fn noise(seed: u64, i: usize) -> f32 {
    let z = fedhubert_fl::rounds::mix(seed, &[i as u64]);
    (z % 2001) as f32 / 1000.0 - 1.0
}

impl ClientPool for Fake {
    fn num_clients(&self) -> usize {
        self.n
    }

    fn fit(&mut self, client: usize, global: &Weights, cfg: &FitConfig) -> Result<FitRes, String> {
        if client == 2 {
            return Err("disk full".into());
        }
        let mut w = global.clone();
        for (i, v) in w.iter_data_mut().enumerate().step_by(7) {
            *v += 1e-3 * noise(cfg.seed, i);
        }
        let mut metrics = BTreeMap::new();
        metrics.insert("loss".into(), (cfg.seed % 1000) as f64 / 100.0);
        Ok(FitRes {
            client,
            weights: w,
            num_examples: client as u64 + 1,
            metrics,
        })
    }

    fn evaluate(
        &mut self,
        client: usize,
        global: &Weights,
        cfg: &FitConfig,
    ) -> Result<EvalRes, String> {
        let mut metrics = BTreeMap::new();
        let s: f64 = global.iter_data().take(1000).map(|&v| v as f64).sum();
        metrics.insert("loss".into(), s + (cfg.seed % 17) as f64);
        Ok(EvalRes {
            client,
            num_examples: 3,
            metrics,
        })
    }
}

/// A round loop whose rounds the tests step through.
pub trait Stepped {
    fn rounds(&mut self) -> &mut RoundServer;
    fn finish(&mut self, evals: Vec<EvalRes>);
}

impl Stepped for RoundServer {
    fn rounds(&mut self) -> &mut RoundServer {
        self
    }
    fn finish(&mut self, evals: Vec<EvalRes>) {
        self.finish_round(evals).unwrap();
    }
}

impl Stepped for DistillServer {
    fn rounds(&mut self) -> &mut RoundServer {
        &mut self.rounds
    }
    fn finish(&mut self, evals: Vec<EvalRes>) {
        self.finish_round(evals).unwrap();
    }
}

/// Steps `s` through its rounds as the ServerApp does (up to round `stop_after`).
pub fn drive(s: &mut impl Stepped, pool: &mut Fake, stop_after: Option<u64>) {
    while let Some(round) = s.rounds().next_round() {
        if stop_after.is_some_and(|s| round > s) {
            return;
        }
        let server = s.rounds();
        loop {
            let plan = server.begin_attempt().unwrap();
            // Replies computed in reverse (arrival order differs), handed over in client order.
            let mut replies: Vec<_> = plan
                .iter()
                .rev()
                .map(|(c, cfg)| (*c, pool.fit(*c, &server.global, cfg)))
                .collect();
            replies.sort_by_key(|(c, _)| *c);
            for (c, r) in replies {
                match r {
                    Ok(r) => server
                        .accumulate(c, Upload::Weights(r.weights), r.num_examples, r.metrics)
                        .unwrap(),
                    Err(e) => server.fail(c, e).unwrap(),
                }
            }
            if server.end_attempt().unwrap() {
                break;
            }
        }
        let evals = server
            .eval_plan()
            .into_iter()
            .map(|(c, cfg)| pool.evaluate(c, &server.global, &cfg).unwrap())
            .collect();
        s.finish(evals);
    }
}

/// Exact, except metric values: a resumed history comes back through the checkpoint's JSON, whose
/// float parsing (serde_json without `float_roundtrip`) may move the last bit.
pub fn same_history(a: &[fedhubert_fl::RoundRecord], b: &[fedhubert_fl::RoundRecord]) {
    assert_eq!(a.len(), b.len());
    let close = |x: &BTreeMap<String, f64>, y: &BTreeMap<String, f64>| {
        x.len() == y.len()
            && x.iter()
                .zip(y)
                .all(|((k, u), (l, v))| k == l && (u - v).abs() <= 1e-12 * u.abs().max(1.0))
    };
    for (x, y) in a.iter().zip(b) {
        let strip = |r: &fedhubert_fl::RoundRecord| fedhubert_fl::RoundRecord {
            round_time_s: 0.0,
            train: BTreeMap::new(),
            eval: BTreeMap::new(),
            ..r.clone()
        };
        assert_eq!(strip(x), strip(y), "round {}", x.round);
        assert!(
            close(&x.train, &y.train) && close(&x.eval, &y.eval),
            "round {}: {x:?} vs {y:?}",
            x.round
        );
    }
}
