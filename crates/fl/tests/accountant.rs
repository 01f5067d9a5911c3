//! The RDP accountant against Opacus' `RDPAccountant` and Google's dp_accounting
//! `RdpAccountant` on the committed table `assets/fixtures/dp_accountant.json`
//! (`bench/make_dp_fixture.py`): epsilon within 1% relative.

use fedhubert_fl::privacy::accountant::{
    Ledger, Sampling, epsilon_from_rdp, noise_for_epsilon, rdp_poisson,
};

#[derive(serde::Deserialize)]
struct Case {
    sampling: Sampling,
    q: f64,
    noise_multiplier: f64,
    rounds: u64,
    delta: f64,
    dp_accounting: f64,
    opacus: Option<f64>,
    dp_accounting_orders_dropped: u32,
}

#[derive(serde::Deserialize)]
struct Fixture {
    opacus_orders: Vec<f64>,
    cases: Vec<Case>,
}

fn fixture() -> Fixture {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../assets/fixtures/dp_accountant.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

#[test]
fn epsilon_matches_opacus_and_dp_accounting() {
    let f = fixture();
    assert!(f.cases.len() >= 20);
    let mut worst = (0.0f64, 0.0f64);
    let mut looser = 0.0f64;
    for c in &f.cases {
        let mut l = Ledger::default();
        l.compose(c.sampling, c.q, c.noise_multiplier, c.rounds);
        let ours = l.epsilon(c.delta);
        let what = format!(
            "{:?} q {} z {} rounds {} delta {}",
            c.sampling, c.q, c.noise_multiplier, c.rounds, c.delta
        );
        if c.dp_accounting_orders_dropped == 0 {
            let r = rel(ours, c.dp_accounting);
            worst.0 = worst.0.max(r);
            assert!(
                r < 0.01,
                "{what}: ours {ours} dp_accounting {}",
                c.dp_accounting
            );
        } else {
            // dp_accounting left orders out (its series did not converge): its bound is looser.
            looser = looser.max(c.dp_accounting / ours - 1.0);
            assert!(
                ours <= c.dp_accounting * 1.01,
                "{what}: ours {ours} dp_accounting {}",
                c.dp_accounting
            );
        }
        if let Some(o) = c.opacus {
            // At Opacus' own orders, the same series (signed binomial coefficients).
            let rdp: Vec<f64> = (f.opacus_orders.iter())
                .map(|&a| c.rounds as f64 * rdp_poisson(c.q, c.noise_multiplier, a))
                .collect();
            let (at_opacus, _) = epsilon_from_rdp(&f.opacus_orders, &rdp, c.delta);
            let r = rel(at_opacus, o);
            worst.1 = worst.1.max(r);
            assert!(r < 0.01, "{what}: ours {at_opacus} opacus {o}");
        }
    }
    eprintln!(
        "worst relative difference: dp_accounting {:.2e}, opacus {:.2e}; where dp_accounting dropped orders its epsilon is up to {:.1}% larger",
        worst.0,
        worst.1,
        100.0 * looser
    );
}

#[test]
fn the_noise_solved_for_a_target_spends_that_epsilon() {
    for (sampling, q) in [
        (Sampling::Poisson, 0.1),
        (Sampling::Fixed, 0.2),
        (Sampling::Poisson, 1.0),
    ] {
        let z = noise_for_epsilon(8.0, sampling, q, 60, 1e-5).unwrap();
        let mut l = Ledger::default();
        l.compose(sampling, q, z, 60);
        let eps = l.epsilon(1e-5);
        assert!(
            eps <= 8.0 && eps > 7.98,
            "{sampling:?} q {q}: z {z} gives {eps}"
        );
        l.compose(sampling, q, z, 1);
        assert!(l.epsilon(1e-5) > eps, "composition must spend more");
    }
    assert!(noise_for_epsilon(1e-9, Sampling::Poisson, 1.0, 1000, 1e-5).is_err());
}
