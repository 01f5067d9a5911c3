//! Orchestration: sampling, failures and stragglers, traffic, compression, exact resume, 100 clients.

use std::collections::BTreeMap;

use fedhubert_fl::rounds::sample_clients;
use fedhubert_fl::store::load_checkpoint;
use fedhubert_fl::{
    ClientInstructions, ClientPool, Compression, EvalRes, FitRes, FlError, RunConfig,
    StrategyConfig, Tensor, UploadPlan, Weights, run,
};
use rand::{Rng, SeedableRng};

/// Client c pulls the weights towards its own target c (a non-IID toy problem) with seeded noise,
/// so every call's result depends on the round config exactly as real local training does.
struct Toy {
    n: usize,
    fail: Vec<usize>,
    slow: Vec<usize>,
    panic: Vec<usize>,
}

/// Toy clients of which some misbehave every round, and a server that dies in `die_in_round`
/// after aggregating it but before its checkpoint (the server-side evaluation fails).
struct Faulty {
    toy: Toy,
    nan: Vec<usize>,
    die_in_round: Option<u64>,
}

impl ClientPool for Faulty {
    fn num_clients(&self) -> usize {
        self.toy.n
    }
    fn fit(&mut self, c: usize, g: &Weights, cfg: &ClientInstructions) -> Result<FitRes, String> {
        let mut r = self.toy.fit(c, g, cfg)?;
        if self.nan.contains(&c) {
            r.weights.iter_data_mut().for_each(|x| *x = f32::NAN);
            r.metrics.insert("loss".into(), f64::NAN);
        }
        Ok(r)
    }
    fn evaluate(
        &mut self,
        c: usize,
        g: &Weights,
        cfg: &ClientInstructions,
    ) -> Result<EvalRes, String> {
        self.toy.evaluate(c, g, cfg)
    }
    fn evaluate_global(
        &mut self,
        round: u64,
        _global: &Weights,
    ) -> Option<Result<BTreeMap<String, f64>, String>> {
        (self.die_in_round == Some(round)).then(|| Err("the server was killed".into()))
    }
}

fn model(dim: usize) -> Weights {
    Weights::new(vec![
        Tensor {
            name: "feature_extractor.w".into(),
            shape: vec![dim],
            data: vec![0.0; dim],
        },
        Tensor {
            name: "encoder.w".into(),
            shape: vec![2, dim],
            data: vec![0.5; 2 * dim],
        },
    ])
}

impl ClientPool for Toy {
    fn num_clients(&self) -> usize {
        self.n
    }
    fn fit(&mut self, c: usize, g: &Weights, cfg: &ClientInstructions) -> Result<FitRes, String> {
        if self.fail.contains(&c) {
            return Err(format!("client {c} lost its disk"));
        }
        if self.panic.contains(&c) {
            panic!("client {c} crashed");
        }
        if self.slow.contains(&c) {
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut w = g.clone();
        let lr = 0.5f32;
        for x in w.iter_data_mut() {
            *x +=
                lr * (c as f32 - *x) + 0.01 * rng.random::<f32>() - cfg.settings.proximal_mu * 0.0;
        }
        let mut m = BTreeMap::new();
        m.insert(
            "loss".into(),
            g.iter_data()
                .map(|x| (x - c as f32).powi(2) as f64)
                .sum::<f64>(),
        );
        Ok(FitRes {
            client: c,
            weights: w,
            num_examples: (c + 1) as u64,
            metrics: m,
        })
    }
    fn evaluate(
        &mut self,
        c: usize,
        g: &Weights,
        _cfg: &ClientInstructions,
    ) -> Result<EvalRes, String> {
        let mut m = BTreeMap::new();
        m.insert(
            "loss".into(),
            g.iter_data()
                .map(|x| (x - c as f32).powi(2) as f64)
                .sum::<f64>(),
        );
        Ok(EvalRes {
            client: c,
            num_examples: 1,
            metrics: m,
        })
    }
}

fn fedavg() -> Box<dyn fedhubert_fl::Strategy> {
    StrategyConfig::FedAvg(Default::default()).build().unwrap()
}

fn toy(n: usize) -> Toy {
    Toy {
        n,
        fail: vec![],
        slow: vec![],
        panic: vec![],
    }
}

fn cfg(rounds: u64) -> RunConfig {
    RunConfig {
        num_rounds: rounds,
        fraction_fit: 0.5,
        min_fit_clients: 2,
        seed: 42,
        ..Default::default()
    }
}

#[test]
fn sampling_follows_flower_rule_and_is_seeded() {
    assert_eq!(sample_clients(10, 0.3, 2, 1, 1, 0).len(), 3);
    assert_eq!(
        sample_clients(10, 0.05, 2, 1, 1, 0).len(),
        2,
        "at least min_fit_clients"
    );
    assert_eq!(
        sample_clients(10, 0.3, 2, 1, 1, 0),
        sample_clients(10, 0.3, 2, 1, 1, 0)
    );
    assert_ne!(
        sample_clients(100, 0.1, 2, 1, 1, 0),
        sample_clients(100, 0.1, 2, 1, 2, 0)
    );
}

#[test]
fn resume_after_round_k_is_bit_exact() {
    let strategy = StrategyConfig::from_name("fedadam").unwrap();
    let full_dir = tempfile::tempdir().unwrap();
    let s = strategy.build().unwrap();
    let full = run(
        &mut toy(6),
        s,
        model(8),
        &cfg(5),
        Some(full_dir.path()),
        false,
        |_| {},
    )
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let s = strategy.build().unwrap();
    run(
        &mut toy(6),
        s,
        model(8),
        &cfg(2),
        Some(dir.path()),
        false,
        |_| {},
    )
    .unwrap();
    assert_eq!(
        load_checkpoint(&dir.path().join("checkpoint.safetensors"))
            .unwrap()
            .round,
        2
    );
    // A fresh process: new strategy object (empty moments), resumed from the checkpoint.
    let s = strategy.build().unwrap();
    let resumed = run(
        &mut toy(6),
        s,
        model(8),
        &cfg(5),
        Some(dir.path()),
        true,
        |_| {},
    )
    .unwrap();
    let bits = |w: &Weights| w.iter_data().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&full.weights),
        bits(&resumed.weights),
        "resumed run must end with identical weights"
    );
    assert_eq!(resumed.history.len(), 5);
    for (a, b) in full.history.iter().zip(&resumed.history) {
        assert_eq!(
            (a.round, &a.participated, &a.train, a.bytes_up),
            (b.round, &b.participated, &b.train, b.bytes_up)
        );
    }
    let lines = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 5);

    // Resuming under another strategy is refused with a clear message.
    let other = StrategyConfig::FedAvg(Default::default()).build().unwrap();
    let e = run(
        &mut toy(6),
        other,
        model(8),
        &cfg(6),
        Some(dir.path()),
        true,
        |_| {},
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("strategy"), "{e}");
}

#[test]
fn failures_and_stragglers_are_counted_and_excluded() {
    let mut pool = Toy {
        n: 6,
        fail: vec![1],
        slow: vec![2],
        panic: vec![3],
    };
    let c = RunConfig {
        num_rounds: 1,
        fraction_fit: 1.0,
        min_fit_clients: 2,
        round_timeout_s: Some(0.2),
        ..Default::default()
    };
    let s = StrategyConfig::FedAvg(Default::default()).build().unwrap();
    let r = run(&mut pool, s, model(4), &c, None, false, |_| {}).unwrap();
    let rec = &r.history[0];
    assert_eq!(rec.participated, vec![0, 4, 5]);
    let failed: Vec<usize> = rec.failures.iter().map(|f| f.client).collect();
    assert_eq!(failed, vec![1, 2, 3]);
    assert!(rec.failures[0].why.contains("lost its disk"));
    assert!(rec.failures[1].why.contains("deadline"));
    assert!(rec.failures[2].why.contains("crashed"));
    // FedAvg of clients 0, 4, 5 only (examples 1, 5, 6): the encoder weights move towards 4.4ish.
    let mean = r.weights.tensors[1].data[0];
    let expect = (1.0 * (0.5 + 0.5 * (0.0 - 0.5))
        + 5.0 * (0.5 + 0.5 * (4.0 - 0.5))
        + 6.0 * (0.5 + 0.5 * (5.0 - 0.5)))
        / 12.0;
    assert!((mean - expect).abs() < 0.02, "{mean} vs {expect}");
    assert_eq!(rec.client_bytes[&1].1, 0, "a failed client sent nothing");
}

#[test]
fn too_few_replies_retries_then_stops_keeping_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let c = RunConfig {
        num_rounds: 1,
        fraction_fit: 1.0,
        min_fit_clients: 3,
        ..Default::default()
    };
    run(
        &mut toy(4),
        fedavg(),
        model(4),
        &c,
        Some(dir.path()),
        false,
        |_| {},
    )
    .unwrap();
    let mut pool = Toy {
        n: 4,
        fail: vec![0, 1],
        slow: vec![],
        panic: vec![],
    };
    let c2 = RunConfig {
        num_rounds: 2,
        max_round_retries: 1,
        ..c
    };
    let e = run(
        &mut pool,
        fedavg(),
        model(4),
        &c2,
        Some(dir.path()),
        true,
        |_| {},
    )
    .err()
    .unwrap();
    assert!(
        matches!(
            e,
            FlError::RoundFailed {
                round: 2,
                attempts: 2,
                got: 2,
                needed: 3,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("--resume"));
    assert_eq!(
        load_checkpoint(&dir.path().join("checkpoint.safetensors"))
            .unwrap()
            .round,
        1,
        "last good round kept"
    );
    // With failures not accepted, any failure triggers a retry even above min_fit_clients.
    let mut pool = Toy {
        n: 4,
        fail: vec![0],
        slow: vec![],
        panic: vec![],
    };
    let c3 = RunConfig {
        num_rounds: 1,
        fraction_fit: 1.0,
        min_fit_clients: 1,
        accept_failures: false,
        max_round_retries: 0,
        ..Default::default()
    };
    assert!(run(&mut pool, fedavg(), model(4), &c3, None, false, |_| {}).is_err());
}

#[test]
fn traffic_compression_and_frozen_front_end() {
    let dim = 1000;
    let go = |comp: Compression, frozen: Vec<String>| {
        let c = RunConfig {
            num_rounds: 2,
            fraction_fit: 1.0,
            min_fit_clients: 1,
            upload: UploadPlan {
                compression: comp,
                frozen_prefixes: frozen,
            },
            eval_every: 0,
            ..Default::default()
        };
        let s = StrategyConfig::FedAvg(Default::default()).build().unwrap();
        run(&mut toy(3), s, model(dim), &c, None, false, |_| {}).unwrap()
    };
    let full = go(Compression::None, vec![]);
    let r1 = &full.history[0];
    assert_eq!(r1.bytes_down, 3 * 3 * dim as u64 * 4);
    assert_eq!(r1.bytes_up, 3 * 3 * dim as u64 * 4);
    let f16 = go(Compression::F16, vec![]);
    assert_eq!(f16.history[0].bytes_up, r1.bytes_up / 2);
    let i8 = go(Compression::Int8, vec![]);
    assert_eq!(i8.history[0].bytes_up, 3 * (3 * dim as u64 + 2 * 4));
    let err = |a: &Weights, b: &Weights| {
        a.iter_data()
            .zip(b.iter_data())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(
        err(&full.weights, &f16.weights) < 1e-2,
        "{}",
        err(&full.weights, &f16.weights)
    );
    assert!(
        err(&full.weights, &i8.weights) < 5e-2,
        "{}",
        err(&full.weights, &i8.weights)
    );
    let frozen = go(Compression::None, vec!["feature_extractor.".into()]);
    assert_eq!(
        frozen.history[0].bytes_up,
        3 * 2 * dim as u64 * 4,
        "frozen tensors are not sent back"
    );
    assert_eq!(
        frozen.history[0].bytes_down,
        3 * 3 * dim as u64 * 4,
        "first contact syncs the frozen part once"
    );
    assert_eq!(frozen.history[1].bytes_down, 3 * 2 * dim as u64 * 4);
    assert!(
        frozen.weights.tensors[0].data.iter().all(|&x| x == 0.0),
        "frozen tensors are not aggregated"
    );
}

#[test]
fn hundred_clients_loss_falls_and_eval_is_weighted() {
    let c = RunConfig {
        num_rounds: 5,
        fraction_fit: 0.1,
        min_fit_clients: 2,
        fraction_evaluate: 0.2,
        eval_every: 2,
        ..Default::default()
    };
    let s = StrategyConfig::FedAvg(Default::default()).build().unwrap();
    let r = run(&mut toy(100), s, model(16), &c, None, false, |_| {}).unwrap();
    assert!(r.history.iter().all(|h| h.participated.len() == 10));
    assert!(
        r.history[0].eval.is_empty()
            && !r.history[1].eval.is_empty()
            && !r.history[4].eval.is_empty()
    );
    assert!(r.history[4].eval["loss"] < r.history[1].eval["loss"] * 1.5);
    assert!(r.history[4].train["loss"] < r.history[0].train["loss"]);
}

#[test]
fn engine_accepts_replies_in_any_order_and_matches_run() {
    // The native runner replies in client order; a driver handing replies over in reverse order
    // (as they may arrive over the network) must make the same run.
    let c = RunConfig {
        num_rounds: 3,
        fraction_fit: 0.6,
        min_fit_clients: 2,
        seed: 9,
        ..Default::default()
    };
    let want = run(&mut toy(6), fedavg(), model(3), &c, None, false, |_| {}).unwrap();
    let mut pool = toy(6);
    let mut e = fedhubert_fl::RoundEngine::new(c.clone(), fedavg(), model(3), 6).unwrap();
    while let Some(ex) = e.next_exchange().unwrap() {
        for (client, ins) in ex.clients.iter().rev() {
            let reply = match ex.kind {
                fedhubert_fl::ExchangeKind::Fit => {
                    let r = pool.fit(*client, e.global(), ins).unwrap();
                    fedhubert_fl::Reply::Fit {
                        upload: fedhubert_fl::prepare_upload(&r.weights, e.global(), &ins.upload)
                            .unwrap(),
                        num_examples: r.num_examples,
                        metrics: r.metrics,
                    }
                }
                fedhubert_fl::ExchangeKind::Evaluate => {
                    fedhubert_fl::Reply::Evaluate(pool.evaluate(*client, e.global(), ins).unwrap())
                }
            };
            e.deliver(*client, reply).unwrap();
        }
        e.close_exchange().unwrap();
    }
    assert_eq!(*e.global(), want.weights);
    let strip = |h: &[fedhubert_fl::RoundRecord]| {
        h.iter()
            .map(|r| fedhubert_fl::RoundRecord {
                round_time_s: 0.0,
                ..r.clone()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(e.history()), strip(&want.history));
}

#[test]
fn engine_refuses_repeated_misplaced_and_unsampled_replies() {
    use fedhubert_fl::{Reply, RoundEngine, Upload};
    let c = RunConfig {
        num_rounds: 1,
        fraction_fit: 0.5,
        min_fit_clients: 2,
        seed: 3,
        ..Default::default()
    };
    let mut e = RoundEngine::new(c, fedavg(), model(2), 4).unwrap();
    let ex = e.next_exchange().unwrap().unwrap();
    let first = ex.clients[0].0;
    let other = (0..4)
        .find(|k| ex.clients.iter().all(|(c, _)| c != k))
        .unwrap();
    let fit = |w: &Weights| Reply::Fit {
        upload: Upload::Weights(w.clone()),
        num_examples: 1,
        metrics: BTreeMap::new(),
    };
    let g = e.global().clone();
    let msg = |r: Result<(), FlError>| r.unwrap_err().to_string();
    assert!(msg(e.deliver(other, fit(&g))).contains("not sampled"));
    let eval = Reply::Evaluate(EvalRes {
        client: first,
        num_examples: 1,
        metrics: BTreeMap::new(),
    });
    assert!(msg(e.deliver(first, eval)).contains("evaluation reply"));
    e.deliver(first, fit(&g)).unwrap();
    // The first client's reply is aggregated at once; a second one is still refused.
    assert!(msg(e.deliver(first, fit(&g))).contains("replied twice"));
    assert!(
        e.checkpoint().is_err(),
        "no checkpoint in the middle of a round"
    );
    e.close_exchange().unwrap();
}

#[test]
fn misbehaving_clients_and_a_killed_server_leave_the_run_exact() {
    let faulty = |die_in_round| Faulty {
        toy: Toy {
            n: 6,
            fail: vec![1],
            slow: vec![2],
            panic: vec![3],
        },
        nan: vec![4],
        die_in_round,
    };
    let c = RunConfig {
        num_rounds: 3,
        fraction_fit: 1.0,
        min_fit_clients: 2,
        round_timeout_s: Some(0.2),
        ..Default::default()
    };
    let whole = tempfile::tempdir().unwrap();
    let want = run(
        &mut faulty(None),
        fedavg(),
        model(4),
        &c,
        Some(whole.path()),
        false,
        |_| {},
    )
    .unwrap();
    for rec in &want.history {
        // Only the well-behaved clients 0 and 5 reach the aggregate and the round's figures.
        assert_eq!(rec.participated, vec![0, 5], "round {}", rec.round);
        let failed: Vec<usize> = rec.failures.iter().map(|f| f.client).collect();
        assert_eq!(failed, vec![1, 2, 3, 4]);
        assert!(rec.failures[3].why.contains("NaN"), "{:?}", rec.failures[3]);
        assert_eq!(rec.num_examples, 1 + 6);
        assert!(rec.train["loss"].is_finite());
    }
    assert!(want.weights.iter_data().all(|x| x.is_finite()));
    // The server dies in round 3 after aggregating it; the checkpoint is round 2's.
    let dir = tempfile::tempdir().unwrap();
    let e = run(
        &mut faulty(Some(3)),
        fedavg(),
        model(4),
        &c,
        Some(dir.path()),
        false,
        |_| {},
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("killed"), "{e}");
    assert_eq!(
        load_checkpoint(&dir.path().join("checkpoint.safetensors"))
            .unwrap()
            .round,
        2
    );
    let got = run(
        &mut faulty(None),
        fedavg(),
        model(4),
        &c,
        Some(dir.path()),
        true,
        |_| {},
    )
    .unwrap();
    assert!(
        got.weights == want.weights,
        "the resumed run differs from the uninterrupted one"
    );
    // Each round's record too, less its wall-clock figures (times, the straggler's lateness).
    let key = |r: &fedhubert_fl::RoundRecord| {
        let failed: Vec<usize> = r.failures.iter().map(|f| f.client).collect();
        (
            r.round,
            r.participated.clone(),
            failed,
            r.train.clone(),
            r.num_examples,
        )
    };
    let (a, b): (Vec<_>, Vec<_>) = (
        got.history.iter().map(key).collect(),
        want.history.iter().map(key).collect(),
    );
    assert_eq!(a, b);
}
