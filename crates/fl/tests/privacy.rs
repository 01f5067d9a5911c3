//! Client-level DP-FedAvg through the round engine: clipping, the fixed denominator and its
//! noise, adaptive clipping's direction, the ledger across a resume, `max_epsilon`, and the
//! settings it refuses.

use std::collections::BTreeMap;

use fedhubert_fl::privacy::accountant::Sampling;
use fedhubert_fl::privacy::{
    AdaptiveClipping, ClientPrivacy, DpFedAvg, DpPlan, NoiseSource, PrivacyConfig, PrivacyMode,
    UNCLIPPED,
};
use fedhubert_fl::store::load_checkpoint;
use fedhubert_fl::{
    ClientInstructions, ClientPool, EvalRes, FitRes, RunConfig, Strategy, StrategyConfig, Tensor,
    Weights, run,
};

const DIM: usize = 64;

fn model() -> Weights {
    Weights::new(vec![Tensor {
        name: "encoder.w".into(),
        shape: vec![DIM],
        data: vec![0.0; DIM],
    }])
}

/// Client c moves every weight by `step * (c + 1)`: update norms 8 * step * (c + 1).
struct Movers {
    n: usize,
    step: f32,
    /// What each client was told, by round.
    told: Vec<(u64, usize, Option<ClientPrivacy>)>,
    /// A client that always fails (a dropout).
    drop: Option<usize>,
}

impl ClientPool for Movers {
    fn num_clients(&self) -> usize {
        self.n
    }
    fn fit(&mut self, c: usize, g: &Weights, ins: &ClientInstructions) -> Result<FitRes, String> {
        self.told.push((ins.round, c, ins.privacy.clone()));
        if self.drop == Some(c) {
            return Err("dropped out".into());
        }
        let mut w = g.clone();
        w.iter_data_mut()
            .for_each(|x| *x += self.step * (c + 1) as f32);
        Ok(FitRes {
            client: c,
            weights: w,
            num_examples: 100 * (c as u64 + 1),
            metrics: BTreeMap::from([("loss".to_string(), c as f64)]),
        })
    }
    fn evaluate(
        &mut self,
        c: usize,
        _: &Weights,
        _: &ClientInstructions,
    ) -> Result<EvalRes, String> {
        Ok(EvalRes {
            client: c,
            num_examples: 1,
            metrics: BTreeMap::new(),
        })
    }
}

fn dp(mode: PrivacyMode, z: f64) -> PrivacyConfig {
    PrivacyConfig {
        mode,
        clipping_norm: 1.0,
        noise_multiplier: Some(z),
        sampling: Sampling::Fixed,
        noise: NoiseSource::Seeded,
        delta: 1e-3,
        ..Default::default()
    }
}

fn run_cfg(privacy: PrivacyConfig, rounds: u64) -> RunConfig {
    RunConfig {
        num_rounds: rounds,
        fraction_fit: 1.0,
        min_fit_clients: 1,
        fraction_evaluate: 0.0,
        privacy,
        ..Default::default()
    }
}

fn fedavg() -> Box<dyn Strategy> {
    StrategyConfig::FedAvg(Default::default()).build().unwrap()
}

fn movers(n: usize, step: f32) -> Movers {
    Movers {
        n,
        step,
        told: vec![],
        drop: None,
    }
}

#[test]
fn updates_are_clipped_and_averaged_over_the_planned_clients() {
    // Without noise (a vanishing z) the global moves by the mean of the clipped updates.
    let cfg = run_cfg(dp(PrivacyMode::Central, 1e-9), 1);
    let mut pool = movers(4, 1.0); // norms 8, 16, 24, 32: all clipped to 1
    let r = run(&mut pool, fedavg(), model(), &cfg, None, false, |_| {}).unwrap();
    // Each clipped update is (1/8) per coordinate: the mean over m = 4 as well.
    for x in r.weights.iter_data() {
        assert!((x - 0.125).abs() < 1e-6, "{x}");
    }
    let rec = &r.history[0];
    assert!(
        rec.train.is_empty(),
        "client metrics must not be published: {:?}",
        rec.train
    );
    let p = rec.privacy.as_ref().unwrap();
    assert_eq!((p.denominator, p.replied, p.clipping_norm), (4.0, 4, 1.0));
    assert!(
        pool.told
            .iter()
            .all(|(_, _, t)| t.as_ref().unwrap().clipping_norm == 1.0)
    );
}

#[test]
fn the_central_noise_has_the_planned_scale() {
    // Zero updates: the new global is the noise alone, std z C / m per coordinate.
    let z = 2.0;
    let cfg = run_cfg(dp(PrivacyMode::Central, z), 1);
    let n = 5;
    let mut m = model();
    m.tensors[0].data = vec![0.0; 20_000];
    m.tensors[0].shape = vec![20_000];
    let r = run(&mut movers(n, 0.0), fedavg(), m, &cfg, None, false, |_| {}).unwrap();
    let v: Vec<f64> = r.weights.iter_data().map(|&x| x as f64).collect();
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    let want = z * 1.0 / n as f64;
    assert!((std - want).abs() < 0.03 * want, "std {std}, want {want}");
    assert!(mean.abs() < 0.05 * want, "mean {mean}");
}

#[test]
fn a_dropout_keeps_the_planned_denominator() {
    let cfg = run_cfg(dp(PrivacyMode::Central, 1e-9), 1);
    let mut pool = movers(4, 1.0);
    pool.drop = Some(3);
    let r = run(&mut pool, fedavg(), model(), &cfg, None, false, |_| {}).unwrap();
    // Three clipped updates of 1/8 per coordinate over m = 4, not over the 3 that replied.
    for x in r.weights.iter_data() {
        assert!((x - 3.0 * 0.125 / 4.0).abs() < 1e-6, "{x}");
    }
    let p = r.history[0].privacy.as_ref().unwrap();
    assert_eq!((p.denominator, p.replied), (4.0, 3));
}

#[test]
fn seeded_runs_repeat_and_a_resume_continues_the_ledger_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = run_cfg(dp(PrivacyMode::Central, 1.0), 4);
    let whole = run(
        &mut movers(5, 0.01),
        fedavg(),
        model(),
        &cfg,
        None,
        false,
        |_| {},
    )
    .unwrap();
    let again = run(
        &mut movers(5, 0.01),
        fedavg(),
        model(),
        &cfg,
        None,
        false,
        |_| {},
    )
    .unwrap();
    assert_eq!(whole.weights, again.weights);

    let half = run_cfg(dp(PrivacyMode::Central, 1.0), 4);
    let mut pool = movers(5, 0.01);
    // Two rounds, then a crash (simulated by a second run that resumes).
    let mut two = half.clone();
    two.num_rounds = 4;
    let out = dir.path();
    let mut n = 0;
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(&mut pool, fedavg(), model(), &two, Some(out), false, |_| {
            n += 1;
            if n == 2 {
                panic!("killed after round 2");
            }
        })
    }));
    let ck = load_checkpoint(&out.join("checkpoint.safetensors")).unwrap();
    assert_eq!(ck.round, 2);
    assert!(ck.privacy.is_some(), "the ledger is in the checkpoint");
    let resumed = run(
        &mut movers(5, 0.01),
        fedavg(),
        model(),
        &half,
        Some(out),
        true,
        |_| {},
    )
    .unwrap();
    assert_eq!(resumed.weights, whole.weights);
    let eps = |h: &[fedhubert_fl::RoundRecord]| {
        h.iter()
            .map(|r| r.privacy.as_ref().unwrap().epsilon)
            .collect::<Vec<_>>()
    };
    assert_eq!(eps(&resumed.history), eps(&whole.history));
    assert!(eps(&whole.history).windows(2).all(|w| w[1] > w[0]));

    // Another privacy section, or none, cannot continue this run.
    let resume_error = |cfg: &RunConfig| {
        run(
            &mut movers(5, 0.01),
            fedavg(),
            model(),
            cfg,
            Some(out),
            true,
            |_| {},
        )
        .err()
        .unwrap()
        .to_string()
    };
    let e = resume_error(&run_cfg(dp(PrivacyMode::Central, 2.0), 4));
    assert!(e.contains("made with privacy"), "{e}");
    let e = resume_error(&run_cfg(PrivacyConfig::default(), 4));
    assert!(e.contains("privacy.mode none"), "{e}");
}

#[test]
fn max_epsilon_stops_the_run_before_the_round_that_would_pass_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = dp(PrivacyMode::Central, 1.0);
    // One round of z = 1, q = 1 is epsilon 3.2 at delta 1e-3; two are 4.9.
    p.max_epsilon = Some(4.0);
    let cfg = run_cfg(p, 5);
    let r = run(
        &mut movers(5, 0.01),
        fedavg(),
        model(),
        &cfg,
        Some(dir.path()),
        false,
        |_| {},
    )
    .unwrap();
    assert_eq!(r.history.len(), 1, "stopped after round 1");
    let eps = r.history[0].privacy.as_ref().unwrap().epsilon;
    assert!(eps <= 4.0, "{eps}");
    assert_eq!(
        load_checkpoint(&dir.path().join("checkpoint.safetensors"))
            .unwrap()
            .round,
        1
    );
}

/// One DP round by hand: every client's update has norm `norm`, the count noise is tiny.
fn clipping_norm_after(norm: f32, target: f64) -> f64 {
    let p = PrivacyConfig {
        adaptive_clipping: Some(AdaptiveClipping {
            target_quantile: target,
            learning_rate: 0.2,
            count_stddev: Some(1.0),
        }),
        ..dp(PrivacyMode::Central, 0.5)
    };
    let plan = DpPlan::new(&p, 10, 1.0, 1, 10).unwrap();
    let mut s = DpFedAvg::new(fedavg(), p, plan, 7).unwrap();
    let g = model();
    s.begin_round(1, &g).unwrap();
    for c in 0..10 {
        let mut w = g.clone();
        w.iter_data_mut()
            .for_each(|x| *x += norm / (DIM as f32).sqrt());
        let unclipped = f64::from(u8::from(norm <= 1.0));
        s.accumulate(FitRes {
            client: c,
            weights: w,
            num_examples: 1,
            metrics: BTreeMap::from([(UNCLIPPED.to_string(), unclipped)]),
        })
        .unwrap();
    }
    s.end_round().unwrap();
    s.privacy_record().unwrap().next_clipping_norm
}

#[test]
fn adaptive_clipping_raises_the_norm_when_updates_are_clipped() {
    // Every update clipped: the unclipped fraction is ~0 < the target, so C must grow
    // (Andrew et al. eq. 4; Flower's wrapper feeds the clipped fraction and would shrink it).
    let up = clipping_norm_after(5.0, 0.5);
    assert!(up > 1.05, "all clipped: C went 1 -> {up}");
    let down = clipping_norm_after(0.1, 0.5);
    assert!(down < 0.95, "none clipped: C went 1 -> {down}");
}

#[test]
fn settings_dp_cannot_honour_are_refused() {
    let p = dp(PrivacyMode::Central, 1.0);
    let median = StrategyConfig::from_name("fedmedian")
        .unwrap()
        .build()
        .unwrap();
    let plan = DpPlan::new(&p, 10, 1.0, 1, 10).unwrap();
    let e = DpFedAvg::new(median, p.clone(), plan, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("fedmedian") && e.contains("own update"), "{e}");
    let e = DpPlan::new(&dp(PrivacyMode::Central, 1.0), 1000, 1.0, 1, 10)
        .err()
        .unwrap();
    assert!(e.contains("privacy.delta"), "{e}");
    let both = PrivacyConfig {
        target_epsilon: Some(8.0),
        ..dp(PrivacyMode::Central, 1.0)
    };
    assert!(both.validate().unwrap_err().contains("give one"));
    let local_adaptive = PrivacyConfig {
        adaptive_clipping: Some(AdaptiveClipping::default()),
        ..dp(PrivacyMode::Local, 1.0)
    };
    assert!(
        local_adaptive
            .validate()
            .unwrap_err()
            .contains("adaptive_clipping")
    );
    // Solved noise: the planned rounds spend the target.
    let solved = PrivacyConfig {
        noise_multiplier: None,
        target_epsilon: Some(2.0),
        ..dp(PrivacyMode::Central, 1.0)
    };
    let plan = DpPlan::new(&solved, 10, 0.5, 1, 20).unwrap();
    assert!(plan.noise_multiplier > 1.0, "{plan:?}");
}

#[test]
fn local_dp_noises_each_update_on_the_client() {
    let cfg = run_cfg(dp(PrivacyMode::Local, 1.0), 1);
    let mut pool = movers(3, 0.0);
    let r = run(&mut pool, fedavg(), model(), &cfg, None, false, |_| {}).unwrap();
    for (_, _, t) in &pool.told {
        let t = t.as_ref().unwrap();
        assert_eq!(t.local_noise_std, Some(1.0));
    }
    // Zero updates plus each client's N(0, 1): the mean of 3 has std 1/sqrt(3) per coordinate.
    let v: Vec<f64> = r.weights.iter_data().map(|&x| x as f64).collect();
    let std = (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt();
    assert!((0.35..0.85).contains(&std), "std {std}");
}
