//! The GEMM kernels against direct loops (f64 accumulation) on random shapes, including the
//! HuBERT front-end's (kernel 10 stride 5 on 1 channel; kernel 3 / 2 stride 2 on 512 channels).

use fedhubert_kernels::{Conv1dShape, backward_input, backward_weight, forward, reference};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// Max |a - b| relative to the largest |b| (f32 GEMM sums of up to thousands of terms).
fn assert_close(a: &[f32], b: &[f32], what: &str, s: &Conv1dShape) {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        err / scale < 2e-5,
        "{what} {s:?}: max err {err} (scale {scale})"
    );
}

fn check(s: Conv1dShape, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = rand_vec(&mut rng, s.batch * s.c_in * s.t_in);
    let w = rand_vec(&mut rng, s.c_out * s.c_in * s.kernel);
    let dy = rand_vec(&mut rng, s.batch * s.c_out * s.t_out());
    let mut y = vec![f32::NAN; dy.len()];
    forward(&x, &w, &s, &mut y);
    assert_close(&y, &reference::forward(&x, &w, &s), "forward", &s);
    let mut dx = vec![f32::NAN; x.len()];
    backward_input(&dy, &w, &s, &mut dx);
    assert_close(
        &dx,
        &reference::backward_input(&dy, &w, &s),
        "input grad",
        &s,
    );
    let mut dw = vec![f32::NAN; w.len()];
    backward_weight(&x, &dy, &s, &mut dw);
    assert_close(
        &dw,
        &reference::backward_weight(&x, &dy, &s),
        "weight grad",
        &s,
    );
}

#[test]
fn front_end_shapes() {
    let shapes = [
        (2, 1, 512, 10, 5, 1600),
        (2, 512, 512, 3, 2, 319),
        (1, 512, 512, 3, 2, 1200),
        (3, 512, 512, 2, 2, 99),
        (2, 512, 512, 2, 2, 40),
    ];
    for (i, &(batch, c_in, c_out, kernel, stride, t_in)) in shapes.iter().enumerate() {
        let s = Conv1dShape {
            batch,
            c_in,
            c_out,
            kernel,
            stride,
            t_in,
        };
        check(s, i as u64);
    }
}

#[test]
fn random_shapes() {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    for i in 0..40 {
        let kernel = rng.random_range(1..=10);
        let s = Conv1dShape {
            batch: rng.random_range(1..=5),
            c_in: rng.random_range(1..=40),
            c_out: rng.random_range(1..=40),
            kernel,
            stride: rng.random_range(1..=6),
            t_in: kernel + rng.random_range(0..300),
        };
        check(s, 1000 + i);
    }
}

#[test]
fn rejects_short_input() {
    let s = Conv1dShape {
        batch: 1,
        c_in: 1,
        c_out: 1,
        kernel: 5,
        stride: 1,
        t_in: 4,
    };
    assert!(s.validate().is_err());
}

#[test]
fn same_bits_on_any_thread_count() {
    // Bit-exact training resume needs scheduling-independent results.
    let s = Conv1dShape {
        batch: 3,
        c_in: 64,
        c_out: 48,
        kernel: 3,
        stride: 2,
        t_in: 2001,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = rand_vec(&mut rng, s.batch * s.c_in * s.t_in);
    let w = rand_vec(&mut rng, s.c_out * s.c_in * s.kernel);
    let dy = rand_vec(&mut rng, s.batch * s.c_out * s.t_out());
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut y = vec![0.0; dy.len()];
            let mut dx = vec![0.0; x.len()];
            let mut dw = vec![0.0; w.len()];
            forward(&x, &w, &s, &mut y);
            backward_input(&dy, &w, &s, &mut dx);
            backward_weight(&x, &dy, &s, &mut dw);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            (bits(&y), bits(&dx), bits(&dw))
        })
    };
    let one = run(1);
    assert!(one == run(3), "results depend on the thread count");
    assert!(one == run(3), "results differ between runs");
}
