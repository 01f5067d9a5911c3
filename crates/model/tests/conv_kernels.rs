//! `fedhubert_model::kernels::conv1d` (our GEMM kernels behind a burn backend extension) against
//! burn's own conv1d: values and both gradients through autodiff, on random shapes and the HuBERT
//! front-end's (kernel 10 stride 5 on 1 channel; kernel 3 / 2 stride 2 on 512 channels).

use burn::tensor::{Tensor, TensorData};
use fedhubert_model::cpu_device;
use fedhubert_model::kernels::{conv1d, conv1d_reference};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn vals(t: Tensor<3>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// Max |a - b| relative to the largest |b|: both sides sum up to C_in * K products in f32 in
/// different orders, so the differences are rounding (~1e-6 relative), not formula errors.
fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(err / scale < 5e-5, "{what}: max err {err} (scale {scale})");
}

fn check(b: usize, c_in: usize, c_out: usize, k: usize, stride: usize, t: usize, seed: u64) {
    let what = format!("B{b} Cin{c_in} Cout{c_out} K{k} S{stride} T{t}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut rv = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random::<f32>() - 0.5).collect() };
    let (xv, wv) = (rv(b * c_in * t), rv(c_out * c_in * k));
    let t_out = (t - k) / stride + 1;
    let rv_out = rv(b * c_out * t_out);
    let ad = cpu_device().autodiff();

    let run = |ours: bool| {
        let x =
            Tensor::<3>::from_data(TensorData::new(xv.clone(), [b, c_in, t]), &ad).require_grad();
        let w = Tensor::<3>::from_data(TensorData::new(wv.clone(), [c_out, c_in, k]), &ad)
            .require_grad();
        let r = Tensor::<3>::from_data(TensorData::new(rv_out.clone(), [b, c_out, t_out]), &ad);
        let y = if ours {
            conv1d(x.clone(), w.clone(), stride)
        } else {
            conv1d_reference(x.clone(), w.clone(), stride)
        };
        // A non-uniform output gradient: d(sum(y * r))/dy = r.
        let grads = (y.clone() * r).sum().backward();
        let gx = x.grad(&grads).expect("x grad");
        let gw = w.grad(&grads).expect("w grad");
        (vals(y.inner()), vals(gx), vals(gw))
    };
    let (y1, gx1, gw1) = run(true);
    let (y0, gx0, gw0) = run(false);
    assert_close(&y1, &y0, &format!("{what} forward"));
    assert_close(&gx1, &gx0, &format!("{what} input grad"));
    assert_close(&gw1, &gw0, &format!("{what} weight grad"));

    // Without autodiff too.
    let dev = cpu_device();
    let x = Tensor::<3>::from_data(TensorData::new(xv.clone(), [b, c_in, t]), &dev);
    let w = Tensor::<3>::from_data(TensorData::new(wv.clone(), [c_out, c_in, k]), &dev);
    assert_close(
        &vals(conv1d(x, w, stride)),
        &y0,
        &format!("{what} forward (no autodiff)"),
    );
}

#[test]
fn front_end_shapes_match_burn() {
    check(2, 1, 512, 10, 5, 1600, 1);
    check(2, 512, 512, 3, 2, 319, 2);
    check(3, 512, 512, 2, 2, 99, 3);
    check(1, 512, 512, 2, 2, 49, 4);
}

#[test]
fn random_shapes_match_burn() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for i in 0..12 {
        let k = rng.random_range(1..=10);
        check(
            rng.random_range(1..=4),
            rng.random_range(1..=33),
            rng.random_range(1..=33),
            k,
            rng.random_range(1..=6),
            k + rng.random_range(0..200),
            100 + i,
        );
    }
}

#[test]
fn strided_input_view() {
    // A transposed (non-contiguous) input goes through the copy path.
    let dev = cpu_device();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let v: Vec<f32> = (0..2 * 40 * 6).map(|_| rng.random::<f32>()).collect();
    let x = Tensor::<3>::from_data(TensorData::new(v, [2, 40, 6]), &dev).swap_dims(1, 2);
    let w: Vec<f32> = (0..4 * 6 * 3).map(|_| rng.random::<f32>()).collect();
    let w = Tensor::<3>::from_data(TensorData::new(w, [4, 6, 3]), &dev);
    assert_close(
        &vals(conv1d(x.clone(), w.clone(), 2)),
        &vals(conv1d_reference(x, w, 2)),
        "transposed input",
    );
}

#[test]
fn gelu_matches_burn() {
    let ad = cpu_device().autodiff();
    let n = 3 * 7 * 1001;
    let v: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) * 1e-3).collect();
    let r: Vec<f32> = (0..n).map(|i| ((i % 11) as f32 - 5.0) * 0.3).collect();
    let run = |ours: bool| {
        let x =
            Tensor::<3>::from_data(TensorData::new(v.clone(), [3, 7, 1001]), &ad).require_grad();
        let rt = Tensor::<3>::from_data(TensorData::new(r.clone(), [3, 7, 1001]), &ad);
        let y = if ours {
            fedhubert_model::kernels::gelu(x.clone())
        } else {
            burn::tensor::activation::gelu(x.clone())
        };
        let grads = (y.clone() * rt).sum().backward();
        (vals(y.inner()), vals(x.grad(&grads).unwrap()))
    };
    let (y1, g1) = run(true);
    let (y0, g0) = run(false);
    assert_close(&y1, &y0, "gelu");
    assert_close(&g1, &g0, "gelu grad");
}

#[test]
fn group_norm_gelu_matches_burn() {
    use fedhubert_model::kernels::{group_norm_gelu, group_norm_gelu_reference};
    let ad = cpu_device().autodiff();
    let (b, c, t) = (3, 37, 801);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rv = |n: usize, lo: f32, hi: f32| -> Vec<f32> {
        (0..n)
            .map(|_| lo + (hi - lo) * rng.random::<f32>())
            .collect()
    };
    // Rows with offsets and scales, so the normalisation matters.
    let zv: Vec<f32> = rv(b * c * t, -1.0, 1.0)
        .into_iter()
        .enumerate()
        .map(|(i, v)| v * (1.0 + (i / t % 5) as f32) + (i / t % 3) as f32)
        .collect();
    let (gv, bv, rvv) = (rv(c, 0.5, 1.5), rv(c, -0.5, 0.5), rv(b * c * t, -1.0, 1.0));
    let run = |ours: bool| {
        let z = Tensor::<3>::from_data(TensorData::new(zv.clone(), [b, c, t]), &ad).require_grad();
        let g = Tensor::<1>::from_data(TensorData::new(gv.clone(), [c]), &ad).require_grad();
        let be = Tensor::<1>::from_data(TensorData::new(bv.clone(), [c]), &ad).require_grad();
        let r = Tensor::<3>::from_data(TensorData::new(rvv.clone(), [b, c, t]), &ad);
        let y = if ours {
            group_norm_gelu(z.clone(), g.clone(), be.clone(), 1e-5)
        } else {
            group_norm_gelu_reference(z.clone(), g.clone(), be.clone(), 1e-5)
        };
        let grads = (y.clone() * r).sum().backward();
        let v1 = |t: Tensor<1>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        (
            vals(y.inner()),
            vals(z.grad(&grads).unwrap()),
            v1(g.grad(&grads).unwrap()),
            v1(be.grad(&grads).unwrap()),
        )
    };
    let (y1, dz1, dg1, db1) = run(true);
    let (y0, dz0, dg0, db0) = run(false);
    assert_close(&y1, &y0, "group norm gelu");
    assert_close(&dz1, &dz0, "group norm gelu: input grad");
    assert_close(&dg1, &dg0, "group norm gelu: gamma grad");
    assert_close(&db1, &db0, "group norm gelu: beta grad");
}
