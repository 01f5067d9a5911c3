//! Shared by the stepped-round tests.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;

use fedhubert::{DistillServer, RoundServer};
use fedhubert_fl::{
    ClientInstructions, ClientPool, EvalRes, ExchangeKind, FitRes, Progress, Reply, RoundRecord,
    Upload, Weights,
};

/// Clients whose update depends on everything the server decides: the global weights, the
/// client, the round and the per-client seed. Client 2 always fails.
pub struct Fake {
    pub n: usize,
}

fn noise(seed: u64, i: usize) -> f32 {
    let z = fedhubert_io::seeds::mix(seed, &[i as u64]);
    (z % 2001) as f32 / 1000.0 - 1.0
}

impl ClientPool for Fake {
    fn num_clients(&self) -> usize {
        self.n
    }

    fn fit(
        &mut self,
        client: usize,
        global: &Weights,
        cfg: &ClientInstructions,
    ) -> Result<FitRes, String> {
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
        cfg: &ClientInstructions,
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
    /// Closes the open exchange: the round's record when that completed a round.
    fn close(&mut self) -> Option<RoundRecord>;
}

impl Stepped for RoundServer {
    fn rounds(&mut self) -> &mut RoundServer {
        self
    }
    fn close(&mut self) -> Option<RoundRecord> {
        match self.close_exchange().unwrap() {
            Progress::RoundDone(rec) => Some(rec),
            _ => None,
        }
    }
}

impl Stepped for DistillServer {
    fn rounds(&mut self) -> &mut RoundServer {
        &mut self.rounds
    }
    fn close(&mut self) -> Option<RoundRecord> {
        match self.close_exchange().unwrap().0 {
            Progress::RoundDone(rec) => Some(rec),
            _ => None,
        }
    }
}

/// Steps `s` through its exchanges as the ServerApp does (up to round `stop_after`), handing the
/// replies over in reverse client order: arrival order must not matter.
pub fn drive(s: &mut impl Stepped, pool: &mut Fake, stop_after: Option<u64>) {
    loop {
        if let (Some(round), Some(stop)) = (s.rounds().next_round(), stop_after)
            && round > stop
        {
            return;
        }
        let server = s.rounds();
        let Some(ex) = server.next_exchange().unwrap() else {
            return;
        };
        for (c, ins) in ex.clients.iter().rev() {
            let reply = match ex.kind {
                ExchangeKind::Fit => match pool.fit(*c, server.global(), ins) {
                    Ok(r) => Reply::Fit {
                        upload: Upload::Weights(r.weights),
                        num_examples: r.num_examples,
                        metrics: r.metrics,
                    },
                    Err(e) => Reply::Failed(e),
                },
                ExchangeKind::Evaluate => {
                    Reply::Evaluate(pool.evaluate(*c, server.global(), ins).unwrap())
                }
            };
            server.deliver(*c, reply).unwrap();
        }
        s.close();
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
