//! Each strategy against values computed by hand from Flower's formulas.

use std::collections::BTreeMap;

use fedhubert_fl::strategy::{FedAdam, FedAvgM, FedTrimmedAvg, Krum};
use fedhubert_fl::{FitRes, StrategyConfig, Tensor, Weights};

fn w(v: &[f32]) -> Weights {
    Weights::new(vec![Tensor {
        name: "p".into(),
        shape: vec![v.len()],
        data: v.to_vec(),
    }])
}

fn res(c: usize, v: &[f32], n: u64) -> FitRes {
    FitRes {
        client: c,
        weights: w(v),
        num_examples: n,
        metrics: BTreeMap::new(),
    }
}

fn round(
    cfg: &StrategyConfig,
    s: &mut Box<dyn fedhubert_fl::Strategy>,
    r: u64,
    cur: &[f32],
    replies: Vec<FitRes>,
) -> Vec<f32> {
    let _ = cfg;
    s.begin_round(r, &w(cur)).unwrap();
    for x in replies {
        s.accumulate(x).unwrap();
    }
    s.end_round().unwrap().tensors[0].data.clone()
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
    }
}

#[test]
fn fedavg_weights_by_examples() {
    let c = StrategyConfig::FedAvg(Default::default());
    let mut s = c.build().unwrap();
    // (1*1 + 3*3)/4 = 2.5, (2*1 + 6*3)/4 = 5
    let out = round(
        &c,
        &mut s,
        1,
        &[0.0, 0.0],
        vec![res(0, &[1.0, 2.0], 1), res(1, &[3.0, 6.0], 3)],
    );
    assert_eq!(out, vec![2.5, 5.0]);
}

#[test]
fn fedprox_is_a_client_setting_not_a_strategy() {
    // FedProx aggregates as FedAvg; its mu travels to clients in their instructions (run files
    // still accept `strategy: FedProx`, parsed into FedAvg plus the client setting).
    let e = StrategyConfig::from_name("fedprox")
        .unwrap_err()
        .to_string();
    assert!(e.contains("fedavg"), "{e}");
}

#[test]
fn fedavgm_momentum() {
    let c = StrategyConfig::FedAvgM(FedAvgM {
        server_learning_rate: 1.0,
        server_momentum: 0.9,
    });
    let mut s = c.build().unwrap();
    // Round 1: g = 0 - 1 = -1, v = -1, x = 0 + 1 = 1.
    assert_eq!(
        round(&c, &mut s, 1, &[0.0], vec![res(0, &[1.0], 1)]),
        vec![1.0]
    );
    // Round 2: g = 1 - 3 = -2, v = 0.9 * -1 - 2 = -2.9, x = 1 + 2.9 = 3.9.
    close(
        &round(&c, &mut s, 2, &[1.0], vec![res(0, &[3.0], 1)]),
        &[3.9],
        1e-6,
    );
}

#[test]
fn fedadam_bias_corrected_step() {
    let c = StrategyConfig::from_name("fedadam").unwrap();
    assert_eq!(
        c,
        StrategyConfig::FedAdam(FedAdam {
            eta: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3
        })
    );
    let mut s = c.build().unwrap();
    // delta = 1; m = 0.1; v = 0.01; eta_norm = 0.1*sqrt(1-0.99^2)/(1-0.9^2) = 0.0742460;
    // x = 0.0742460 * 0.1 / (0.1 + 0.001) = 0.0735109
    close(
        &round(&c, &mut s, 1, &[0.0], vec![res(0, &[1.0], 1)]),
        &[0.0735109],
        1e-6,
    );
    // Round 2 from x=0 again with delta=1: m = 0.19, v = 0.0199, t = 3:
    // eta_norm = 0.1*sqrt(0.029701)/0.271 = 0.0635941; x = 0.0635941*0.19/(0.1410674+0.001) = 0.0850502
    close(
        &round(&c, &mut s, 2, &[0.0], vec![res(0, &[1.0], 1)]),
        &[0.0850502],
        1e-6,
    );
    let st = s.state();
    close(&st["m"].tensors[0].data, &[0.19], 1e-7);
    close(&st["v"].tensors[0].data, &[0.0199], 1e-7);
}

#[test]
fn fedyogi_sign_update() {
    let c = StrategyConfig::from_name("fedyogi").unwrap();
    let mut s = c.build().unwrap();
    // m = 0.1; v = 0 - 0.01*1*sign(0-1) = 0.01; x = 0.01*0.1/(0.1+0.001) = 0.00990099
    close(
        &round(&c, &mut s, 1, &[0.0], vec![res(0, &[1.0], 1)]),
        &[0.00990099],
        1e-7,
    );
    // Round 2, delta = 0.5 from x=0: m = 0.09+0.05 = 0.14; v = 0.01 - 0.01*0.25*sign(0.01-0.25) = 0.0125;
    // x = 0.01*0.14/(0.1118034+0.001) = 0.0124108
    close(
        &round(&c, &mut s, 2, &[0.0], vec![res(0, &[0.5], 1)]),
        &[0.0124108],
        1e-6,
    );
}

#[test]
fn fedadagrad_accumulates_squares() {
    let c = StrategyConfig::from_name("fedadagrad").unwrap();
    let mut s = c.build().unwrap();
    // v = 1; x = 0.1*1/(1+0.001) = 0.0999001
    close(
        &round(&c, &mut s, 1, &[0.0], vec![res(0, &[1.0], 1)]),
        &[0.0999001],
        1e-7,
    );
    // delta = 2 from x=0: v = 1 + 4 = 5; x = 0.1*2/(2.2360680+0.001) = 0.0894027
    close(
        &round(&c, &mut s, 2, &[0.0], vec![res(0, &[2.0], 1)]),
        &[0.0894027],
        1e-6,
    );
}

#[test]
fn fedmedian_coordinatewise() {
    let c = StrategyConfig::FedMedian(Default::default());
    let mut s = c.build().unwrap();
    let out = round(
        &c,
        &mut s,
        1,
        &[0.0, 0.0],
        vec![
            res(0, &[1.0, 4.0], 1),
            res(1, &[5.0, 1.0], 100),
            res(2, &[3.0, 2.0], 1),
        ],
    );
    assert_eq!(out, vec![3.0, 2.0], "median ignores example counts");
    let out = round(
        &c,
        &mut s,
        2,
        &[0.0],
        vec![
            res(0, &[1.0], 1),
            res(1, &[2.0], 1),
            res(2, &[3.0], 1),
            res(3, &[10.0], 1),
        ],
    );
    assert_eq!(out, vec![2.5]);
}

#[test]
fn fedtrimmedavg_cuts_both_ends() {
    let c = StrategyConfig::FedTrimmedAvg(FedTrimmedAvg { trim_beta: 0.2 });
    let mut s = c.build().unwrap();
    // 5 replies, cut floor(0.2*5) = 1 from each end: mean(2,3,4) = 3.
    let r = [1.0, 100.0, 3.0, 2.0, 4.0]
        .iter()
        .enumerate()
        .map(|(i, &v)| res(i, &[v], 1))
        .collect();
    assert_eq!(round(&c, &mut s, 1, &[0.0], r), vec![3.0]);
}

#[test]
fn krum_rejects_the_outlier() {
    let c = StrategyConfig::Krum(Krum {
        num_malicious_clients: 1,
        num_clients_to_keep: 0,
    });
    let mut s = c.build().unwrap();
    let vals = [0.0, 0.1, -0.1, 0.2, 10.0];
    // Scores (sum of the n-f-2 = 2 smallest squared distances): 0.02, 0.02, 0.05, 0.05, 96.04+...
    let r = vals
        .iter()
        .enumerate()
        .map(|(i, &v)| res(i, &[v], 1))
        .collect();
    assert_eq!(round(&c, &mut s, 1, &[0.0], r), vec![0.0]);
    let c = StrategyConfig::Krum(Krum {
        num_malicious_clients: 1,
        num_clients_to_keep: 2,
    });
    let mut s = c.build().unwrap();
    let r = vals
        .iter()
        .enumerate()
        .map(|(i, &v)| res(i, &[v], 1))
        .collect();
    close(&round(&c, &mut s, 1, &[0.0], r), &[0.05], 1e-7);
}

#[test]
fn bad_replies_and_configs_are_errors() {
    let mut s = StrategyConfig::FedAvg(Default::default()).build().unwrap();
    s.begin_round(1, &w(&[0.0, 0.0])).unwrap();
    assert!(s.accumulate(res(0, &[1.0], 1)).is_err(), "wrong shape");
    assert!(
        s.accumulate(res(0, &[f32::NAN, 1.0], 1))
            .unwrap_err()
            .to_string()
            .contains("NaN")
    );
    assert!(s.end_round().is_err(), "no results");
    assert!(
        StrategyConfig::from_name("fedfoo")
            .unwrap_err()
            .to_string()
            .contains("fedavg")
    );
    assert!(
        StrategyConfig::FedAdam(FedAdam {
            eta: 0.1,
            beta1: 1.5,
            beta2: 0.99,
            tau: 1e-3
        })
        .build()
        .is_err()
    );
}
