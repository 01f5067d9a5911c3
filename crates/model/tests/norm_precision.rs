//! GroupNorm statistics over long inputs: the first conv layer of a 10 s clip has 32k frames, and
//! a plain running f32 sum over them drifted 3e-4 from transformers' hidden states.

use burn::tensor::{Tensor, TensorData};
use fedhubert_model::cpu_device;
use fedhubert_model::nn::{Init, LayerNorm};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[test]
fn group_norm_over_40k_frames_matches_f64() {
    let dev = cpu_device();
    let (c, t) = (3usize, 40_000usize);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // Post-GELU-like rows: positive offset, unit-ish spread, a slow drift.
    let x: Vec<f32> = (0..c * t)
        .map(|i| 3.0 + (i % t) as f32 * 1e-5 + rng.random_range(-1.0f32..1.0))
        .collect();
    let norm = LayerNorm::new(&Init::new(0, &dev), c, 1e-5);
    let y = norm
        .forward_group_per_channel(Tensor::<3>::from_data(
            TensorData::new(x.clone(), [1, c, t]),
            &dev,
        ))
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    // The plain burn statistics, for the record.
    let xt = Tensor::<3>::from_data(TensorData::new(x.clone(), [1, c, t]), &dev);
    let (var, mean) = xt.clone().var_mean_bias(2);
    let plain = ((xt - mean) / (var + 1e-5).sqrt())
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    let mut worst_plain = 0f64;
    let mut worst = 0f64;
    for ch in 0..c {
        let row: Vec<f64> = x[ch * t..(ch + 1) * t].iter().map(|&v| v as f64).collect();
        let mean = row.iter().sum::<f64>() / t as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / t as f64;
        for (k, v) in row.iter().enumerate() {
            let want = (v - mean) / (var + 1e-5).sqrt();
            worst = worst.max((y[ch * t + k] as f64 - want).abs());
            worst_plain = worst_plain.max((plain[ch * t + k] as f64 - want).abs());
        }
    }
    eprintln!(
        "GroupNorm over {t} frames: max abs error vs f64 {worst:.3e} (plain running-sum statistics: {worst_plain:.3e})"
    );
    assert!(worst < 5e-6, "GroupNorm error {worst:.3e}");
    assert!(
        worst < worst_plain / 2.0,
        "blocked statistics ({worst:.3e}) no better than a running sum ({worst_plain:.3e})"
    );
}
